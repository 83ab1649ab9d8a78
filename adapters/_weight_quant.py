"""Engine classes for the weight-quantization contract, shared by the vLLM and SGLang adapters.

vLLM and SGLang have the same shape of quantization API (SGLang's came from vLLM's): a
``QuantizationConfig`` subclass per method name, and a ``LinearMethodBase`` subclass that creates,
post-processes and applies a linear layer's parameters. :func:`build_config_class` builds both from an
:class:`~overdrive.contracts.WeightQuantMethod`, given the engine's base classes, so a method reaches
both engines with no per-method code. Only called from ``register()`` when the engine is present.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from overdrive.config import ConfigError
from overdrive.contracts.weight_quant import ExpertQuantMethod, WeightQuantMethod
from overdrive.spec import MethodSpec


@dataclasses.dataclass(frozen=True)
class EngineQuantAPI:
    """The handful of engine symbols the generic classes need (see docs/ledger.md)."""

    engine: str
    adapter_module: str  # generated classes live (for pickling) as attributes of this module
    QuantizationConfig: type
    LinearMethodBase: type
    LinearBase: type
    UnquantizedLinearMethod: type
    set_weight_attrs: Callable[[torch.nn.Parameter, dict[str, Any] | None], None]
    extra_methods: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: ``(method name, method, cfg, layer, prefix, loaded params) -> engine kernel or None``: offers a
    #: loaded layer to the engine's own kernels (the layer then runs ``engine.apply(layer, x, bias)``)
    kernel_handoff: Callable[..., Any] | None = None
    #: ``(spec, method, cfg, layer, prefix) -> the engine's MoE method or None``: serves MoE layers of
    #: methods with per-expert formats (ExpertQuantMethod); None: such layers are refused at startup
    moe_method: Callable[..., Any] | None = None


def build_linear_method_class(api: EngineQuantAPI) -> type:
    """An engine ``LinearMethodBase`` that delegates to a WeightQuantMethod."""

    class OverdriveLinearMethod(api.LinearMethodBase):  # type: ignore[misc, valid-type]
        def __init__(self, spec: MethodSpec, method: WeightQuantMethod, cfg: Any, prefix: str) -> None:
            self.spec, self.method, self.prefix = spec, method, prefix
            self.cfg = method.layer_config(prefix, cfg)

        def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                           output_partition_sizes: list[int], input_size: int, output_size: int,
                           params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
            self.method.validate_partition(input_size_per_partition, list(output_partition_sizes),
                                           self.cfg, prefix=self.prefix)
            names = []
            loaded: set[str] = set()
            checked = False
            for ps in self.method.param_specs(input_size_per_partition, sum(output_partition_sizes), self.cfg):
                p = torch.nn.Parameter(torch.empty(ps.shape, dtype=ps.resolve_dtype(params_dtype)),
                                       requires_grad=False)
                api.set_weight_attrs(p, ps.weight_attrs())
                attrs = dict(extra_weight_attrs)
                if attrs.get("weight_loader") is not None:
                    attrs["weight_loader"] = self._checked_loader(attrs["weight_loader"], ps.name, loaded)
                    checked = True
                api.set_weight_attrs(p, attrs)
                layer.register_parameter(ps.name, p)
                names.append(ps.name)
            # per-instance bookkeeping on the layer object (never on its class)
            layer.overdrive_param_names = tuple(names)
            layer.overdrive_shapes = (input_size_per_partition, list(output_partition_sizes), input_size,
                                      output_size, params_dtype)
            layer.overdrive_loaded = loaded if checked else None  # None: filled by the caller, not tracked

        def _checked_loader(self, loader: Callable[..., Any], name: str, loaded: set[str]) -> Callable[..., Any]:
            """The engine's loader, with errors that name the tensor and the expected shape."""
            where = f"{self.prefix}.{name}" if self.prefix else name

            def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                try:
                    out = loader(param, loaded_weight, *args, **kwargs)
                except (AssertionError, RuntimeError, ValueError) as e:
                    raise ConfigError(
                        f"{where}: checkpoint tensor of shape {tuple(loaded_weight.shape)} ({loaded_weight.dtype}) "
                        f"does not fit the {self.spec.name} parameter of shape {tuple(param.shape)} ({param.dtype}) "
                        f"per tensor-parallel shard{' for shard ' + repr(args[0]) if args else ''}; was the "
                        f"checkpoint written by `overdrive quantize --method {self.spec.name}` with this config? "
                        f"({type(e).__name__}: {e})") from e
                loaded.add(name)
                return out

            return load

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            tracked = getattr(layer, "overdrive_loaded", None)
            missing = [n for n in layer.overdrive_param_names if tracked is not None and n not in tracked]
            if missing:
                raise ConfigError(f"{self.prefix}: the checkpoint has no {', '.join(missing)} for this "
                                  f"{self.spec.name}-quantized layer (expected tensors "
                                  f"{', '.join(self.prefix + '.' + n for n in layer.overdrive_param_names)})")
            loaded = {n: getattr(layer, n).data for n in layer.overdrive_param_names}
            engine = (api.kernel_handoff(self.spec.name, self.method, self.cfg, layer, self.prefix, loaded)
                      if api.kernel_handoff is not None else None)
            if engine is not None:  # the engine's kernel took the layer (its parameters are registered)
                for n in layer.overdrive_param_names:
                    delattr(layer, n)
                layer.overdrive_param_names = ()
                layer.overdrive_engine = engine
                return
            processed = self.method.process_after_loading(loaded, self.cfg)
            for n in layer.overdrive_param_names:
                delattr(layer, n)
            for n, t in processed.items():
                layer.register_parameter(n, torch.nn.Parameter(t, requires_grad=False))
            layer.overdrive_param_names = tuple(processed)

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            engine = getattr(layer, "overdrive_engine", None)
            if engine is not None:
                return engine.apply(layer, x, bias)
            params = {n: getattr(layer, n) for n in layer.overdrive_param_names}
            return self.method.apply(x, params, bias, self.cfg)

    OverdriveLinearMethod.__name__ = OverdriveLinearMethod.__qualname__ = "OverdriveLinearMethod"
    return OverdriveLinearMethod


def _is_moe_layer(layer: torch.nn.Module) -> bool:
    """A fused MoE layer of vLLM (``RoutedExperts``/``FusedMoE``) or SGLang (``FusedMoE``, ``EPMoE``, ...),
    by class name: the adapters import no MoE classes for this check."""
    names = {c.__name__ for c in type(layer).__mro__}
    return "RoutedExperts" in names or any(n.endswith("MoE") or n.startswith("FusedMoE") for n in names)


def lazy_impl(spec: MethodSpec) -> Callable[[], WeightQuantMethod]:
    """The method's contract implementation, resolved (and type-checked) on first use.

    Not at registration: register() runs in every engine process and must not import a method's
    kernels until a model actually uses it.
    """

    @functools.cache
    def impl() -> WeightQuantMethod:
        m = spec.load_impl()
        if not isinstance(m, WeightQuantMethod):
            raise TypeError(f"method {spec.name!r}: impl must be a WeightQuantMethod, got {type(m).__name__}")
        return m

    return impl


def build_config_class(spec: MethodSpec, api: EngineQuantAPI) -> type:
    """An engine ``QuantizationConfig`` subclass serving ``spec`` (a weight-quantization method)."""
    linear_cls = build_linear_method_class(api)
    name = spec.name
    impl = lazy_impl(spec)

    def __init__(self: Any, cfg: Any = None) -> None:
        api.QuantizationConfig.__init__(self)
        if cfg is None:
            cfg = impl().default_config()
            if cfg is None:
                raise ValueError(
                    f"{api.engine}: quantization {name!r} needs a checkpoint made by "
                    f"`overdrive quantize --method {name}` (config.json quantization_config); "
                    "this model has none"
                )
        self.overdrive_cfg = cfg

    def __repr__(self: Any) -> str:
        return f"{type(self).__name__}({self.overdrive_cfg!r})"

    def get_quant_method(self: Any, layer: torch.nn.Module, prefix: str) -> Any:
        if isinstance(layer, api.LinearBase):
            if impl().is_quantized_layer(prefix, self.overdrive_cfg):
                return linear_cls(spec, impl(), self.overdrive_cfg, prefix)
            return api.UnquantizedLinearMethod()
        if _is_moe_layer(layer) and isinstance(impl(), ExpertQuantMethod) and api.moe_method is not None:
            return api.moe_method(spec, impl(), self.overdrive_cfg, layer, prefix)
        if _is_moe_layer(layer) and isinstance(impl(), ExpertQuantMethod):
            # per-expert formats (MxMoE): no fused-MoE method of this adapter serves them yet; never
            # fall back to the engine's unquantized MoE method (it would run unloaded weights)
            raise ConfigError(
                f"{api.engine}: {prefix or type(layer).__name__} is a MoE layer and {name!r} quantizes MoE experts "
                f"per expert, which overdrive's {api.engine} adapter does not serve yet; load this checkpoint with "
                "transformers (`import overdrive.transformers`, then `from_pretrained(DIR)`), see "
                f"docs/methods/{name}.md")
        return None

    def override_quantization_method(cls: Any, hf_quant_cfg: Any, user_quant: Any, *a: Any, **k: Any) -> Any:
        # Claim checkpoints whose config.json says quant_method == our name (auto-detection).
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == name:
            return name
        return None

    body: dict[str, Any] = {
        "__init__": __init__,
        "__repr__": __repr__,
        # Engines pickle the config into their worker processes: the class must be importable by
        # name. The adapter module resolves it through its module __getattr__ (registering first).
        "__module__": api.adapter_module,
        "__doc__": f"{api.engine} QuantizationConfig for overdrive method {name!r} ({spec.paper}).",
        "get_name": lambda self: name,
        "get_supported_act_dtypes": lambda self: list(impl().act_dtypes),
        "get_min_capability": classmethod(lambda cls: impl().min_capability),
        "get_config_filenames": staticmethod(lambda: list(impl().config_filenames)),
        "from_config": classmethod(lambda cls, config: cls(impl().config_from_checkpoint(config))),
        "override_quantization_method": classmethod(override_quantization_method),
        "get_quant_method": get_quant_method,
        "overdrive_method": name,
        **api.extra_methods,
    }
    return type("OverdriveConfig", (api.QuantizationConfig,), body)  # named by register_generated
