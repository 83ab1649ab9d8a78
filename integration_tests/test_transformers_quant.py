"""transformers loads an overdrive checkpoint through the registered quantizer and generates.

Runs in a subprocess: transformers' quantizer registry is process-global and registration is once
per process. Reference: the same checkpoint dequantized to float32 nn.Linear weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, sys, tempfile, torch
    from pathlib import Path
    from overdrive.testing import tiny_llama
    from overdrive_example.configs import W8Config
    from overdrive_example.w8 import quantize_checkpoint, dequantize_checkpoint
    d = Path(tempfile.mkdtemp())
    q = quantize_checkpoint(tiny_llama(), d / "q", W8Config())
    ref_dir = dequantize_checkpoint(q, d / "ref")
    import overdrive.transformers  # registers the quantizers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    tok = AutoTokenizer.from_pretrained(q)
    model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    ids = tok(["the quick brown fox", "hello world, this is"], return_tensors="pt", padding=True)
    gen = lambda m: m.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, ids.input_ids.shape[1]:].tolist()
    with torch.no_grad():
        err = (model(**ids).logits.double() - ref(**ids).logits.double()).abs().max().item()
    qproj = model.model.layers[0].self_attn.q_proj
    print(json.dumps({"tokens": gen(model), "ref": gen(ref), "err": err,
                      "layer": type(qproj).__name__, "qweight": str(qproj.qweight.dtype),
                      "lm_head": type(model.lm_head).__name__,
                      "registered": AUTO_QUANTIZER_MAPPING["example_w8"].__name__}))
""")


def test_transformers_loads_and_generates_through_registered_quantizer(plugin_env):
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **plugin_env})
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["registered"] == "OverdriveExampleW8HfQuantizer"
    assert out["layer"] == "OverdriveLinear" and out["qweight"] == "torch.int8"
    assert out["lm_head"] == "Linear"  # skipped by the method's config: stays a plain layer
    assert out["err"] < 1e-4
    assert out["tokens"] == out["ref"]
