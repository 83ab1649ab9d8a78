"""transformers adapter (transformers has no plugin entry points: call :func:`register`).

    import overdrive.transformers            # registers overdrive's methods (idempotent)
    model = AutoModelForCausalLM.from_pretrained("./model-q")   # quant_method from config.json

Weight-quantization methods are registered with ``transformers.quantizers.register_quantizer`` and
``register_quantization_config``: before weights load, the quantizer swaps each quantized
``nn.Linear`` for an :class:`OverdriveLinear` holding the method's parameters (``param_specs``), the
loader fills them from the checkpoint, and ``process_after_loading`` runs once. The forward is the
method's ``apply`` — the same code vLLM and SGLang run. Never shadows a built-in quantizer name.
"""
from __future__ import annotations

from typing import Any

import torch

from overdrive.adapters._register import register_generated, resolve_generated, run_once, two_map_checks

_classes: dict[str, type] = {}


def register() -> list[str]:
    """Register overdrive's methods into transformers in this process. Idempotent."""
    return run_once("transformers", "transformers", _register)


class OverdriveLinear(torch.nn.Module):
    """A linear layer whose weights are a weight-quantization method's parameters."""

    def __init__(self, method: Any, cfg: Any, in_features: int, out_features: int, bias: bool,
                 act_dtype: torch.dtype, prefix: str = "") -> None:
        super().__init__()
        self.method, self.cfg, self.prefix = method, method.layer_config(prefix, cfg), prefix
        self.in_features, self.out_features = in_features, out_features
        method.validate_partition(in_features, [out_features], self.cfg, prefix=prefix)
        self.param_names: tuple[str, ...] = ()
        names = []
        for ps in method.param_specs(in_features, out_features, self.cfg):
            self.register_parameter(ps.name, torch.nn.Parameter(
                torch.zeros(ps.shape, dtype=ps.resolve_dtype(act_dtype)), requires_grad=False))
            names.append(ps.name)
        self.param_names = tuple(names)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=act_dtype), requires_grad=False) if bias else None

    def finish_loading(self) -> None:
        processed = self.method.process_after_loading({n: getattr(self, n).data for n in self.param_names}, self.cfg)
        for n in self.param_names:
            delattr(self, n)
        for n, t in processed.items():
            self.register_parameter(n, torch.nn.Parameter(t, requires_grad=False))
        self.param_names = tuple(processed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(x, {n: getattr(self, n) for n in self.param_names}, self.bias, self.cfg)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.cfg!r}"


def _register() -> tuple[list[str], list[str]]:
    import overdrive
    from overdrive.kinds import Kind

    specs = overdrive.list_methods(Kind.WEIGHT_QUANT)
    if not specs:
        return [], []
    from transformers.quantizers import auto

    def install(name: str, config_cls: type, quantizer_cls: type) -> None:
        # the registration functions raise on a duplicate name: register_generated checked it
        auto.register_quantization_config(name)(config_cls)
        auto.register_quantizer(name)(quantizer_cls)

    return register_generated(
        "transformers", specs, _build_classes, install, module=__name__, classes=_classes,
        **two_map_checks(auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING))


def _build_classes(spec: Any) -> dict[str, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from overdrive.adapters._weight_quant import lazy_impl

    name = spec.name
    impl = lazy_impl(spec)

    class Config(QuantizationConfigMixin):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.pop("quant_method", None)
            self.__dict__.update(kwargs)
            self.quant_method = name

        def method_config(self) -> Any:
            return impl().config_from_checkpoint(self.to_dict())

    class Quantizer(HfQuantizer):
        requires_calibration = True  # loads checkpoints made by `overdrive quantize`
        overdrive_method = name

        def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
            cfg = self.quantization_config.method_config()
            method = impl()
            dtype = kwargs.get("dtype") or getattr(model, "dtype", torch.float32)
            for prefix, module in list(model.named_modules()):
                for child_name, child in list(module.named_children()):
                    full = f"{prefix}.{child_name}" if prefix else child_name
                    if type(child) is torch.nn.Linear and method.is_quantized_layer(full, cfg) \
                            and not _is_output_head(model, child):
                        setattr(module, child_name, OverdriveLinear(
                            method, cfg, child.in_features, child.out_features, child.bias is not None,
                            dtype, prefix=full))
            from overdrive.contracts.weight_quant import ExpertQuantMethod

            if isinstance(method, ExpertQuantMethod):  # per-expert formats: swap the MoE experts modules
                from overdrive.adapters.transformers.moe_quant import swap_experts

                swap_experts(model, method, cfg, dtype)

        def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
            for m in model.modules():
                if isinstance(m, OverdriveLinear):
                    m.finish_loading()
            from overdrive.contracts.weight_quant import ExpertQuantMethod

            if isinstance(impl(), ExpertQuantMethod):
                from overdrive.adapters.transformers.moe_quant import finish_experts

                finish_experts(model)

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            return False  # pre-quantized: parameters load as stored

        def is_serializable(self) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return {"HfConfig": Config, "HfQuantizer": Quantizer}


def _is_output_head(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is module


def __getattr__(name: str) -> Any:
    return resolve_generated(__name__, name, _classes, register)


def enable(model: torch.nn.Module, method: str, config: Any = None, **options: Any) -> Any:
    """Attach a token-reduction, vocabulary-selection or expert-pruning method to a model (by the method's kind)."""
    import overdrive
    from overdrive.kinds import Kind

    kind = overdrive.get_method(method).kind
    if kind is Kind.EXPERT_PRUNING:
        from overdrive.adapters.transformers import expert_pruning

        return expert_pruning.enable(model, method, config, **options)
    if kind is Kind.VOCAB:
        from overdrive.adapters.transformers import vocab

        return vocab.enable(model, method, config, **options)
    from overdrive.adapters.transformers import token_reduction

    return token_reduction.enable(model, method, config, **options)


def disable(model: torch.nn.Module) -> bool:
    """Remove the method :func:`enable` attached to ``model``; False if none was."""
    from overdrive.adapters.transformers import attachments, expert_pruning
    from overdrive.kinds import Kind

    return attachments.detach(model, Kind.VOCAB) or attachments.detach(model, Kind.TOKEN_REDUCTION) \
        or expert_pruning.disable(model)


def enabled(model: torch.nn.Module) -> Any:
    """The attachment :func:`enable` returned for ``model``, or None."""
    from overdrive.adapters.transformers import attachments
    from overdrive.kinds import Kind

    return attachments.get(model, Kind.TOKEN_REDUCTION) or attachments.get(model, Kind.VOCAB)
