"""The KV-cache contract (overdrive.contracts.kv_cache) and the generic adapters built on it: vocabulary
closed forms, validation messages, the default query/key transform and its weight fold vs float64, the
generic transformers cache with a dense method vs transformers' own cache, and the rule that KV adapters
name no method."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import overdrive
from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import (HeadSpans, KVCacheMethod, LayerKVFormat, ModelIdentity, PagedGeometry,
                                         fold_qk_scale)
from overdrive.kinds import Kind

ADAPTERS = Path(overdrive.__file__).resolve().parents[1] / "adapters"
KV_ADAPTERS = ["_kv_cache.py", "vllm/kv_cache.py", "vllm/kv_backend.py", "sglang/kv_cache.py",
               "transformers/kv_cache.py", "transformers/kv_spans.py"]


def fmt(**kw) -> LayerKVFormat:
    base = dict(layer=0, num_kv_heads=2, head_size=32, bits=4, group=32, sink=1, window=4, cell_bytes=48)
    return LayerKVFormat(**{**base, **kw})


def test_window_and_flush_ranges_follow_the_chunk_rule():
    f = fmt(sink=1, window=4)
    # positions [1, 5), [5, 9) ... are flushed once complete
    assert [f.window_start(n) for n in (0, 1, 2, 4, 5, 6, 9, 13)] == [1, 1, 1, 1, 5, 5, 9, 13]
    # growing 3 -> 7 completes the chunk [1, 5); 7 -> 8 flushes nothing; 8 -> 9 flushes [5, 9)
    assert list(f.flush_range(3, 7)) == [1, 2, 3, 4]
    assert list(f.flush_range(7, 8)) == [] and list(f.flush_range(8, 9)) == [5, 6, 7, 8]
    # no window: everything past the sink leaves full precision in the step that brought it
    g = fmt(sink=2, window=0)
    assert list(g.flush_range(0, 5)) == [2, 3, 4] and list(g.flush_range(5, 6)) == [5]
    assert list(g.flush_range(0, 1)) == []  # still inside the sink
    # dense formats never compress and need no store
    d = fmt(bits=0, cell_bytes=0, sink=2, window=0)
    assert list(d.flush_range(0, 9)) == [] and d.dense and not d.uses_fp_store
    assert fmt().uses_fp_store and not fmt(sink=0, window=0).uses_fp_store
    assert fmt(head_size=48).fp_store_channels == 96


@pytest.mark.parametrize("kw, message", [
    ({"cell_bytes": 30}, "cell_bytes must be a non-negative multiple of 4, got 30"),
    ({"sink": -1}, r"sink \(-1\) and window \(4\) must be >= 0"),
    ({"q_scale": torch.ones(3, 32)}, r"q_scale has shape \(3, 32\), expected \(2, 32\)"),
    ({"head_spans": (5,)}, "head_spans must be a HeadSpans, got tuple"),
    ({"head_spans": HeadSpans((5.0,), (0.5,), 4), "bits": 0, "cell_bytes": 0}, "head_spans has 1 entries for 2 KV heads"),
    ({"head_spans": HeadSpans((5.0, 5.0), (0.5, 0.5), 4)}, "head_spans need dense storage"),
    ({"head_spans": HeadSpans((5.0, 5.0), (0.5, 0.5), 4), "bits": 0, "cell_bytes": 0, "sink": 6},
     "min_span 4 is below the sink"),
])
def test_format_validation_names_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        fmt(**kw)


def test_paged_geometry_problems():
    g = PagedGeometry(head_sizes=tuple(range(32, 513, 32)), block_multiple=16)
    assert g.problems(64, 32) == []
    assert g.problems(80, 24) == ["--block-size 24 is not a multiple of 16, which its kernels need",
                                  "head size 80 is not one its kernels take (32..512 in steps of 32)"]
    assert PagedGeometry().problems(81, 7) == []


@pytest.mark.parametrize("hk, tp", [(4, 1), (4, 2), (4, 4), (2, 4), (1, 2), (2, 8)])
def test_kv_heads_per_rank(hk, tp):
    ident = ModelIdentity("M", 2, 8, hk, 32)
    got = [ident.kv_heads_for_rank(r, tp) for r in range(tp)]
    if tp <= hk:  # an even split covering every head once
        assert [h for first, n in got for h in range(first, first + n)] == list(range(hk))
    else:  # replicated: each head on tp / hk consecutive ranks
        assert [first for first, _ in got] == [r * hk // tp for r in range(tp)] and {n for _, n in got} == {1}
    with pytest.raises(ConfigError, match="3 KV heads cannot be split over tensor-parallel size 2"):
        ModelIdentity("M", 2, 6, 3, 32).kv_heads_for_rank(0, 2)


class _Dense(KVCacheMethod):
    """A minimal method of the kind for contract tests: dense storage (bits 0), optional q_scale."""

    def __init__(self, q_scale=None) -> None:
        self.q_scale = q_scale

    def load_config(self, source):
        raise NotImplementedError

    def layer_formats(self, cfg, model, *, tp_rank=0, tp_size=1):
        return [LayerKVFormat(i, model.num_kv_heads, model.head_size, 0, model.head_size, 0, 0, 0,
                              q_scale=None if self.q_scale is None else self.q_scale[i])
                for i in range(model.num_layers)]

    def store(self, fmt, pages, batch, k, v):
        raise NotImplementedError

    def attend(self, fmt, pages, batch, q, k, v, scale, fp_pool=None):
        raise NotImplementedError


def test_default_transform_qk_keeps_scores_and_matches_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 16, generator=g, dtype=torch.float64) + 0.5
    f = fmt(head_size=16, group=16, q_scale=s.float())
    q, k = torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g)  # GQA: 2 query heads per KV head
    q2, k2 = _Dense().transform_qk(f, q, k)
    sq = s.float().repeat_interleave(2, 0)
    assert torch.allclose(q2.double(), q.double() * sq.double(), rtol=1e-6)
    assert torch.allclose(k2.double(), k.double() / s.float().double(), rtol=1e-6)
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k.double().repeat_interleave(2, 1))
    scores2 = torch.einsum("nhd,mhd->hnm", q2.double(), k2.double().repeat_interleave(2, 1))
    assert torch.allclose(scores, scores2, atol=1e-5)
    assert _Dense().transform_qk(fmt(), q, k) == (q, k)  # no q_scale: identity


def test_fold_qk_scale_equals_the_runtime_transform_in_float64():
    g = torch.Generator().manual_seed(1)
    hq, hk, d, hidden = 4, 2, 8, 24
    qp, kp = torch.nn.Linear(hidden, hq * d).double(), torch.nn.Linear(hidden, hk * d).double()
    x = torch.randn(3, hidden, generator=g, dtype=torch.float64)
    q0, k0 = qp(x).view(3, hq, d), kp(x).view(3, hk, d)
    s = torch.rand(hk, d, generator=g, dtype=torch.float64) + 0.5
    fold_qk_scale(qp, kp, s)
    want_q, want_k = _Dense().transform_qk(fmt(head_size=d, group=d, q_scale=s.float()), q0, k0)
    assert torch.allclose(qp(x).view(3, hq, d), q0 * s.repeat_interleave(2, 0), rtol=1e-12)
    assert torch.allclose(kp(x).view(3, hk, d), k0 / s, rtol=1e-12)
    assert torch.allclose(qp(x).view(3, hq, d), want_q, rtol=1e-6)
    with pytest.raises(ConfigError, match="does not fit projections"):
        fold_qk_scale(qp, kp, torch.ones(3, d))


def test_kv_adapters_name_no_method():
    """N + M: the KV adapters know the contract, not the methods (no built-in or example method name)."""
    names = [s.name for s in overdrive.list_methods(Kind.KV_CACHE)] + ["pmkvq", "pm-kvq", "example_int8kv", "int8kv"]
    for f in KV_ADAPTERS:
        text = (ADAPTERS / f).read_text().lower()
        found = [n for n in names if re.search(rf"\b{re.escape(n)}\b", text)]
        assert not found, f"adapters/{f} names method(s) {found}"


def test_sglang_kv_adapter_does_not_import_the_vllm_adapter():
    tree = ast.parse((ADAPTERS / "sglang/kv_cache.py").read_text())
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if "vllm" in m], mods


@pytest.fixture(scope="module")
def llama():
    from transformers import AutoModelForCausalLM

    from overdrive.testing import tiny_llama

    return AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).eval()


def test_generic_cache_with_a_dense_method_equals_dynamic_cache(llama):
    """A dense method (bits 0) through the generic cache: the same logits as transformers' DynamicCache,
    prefill and decode steps (the cache returns every position at full precision)."""
    from transformers import DynamicCache

    from overdrive.adapters.transformers.kv_cache import OverdriveKVCache

    ident = ModelIdentity.from_hf_config(llama.config)
    method = _Dense()
    cache = OverdriveKVCache(method, method.layer_formats(None, ident), "dense")
    ref = DynamicCache(config=llama.config)
    ids = torch.randint(0, llama.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in [(0, 7), (7, 8), (8, 9), (9, 12)]:
            got = llama(ids[:, a:b], past_key_values=cache, use_cache=True).logits
            want = llama(ids[:, a:b], past_key_values=ref, use_cache=True).logits
            assert torch.equal(got, want), (a, b)
    assert cache.get_seq_length() == 12 and cache.layers[0].body is None


def test_transformers_adapter_rejects_a_custom_transform_qk_and_unfoldable_scales(llama):
    from overdrive.adapters.transformers.kv_cache import fold_q_scales

    ident = ModelIdentity.from_hf_config(llama.config)

    class Rotating(_Dense):
        def transform_qk(self, fmt, q, k):
            return q.flip(-1), k.flip(-1)

    with pytest.raises(ConfigError, match="overrides transform_qk; the transformers cache never sees queries"):
        fold_q_scales(llama, Rotating(), Rotating().layer_formats(None, ident), "rotating")
    d = ident.head_size
    broken = torch.ones(ident.num_layers, ident.num_kv_heads, d)
    broken[0, 0, 0] = 2.0  # channel 0 differs from its rotary partner d/2
    m = _Dense(broken)
    with pytest.raises(ConfigError, match=f"layer 0 q_scale differs between channels c and c \\+ {d // 2}"):
        fold_q_scales(llama, m, m.layer_formats(None, ident), "broken")
