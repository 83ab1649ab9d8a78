"""The ViDiT-Q method object (``METHOD``): the hook-layer contract, checkpoint loading, calibration on request."""
from __future__ import annotations

from typing import Any

import torch

from overdrive.config import ConfigError
from overdrive.contracts.dit_cache import CalibrationRun, DenoiserInfo, DenoiserSession, DiTCacheMethod

from .config import DEFAULT_ALPHA_GRID, DEFAULT_EMA, Plan, ViDiTQConfig
from .runtime import ViDiTQHooks, build_layers, quantized_layers, swap_module


class ViDiTQMethod(DiTCacheMethod):
    checkpoint_format = True

    def hooks(self, session: DenoiserSession, cfg: ViDiTQConfig) -> ViDiTQHooks:
        return ViDiTQHooks(session, cfg)

    def prepare_checkpoint(self, model: torch.nn.Module, info: DenoiserInfo,
                           quantization_config: dict[str, Any]) -> tuple[ViDiTQConfig, list[str]]:
        plan = Plan.from_quantization_config(quantization_config, "config.json quantization_config")
        _, layers = build_layers(plan, model, info, "config.json quantization_config", device="meta")
        for name, lay in layers.items():
            swap_module(model, name, lay)
        return ViDiTQConfig(), list(layers)

    def finish_checkpoint(self, model: torch.nn.Module, cfg: ViDiTQConfig) -> None:
        for name, lay in quantized_layers(model).items():
            for p, t in lay.named_parameters():
                if t.is_meta:
                    raise ConfigError(f"the ViDiT-Q checkpoint has no tensor {name}.{p} for its plan's quantized "
                                      "layer; was it written by `overdrive calibrate --method viditq`?")

    def calibrate(self, run: CalibrationRun, scheme: str = "w8a8", ranges: int = 2, alpha: Any = "default",
                  alpha_grid: Any = None, mixed_precision: float = 0.0, keep_float: Any = (),
                  ema: float | None = None) -> Any:
        """Per-range statistics, channel balancing, optional mixed precision; see :mod:`.calibrate`."""
        from .calibrate import calibrate

        return calibrate(run, scheme=scheme, ranges=ranges, alpha=alpha,
                         alpha_grid=DEFAULT_ALPHA_GRID if alpha_grid is None else alpha_grid,
                         mixed_precision=mixed_precision, keep_float=keep_float,
                         ema=DEFAULT_EMA if ema is None else ema)

    def calibration_options(self, args: Any) -> dict[str, Any]:
        from .cli import options_from_args

        return options_from_args(args)


METHOD = ViDiTQMethod()
