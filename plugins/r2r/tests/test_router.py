"""R2R router network vs a float64 re-derivation, checkpoint round trip, and the small-model checks."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from overdrive.config import ConfigError
from overdrive.contracts.token_routing import RouterInputs
from overdrive.r2r.config import R2RRouterConfig
from overdrive.r2r.router import R2RRouter, init_net, load_router, save_router, small_model_identity
from overdrive.testing.llm import tiny_llama


def _reference(state: dict[str, torch.Tensor], blocks: int, hidden, topk, emb) -> torch.Tensor:
    """The network written out in float64 from its description (module docstring of overdrive.r2r.router)."""
    s = {k: v.double() for k, v in state.items()}

    def lin(x, name):
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * s[f"{name}.weight"] + s[f"{name}.bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    x = lin(torch.cat([hidden.double(), emb.double(), lin(topk.double(), "logits_proj")], -1), "input")
    for i in range(blocks):
        x = x + lin(gelu(lin(ln(x, f"blocks.{i}.norm"), f"blocks.{i}.up")), f"blocks.{i}.down")
    return lin(ln(x, "norm"), "head").squeeze(-1)


@pytest.fixture(scope="module")
def small() -> Path:
    return tiny_llama()


@pytest.fixture(scope="module")
def cfg(small) -> R2RRouterConfig:
    ident, _ = small_model_identity(small)
    return R2RRouterConfig(topk=16, width=32, num_blocks=2, expansion=2, dropout=0.1, threshold=0.3, small_model=ident)


def _inputs(n: int, d: int, k: int, vocab: int, seed: int = 0) -> RouterInputs:
    g = torch.Generator().manual_seed(seed)
    return RouterInputs(torch.randn(n, d, generator=g), torch.randn(n, k, generator=g).sort(-1, descending=True).values,
                        torch.randint(0, vocab, (n,), generator=g))


def test_network_matches_float64_reference(small, cfg):
    ident, emb = small_model_identity(small)
    net = init_net(cfg, ident["hidden_size"], emb.shape[1], seed=3)
    with torch.no_grad():  # non-trivial norms and biases
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    router = R2RRouter(cfg, net, emb)
    x = _inputs(7, ident["hidden_size"], 20, ident["vocab_size"])  # 20 >= topk: only the first 16 are read
    got = router.scores(x)
    ref = _reference(net.state_dict(), cfg.num_blocks, x.hidden, x.topk_logits[:, :16], emb[x.token])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="top 16 logits"):
        router.scores(_inputs(2, ident["hidden_size"], 8, ident["vocab_size"]))


def test_dropout_is_off_when_scoring(small, cfg):
    ident, emb = small_model_identity(small)
    router = R2RRouter(cfg, init_net(cfg, ident["hidden_size"], emb.shape[1]), emb)
    x = _inputs(5, ident["hidden_size"], 16, ident["vocab_size"])
    assert torch.equal(router.scores(x), router.scores(x))


def test_checkpoint_round_trip(tmp_path, small, cfg):
    ident, emb = small_model_identity(small)
    net = init_net(cfg, ident["hidden_size"], emb.shape[1], seed=1)
    out = save_router(tmp_path / "router", cfg, net)
    conf = json.loads((out / "config.json").read_text())
    assert conf["format"] == "overdrive.r2r.router" and conf["threshold"] == 0.3 and conf["topk"] == 16
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "router.safetensors"]
    loaded = load_router(out, small)
    x = _inputs(4, ident["hidden_size"], 16, ident["vocab_size"], seed=5)
    assert torch.equal(loaded.scores(x), R2RRouter(cfg, net, emb).scores(x))
    assert loaded.topk == 16 and loaded.threshold == 0.3
    with pytest.raises(ConfigError, match="already exists"):
        save_router(out, cfg, net)


def test_interrupted_save_leaves_nothing(tmp_path, small, cfg, monkeypatch):
    ident, emb = small_model_identity(small)
    net = init_net(cfg, ident["hidden_size"], emb.shape[1])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(R2RRouterConfig, "save", boom)
    with pytest.raises(OSError):
        save_router(tmp_path / "router", cfg, net)
    assert list(tmp_path.iterdir()) == []


def test_router_for_another_small_model_is_rejected(tmp_path, small, cfg):
    ident, emb = small_model_identity(small)
    out = save_router(tmp_path / "router", cfg, init_net(cfg, ident["hidden_size"], emb.shape[1]))
    other = tmp_path / "other-small"
    shutil.copytree(small, other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.embed_tokens.weight"][3, 5] += 1.0
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="trained for another small model"):
        load_router(out, other)


def test_bad_checkpoints_are_named(tmp_path, small, cfg):
    ident, emb = small_model_identity(small)
    out = save_router(tmp_path / "router", cfg, init_net(cfg, ident["hidden_size"], emb.shape[1]))
    state = load_file(str(out / "router.safetensors"))
    state["head.weight"] = torch.zeros(1, 7)
    save_file(state, str(out / "router.safetensors"))
    with pytest.raises(ConfigError, match="'head.weight' is \\(1, 7\\)"):
        load_router(out, small)
    with pytest.raises(ConfigError, match="not an R2R router folder"):
        load_router(tmp_path, small)
    with pytest.raises(ConfigError, match="threshold"):
        R2RRouterConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="topk 1000 exceeds"):
        cfg.replace(topk=1000)
