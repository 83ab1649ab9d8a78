"""vLLM registration when overdrive's tested range for vLLM is made to exclude the installed version."""
import dataclasses

import overdrive.adapters as a

a.ADAPTERS = tuple(dataclasses.replace(x, tested=">=99") if x.framework == "vllm" else x for x in a.ADAPTERS)

from vllm.model_executor.layers import quantization as q  # noqa: E402

from overdrive.adapters import vllm as adapter  # noqa: E402
from overdrive.testing.probe import emit  # noqa: E402

adapter.register()
emit({"registered": "example_w8" in q.QUANTIZATION_METHODS})
