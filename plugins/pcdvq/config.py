"""PCDVQ config: the scheme written into a checkpoint's ``quantization_config``."""
from __future__ import annotations

import dataclasses

from overdrive.config import ConfigError, MethodConfig

#: module-name substrings never quantized
DEFAULT_SKIP = ["visual", "vision", "lm_head", "embed", "merger", "multi_modal_projector"]


@dataclasses.dataclass
class PCDVQConfig(MethodConfig):
    """A PCDVQ scheme.

    direction_bits   k: the direction codebook has 2**k E8 directions (14–16; 1–16 accepted for tests)
    magnitude_bits   bits of the χ(8) Lloyd–Max magnitude code (1–4; 2 in the paper)
    hadamard_block   block of the randomized Hadamard along each layer's input features (a multiple
                     of 8 dividing every quantized layer's input features and every tensor-parallel
                     shard's; not a power of two: Hadamard ⊗ a random orthogonal block, as in QuIP#)
    seed             seed of the Hadamard signs and mixer
    codebook_samples Gaussian samples of the distribution-aligned codebook selection
    codebook_digest  fingerprint of the direction codebook the checkpoint was quantized with ("" = unset)
    modules_to_not_convert  module-name substrings left in 16 bits
    """

    VERSION = 1
    direction_bits: int = 14
    magnitude_bits: int = 2
    hadamard_block: int = 64
    seed: int = 0
    codebook_samples: int = 1 << 15
    codebook_digest: str = ""
    modules_to_not_convert: list = dataclasses.field(default_factory=lambda: list(DEFAULT_SKIP))

    def validate(self) -> None:
        if not 1 <= self.direction_bits <= 16:
            raise ConfigError(f"PCDVQConfig.direction_bits must be in 1..16 (14-16 in practice), got {self.direction_bits}")
        if self.magnitude_bits not in (1, 2, 4):
            raise ConfigError(f"PCDVQConfig.magnitude_bits must be 1, 2 or 4, got {self.magnitude_bits}")
        if self.hadamard_block <= 0 or self.hadamard_block % 8:
            raise ConfigError(f"PCDVQConfig.hadamard_block must be a positive multiple of 8, got {self.hadamard_block}")
        if self.codebook_samples < 1024:
            raise ConfigError(f"PCDVQConfig.codebook_samples must be >= 1024, got {self.codebook_samples}")

    @property
    def bits_per_weight(self) -> float:
        """Code bits per weight: (direction_bits + magnitude_bits) / 8 (per-row scales not counted)."""
        return (self.direction_bits + self.magnitude_bits) / 8

    @property
    def mags_per_byte(self) -> int:
        return 8 // self.magnitude_bits
