"""vLLM registration in a fresh process: idempotent, lazy, in-tree names kept, config picklable."""
import pickle
import sys

from vllm.model_executor.layers import quantization as q

from overdrive.adapters import vllm as adapter
from overdrive.testing.probe import emit

adapter.register()
n = len(q.QUANTIZATION_METHODS)
lazy = "overdrive_example.w8" not in sys.modules  # registration imported no method code
adapter.register()
adapter.register()
cls = q.get_quantization_config("example_w8")
inst = cls.from_config({"quant_method": "example_w8", "skip": ["x"]})
again = pickle.loads(pickle.dumps(inst))  # engines pickle the config into worker processes
emit({"lazy": lazy, "n_same": n == len(q.QUANTIZATION_METHODS),
      "count": q.QUANTIZATION_METHODS.count("example_w8"), "cls": cls.__name__,
      "pickled": type(again) is cls and again.overdrive_cfg == inst.overdrive_cfg,
      "awq_is_ours": getattr(q.get_quantization_config("awq"), "overdrive_method", None)})
