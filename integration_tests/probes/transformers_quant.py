"""transformers loads an example_w8 checkpoint through overdrive's registered quantizer (fresh process:
the quantizer registry is process-global) next to the same checkpoint dequantized to float32."""
import tempfile
from pathlib import Path

import torch
from overdrive_example.configs import W8Config
from overdrive_example.w8 import dequantize_checkpoint, quantize_checkpoint

from overdrive.testing import tiny_llama
from overdrive.testing.probe import emit

d = Path(tempfile.mkdtemp())
q = quantize_checkpoint(tiny_llama(), d / "q", W8Config())
ref_dir = dequantize_checkpoint(q, d / "ref")

import overdrive.transformers  # noqa: E402,F401  (registers the quantizers)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING  # noqa: E402

tok = AutoTokenizer.from_pretrained(q)
model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
ids = tok(["the quick brown fox", "hello world, this is"], return_tensors="pt", padding=True)


def greedy(m):
    out = m.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return out[:, ids.input_ids.shape[1]:].tolist()


with torch.no_grad():
    err = (model(**ids).logits.double() - ref(**ids).logits.double()).abs().max().item()
qproj = model.model.layers[0].self_attn.q_proj
emit({"tokens": greedy(model), "ref": greedy(ref), "err": err,
      "layer": type(qproj).__name__, "qweight": str(qproj.qweight.dtype),
      "lm_head": type(model.lm_head).__name__,
      "registered": AUTO_QUANTIZER_MAPPING["example_w8"].__name__})
