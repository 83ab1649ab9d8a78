"""The R2R router network, its checkpoint folder, and the small model's embedding it reads.

Network (R2R's hidden-state + token + logits classifier, re-derived from its description):

    e = E[token]                         frozen input embedding of the sampled token (small model's table)
    l = W_l topk_logits + b_l            the k largest raw logits, sorted descending, projected to d
    x = W_in [hidden; e; l] + b_in       hidden: the small model's last hidden state (after the final norm)
    x = x + Drop(W_2 GELU(W_1 LN(x)))    num_blocks pre-LayerNorm residual blocks (width -> expansion*width)
    z = w_out LN(x) + b_out              the router logit; P(route) = sigmoid(z)

Everything runs in float32. The embedding table is read from the small checkpoint's safetensors (by
the tensor name recorded at training) and checked against the recorded SHA-256.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from overdrive.checkpoint import atomic_directory, checkpoint_shards
from overdrive.config import ConfigError
from overdrive.contracts.token_routing import RouterInputs

from .config import CONFIG_FILE, WEIGHTS_FILE, R2RRouterConfig

#: tensor names of input-embedding tables, most specific first
_EMBEDDING_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                    "transformer.wte.weight", "embed_tokens.weight")


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class R2RRouterNet(nn.Module):
    """The trainable part of the router (the embedding table is passed in, frozen)."""

    def __init__(self, cfg: R2RRouterConfig, hidden_size: int, embed_dim: int) -> None:
        super().__init__()
        self.logits_proj = nn.Linear(cfg.topk, hidden_size)
        self.input = nn.Linear(2 * hidden_size + embed_dim, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.expansion * cfg.width, cfg.dropout)
                                    for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 1)

    def forward(self, hidden: torch.Tensor, topk_logits: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        x = self.input(torch.cat([hidden, token_embedding, self.logits_proj(topk_logits)], dim=-1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).squeeze(-1)


class R2RRouter:
    """A loaded router (implements :class:`overdrive.contracts.token_routing.Router`)."""

    def __init__(self, cfg: R2RRouterConfig, net: R2RRouterNet, embedding: torch.Tensor) -> None:
        self.cfg = cfg
        self.net = net.float().eval()
        self.embedding = embedding.float()
        self.topk = cfg.topk
        self.threshold = cfg.threshold

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @torch.no_grad()
    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        k = inputs.topk_logits.shape[1]
        if k < self.topk:
            raise ValueError(f"router reads the top {self.topk} logits, got {k}")
        dev = self.device
        token = inputs.token.to(dev, torch.long)
        return self.net(inputs.hidden.to(dev, torch.float32), inputs.topk_logits[:, :self.topk].to(dev, torch.float32),
                        self.embedding[token]).float()


# ------------------------------------------------------------------------------ small model side
def _shard_keys(model: Path) -> dict[str, Path]:
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for shard in checkpoint_shards(Path(model), option="the small model"):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                keys[k] = shard
    return keys


def read_embedding(model: Path, name: str | None = None) -> tuple[str, torch.Tensor]:
    """(tensor name, table) of the small model's input embedding, as stored (dtype unchanged)."""
    from safetensors import safe_open

    keys = _shard_keys(model)
    names = [name] if name else [n for n in _EMBEDDING_NAMES if n in keys]
    if not names or names[0] not in keys:
        want = name or " or ".join(_EMBEDDING_NAMES)
        raise ConfigError(f"{model}: no input-embedding tensor {want} in its safetensors")
    with safe_open(str(keys[names[0]]), framework="pt") as f:
        return names[0], f.get_tensor(names[0])


def tensor_sha256(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().view(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.contiguous().view(-1)
    return hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()


def small_model_identity(model: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """(identity dict for :attr:`R2RRouterConfig.small_model`, embedding table) of a checkpoint."""
    conf = json.loads((Path(model) / "config.json").read_text())
    text = conf.get("text_config", conf)
    name, emb = read_embedding(model)
    ident = {"architecture": (conf.get("architectures") or ["?"])[0],
             "hidden_size": int(text["hidden_size"]), "vocab_size": int(text["vocab_size"]),
             "embedding": name, "embedding_shape": list(emb.shape), "embedding_sha256": tensor_sha256(emb)}
    return ident, emb


def check_small_model(cfg: R2RRouterConfig, model: Path, source: str) -> torch.Tensor:
    """The embedding table of ``model`` if it is the small model ``cfg`` was trained for; else ConfigError."""
    want = cfg.small_model
    if not want:
        raise ConfigError(f"{source}: the router config has no small_model identity (not a trained router)")
    name, emb = read_embedding(model, want["embedding"])
    if list(emb.shape) != list(want["embedding_shape"]) or tensor_sha256(emb) != want["embedding_sha256"]:
        raise ConfigError(
            f"{source}: this router was trained for another small model ({want['architecture']}, embedding "
            f"{want['embedding_shape']}, sha256 {want['embedding_sha256'][:12]}...); {model} has embedding "
            f"{list(emb.shape)} with a different content. Pass the small model the router was trained with.")
    return emb


# ------------------------------------------------------------------------------------ checkpoint
def load_config(router_dir: str | Path) -> R2RRouterConfig:
    router_dir = Path(router_dir)
    if not (router_dir / CONFIG_FILE).is_file() or not (router_dir / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{router_dir}: not an R2R router folder (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
                          "make one with `overdrive calibrate --method r2r`)")
    return R2RRouterConfig.load(router_dir / CONFIG_FILE)


def save_router(output: str | Path, cfg: R2RRouterConfig, net: R2RRouterNet) -> Path:
    """Write ``output`` (must not exist) atomically: config.json + router.safetensors."""
    from safetensors.torch import save_file

    output = Path(output)
    with atomic_directory(output) as tmp:
        state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "overdrive": "r2r-router"})
        cfg.save(tmp / CONFIG_FILE)
    return output


def load_router(router_dir: str | Path, small_model: str | Path, device: str | torch.device = "cpu") -> R2RRouter:
    """The router in ``router_dir`` with the embedding of ``small_model`` (checked), in eval mode."""
    from safetensors.torch import load_file

    router_dir = Path(router_dir)
    cfg = load_config(router_dir)
    emb = check_small_model(cfg, Path(small_model), str(router_dir))
    net = R2RRouterNet(cfg, cfg.hidden_size, emb.shape[1])
    state = load_file(str(router_dir / WEIGHTS_FILE))
    expected = net.state_dict()
    bad = sorted(set(expected) ^ set(state))
    if bad:
        raise ConfigError(f"{router_dir / WEIGHTS_FILE}: tensors {bad[:6]} do not match the router described by "
                          f"{CONFIG_FILE} (width {cfg.width}, {cfg.num_blocks} blocks, top-{cfg.topk})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConfigError(f"{router_dir / WEIGHTS_FILE}: tensor {k!r} is {tuple(v.shape)}, "
                              f"expected {tuple(expected[k].shape)} from {CONFIG_FILE}")
    net.load_state_dict(state)
    return R2RRouter(cfg, net.to(device), emb.to(device))


def init_net(cfg: R2RRouterConfig, hidden_size: int, embed_dim: int, seed: int = 0) -> R2RRouterNet:
    """A freshly initialised router network (seeded)."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        net = R2RRouterNet(cfg, hidden_size, embed_dim)
    # the head starts at the logit of a small positive rate so early training is not dominated by it
    with torch.no_grad():
        net.head.bias.fill_(math.log(0.1 / 0.9))
    return net
