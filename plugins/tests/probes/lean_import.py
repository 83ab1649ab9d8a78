"""Import overdrive, its CLI, contracts and every adapter module, list the methods; emit which engine modules
got imported and whether CUDA was initialised (both must stay empty/false: these modules load in every
engine process through entry points)."""
import sys

import overdrive
import overdrive.adapters
import overdrive.adapters._register
import overdrive.adapters.diffusers
import overdrive.adapters.sglang
import overdrive.adapters.transformers
import overdrive.adapters.vllm
import overdrive.cli
import overdrive.contracts  # noqa: F401
from overdrive.testing.probe import emit

ENGINES = ("vllm", "sglang", "diffusers", "transformers", "triton")

overdrive.list_methods()

import torch  # noqa: E402

emit({"modules": sorted(m for m in sys.modules if m.split(".")[0] in ENGINES),
      "cuda_initialized": torch.cuda.is_initialized()})
