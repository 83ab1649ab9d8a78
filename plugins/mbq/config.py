"""MBQ config: the quantization scheme, as written into a checkpoint's ``quantization_config``."""
from __future__ import annotations

import dataclasses
from typing import Literal

from overdrive.config import ConfigError, MethodConfig

#: module-name substrings never quantized: MBQ quantizes the language decoder only
DEFAULT_SKIP = ["visual", "vision", "lm_head", "embed", "merger", "multi_modal_projector"]


@dataclasses.dataclass
class MBQConfig(MethodConfig):
    """A weight-quantization scheme of MBQ.

    bits             weight bits: 3 or 4 (weight-only, asymmetric, grouped) or 8 (W8A8)
    group_size       input channels per scale/zero group for weight-only schemes (multiple of 32);
                     unused by W4A8/W8A8, whose weights have one scale per output channel
    act_bits         16: weight-only (W3/W4); 8: int8 per-token dynamic activations (W8A8 / W4A8)
    zero_point       weight-only schemes are asymmetric (true); W4A8/W8A8 symmetric (false)
    modules_to_not_convert  module-name substrings left in 16 bits (vision tower, LM head, ...)
    baseline         how the weights were calibrated (recorded only): "rtn" (round to nearest), "awq" or
                     "mbq" (scales searched, then round to nearest), "gptq", "awq-gptq", "mbq-gptq"
                     (GPTQ; after AWQ's / MBQ's scales; MBQ's modality token weights in the Hessian)
    rotation         "none"; "residual": the residual stream was rotated offline (random Hadamard, norms
                     folded: nothing to do at run time); "full": also an online Hadamard before down_proj
    online_hadamard  block size (a power of two) of the online Hadamard the runtime applies to the inputs
                     of every ``down_proj`` layer (0: none; set exactly with rotation "full")
    """

    VERSION = 1
    bits: Literal[3, 4, 8] = 4
    group_size: int = 128
    act_bits: Literal[8, 16] = 16
    zero_point: bool | None = None  # None: the scheme's own (weight-only asymmetric, A8 symmetric)
    modules_to_not_convert: list = dataclasses.field(default_factory=lambda: list(DEFAULT_SKIP))
    baseline: Literal["rtn", "awq", "mbq", "gptq", "awq-gptq", "mbq-gptq"] = "mbq"
    rotation: Literal["none", "residual", "full"] = "none"
    online_hadamard: int = 0

    def validate(self) -> None:
        if self.zero_point is None:
            self.zero_point = self.act_bits == 16
        oh = self.online_hadamard
        if not isinstance(oh, int) or oh < 0 or (oh & (oh - 1)):
            raise ConfigError(f"MBQConfig.online_hadamard must be 0 or a power of two, got {oh!r}")
        if (self.rotation == "full") != (oh > 0):
            raise ConfigError(f"MBQConfig: rotation {self.rotation!r} with online_hadamard={oh} (an online Hadamard "
                              "block is set exactly when rotation is 'full')")
        if self.act_bits == 8 and self.zero_point:
            raise ConfigError("MBQConfig: W4A8/W8A8 weights are symmetric per output channel (zero_point must be false)")
        if self.act_bits == 16:
            if self.bits not in (3, 4):
                raise ConfigError(f"MBQConfig: weight-only schemes use bits 3 or 4, got bits={self.bits}")
            if self.group_size <= 0 or self.group_size % 32:
                raise ConfigError(f"MBQConfig.group_size must be a positive multiple of 32, got {self.group_size}")
            if not self.zero_point:
                raise ConfigError("MBQConfig: weight-only schemes are asymmetric (zero_point must be true)")
        elif self.bits not in (4, 8):
            raise ConfigError(f"MBQConfig: act_bits=8 schemes are W4A8 or W8A8, got bits={self.bits}")

    @property
    def scheme(self) -> str:
        return f"W{self.bits}" if self.act_bits == 16 else f"W{self.bits}A{self.act_bits}"
