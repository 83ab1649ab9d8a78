"""Diffusers quantizers for DiT methods whose artifact is a quantized denoiser checkpoint.

diffusers has no quantizer registration function (``quantizers/auto.py`` keeps two closed dicts) and
no entry points, so ``import overdrive.diffusers`` calls :func:`register`, which adds one
``DiffusersQuantizer`` + config class per DiT method with ``checkpoint_format = True`` to
``AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING`` (SOFT, docs/ledger.md). Then

    import overdrive.diffusers
    pipe = DiffusionPipeline.from_pretrained("./flux-viditq")   # transformer/config.json: quant_method "viditq"

loads the quantized tensors as stored (no float copy of the replaced layers is ever made) and
attaches the method's hooks through the shared hook layer, so every layer reads the step context.
Generic: no method name appears here. Never shadows a diffusers quantizer of the same name.
"""
from __future__ import annotations

from typing import Any

import torch

from overdrive.config import ConfigError

from overdrive.adapters._register import register_generated, resolve_generated, run_once, two_map_checks

_classes: dict[str, type] = {}


def register() -> list[str]:
    """Register every checkpoint-carrying DiT method as a diffusers quantizer (idempotent)."""
    return run_once("diffusers", "diffusers", _register)


def _register() -> tuple[list[str], list[str]]:
    import overdrive
    from overdrive.kinds import Kind

    registered: list[str] = []
    skipped: list[str] = []
    specs = []
    for spec in overdrive.list_methods(Kind.DIT_CACHE):
        try:
            impl = spec.load_impl()
        except Exception as e:  # a broken plugin must not break diffusers loading for the others
            skipped.append(f"{spec.name} (impl failed to import: {type(e).__name__}: {e})")
            continue
        if getattr(impl, "checkpoint_format", False):
            specs.append(spec)
    if not specs:
        return registered, skipped
    from diffusers.quantizers import auto

    def install(name: str, config_cls: type, quantizer_cls: type) -> None:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] = config_cls  # no registration function (docs/ledger.md)
        auto.AUTO_QUANTIZER_MAPPING[name] = quantizer_cls

    done, more = register_generated(
        "diffusers", specs, _build_classes, install, module=__name__, classes=_classes,
        **two_map_checks(auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING))
    return done, skipped + more


class _MethodName(str):
    """A quant_method string with ``.value`` (diffusers reads ``quant_method.value`` of its enum)."""

    @property
    def value(self) -> str:
        return str(self)


def _build_classes(spec: Any) -> dict[str, type]:
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    from overdrive.adapters.diffusers import denoiser_info, enable  # absolute: `.diffusers` reads as the engine

    name = spec.name

    class Config(QuantizationConfigMixin):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.pop("quant_method", None)
            self.__dict__.update(kwargs)
            self.quant_method = _MethodName(name)

        def to_dict(self) -> dict[str, Any]:
            d = super().to_dict()
            d["quant_method"] = name
            return d

        def to_diff_dict(self) -> dict[str, Any]:  # read by QuantizationConfigMixin.to_json_string / __repr__
            return self.to_dict()

        def __repr__(self) -> str:  # the plan can be large: diffusers logs the config's repr
            return f"{type(self).__name__}(quant_method={name!r})"

    class Quantizer(DiffusersQuantizer):
        requires_calibration = True  # loads checkpoints written by `overdrive calibrate --method NAME`
        overdrive_method = name

        def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
            impl = spec.load_impl()
            self.overdrive_cfg, replaced = impl.prepare_checkpoint(model, denoiser_info(model),
                                                                   self.quantization_config.to_dict())
            self.overdrive_prefixes = tuple(f"{r}." for r in replaced)

        def check_if_quantized_param(self, model: Any, param_value: torch.Tensor, param_name: str,
                                     state_dict: dict[str, Any], **kwargs: Any) -> bool:
            return param_name.startswith(self.overdrive_prefixes)

        def check_quantized_param_shape(self, *args: Any, **kwargs: Any) -> bool:
            return True  # checked with the tensor's name in create_quantized_param

        def create_quantized_param(self, model: torch.nn.Module, param_value: torch.Tensor, param_name: str,
                                   target_device: Any, state_dict: dict[str, Any], unexpected_keys: Any = None,
                                   **kwargs: Any) -> None:
            # the tensor as stored: diffusers has already cast floating tensors to torch_dtype in param_value
            value = state_dict.get(param_name, param_value)
            module_name, _, leaf = param_name.rpartition(".")
            module = model.get_submodule(module_name)
            old = module._parameters.get(leaf)
            # floating tensors keep the stored dtype (fp32 scales, divisors and biases in a bf16 model)
            fits = old is not None and tuple(old.shape) == tuple(value.shape) and (
                old.dtype == value.dtype or old.dtype.is_floating_point and value.dtype.is_floating_point)
            if not fits:
                want = "no such parameter" if old is None else f"{tuple(old.shape)} {old.dtype}"
                raise ConfigError(f"{param_name}: checkpoint tensor {tuple(value.shape)} {value.dtype} does not fit the "
                                  f"{name} layer's parameter ({want}); was the checkpoint written by "
                                  f"`overdrive calibrate --method {name}` for this model?")
            module._parameters[leaf] = torch.nn.Parameter(value.to(target_device), requires_grad=False)

        def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
            spec.load_impl().finish_checkpoint(model, self.overdrive_cfg)
            session = enable(model, name, self.overdrive_cfg)  # the step context reaches the layers
            session.session.loaded = True

        @property
        def is_serializable(self) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return {"DiffusersConfig": Config, "DiffusersQuantizer": Quantizer}


def __getattr__(name: str) -> Any:
    return resolve_generated(__name__, name, _classes, register)
