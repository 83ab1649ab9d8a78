"""A real-weight MoE testbed: SmolLM2-135M turned into a Mixtral-architecture MoE by MoEfication.

No trained MoE model can be downloaded here, and random-weight MoEs route almost uniformly, so expert
pruning on them shows mechanics, not quality. :func:`moefied_smollm2` splits every MLP of the real
SmolLM2-135M-Instruct (:func:`overdrive.testing.real.smollm2_135m`) into ``experts`` experts and trains a
router per layer:

1. calibration text (the First Book of *Opticks*, :func:`~overdrive.testing.real.opticks_split`) runs
   through the dense model; each layer's MLP input ``x`` and neuron activations
   ``a = silu(gate x) * (up x)`` are recorded;
2. the layer's neurons are clustered by co-activation (balanced k-means on their normalised |a| over
   the calibration tokens), giving ``experts`` groups of equal size; expert ``e`` holds its neurons'
   rows of gate/up and columns of down (scaled by ``top_k``: with uniform routing weights the top-k
   experts then sum exactly as the dense MLP's neurons did);
3. a linear router per layer is trained (Adam, cross-entropy) to predict each expert's share of the
   layer's output mass ``|a_n| * ||down[:, n]||``, then scaled down (``ROUTER_SCALE``) so the
   renormalised top-k weights stay close to uniform: routing is informative (which experts), the
   mixing is nearly the dense sum.

With ``top_k = experts`` the testbed is the dense model up to the near-uniform weights; with fewer active
experts it loses real quality (measured in docs/benchmarks). The checkpoint is a standard Mixtral
checkpoint (untied LM head) that transformers and vLLM load. Slow: benchmarks and slow tests only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .cache import cached_build

BUILDER_VERSION = 1
#: multiplies the trained router's logits (small: near-uniform top-k weights, see the module docstring)
ROUTER_SCALE = 0.25


def moefied_smollm2(experts: int = 8, top_k: int = 6, calib_tokens: int = 4096, seq_len: int = 256,
                    seed: int = 0) -> Path:
    """Folder of the MoEfied SmolLM2-135M (Mixtral architecture, ``experts`` experts, ``top_k`` active)."""
    from .real import SMOLLM2

    params = {"builder": "moefied_smollm2", "version": BUILDER_VERSION, "experts": experts, "top_k": top_k,
              "calib_tokens": calib_tokens, "seq_len": seq_len, "seed": seed, "router_scale": ROUTER_SCALE,
              "source": SMOLLM2["sha256"]}
    return cached_build(f"moefied-smollm2-e{experts}k{top_k}", params,
                        lambda out: _build(out, experts, top_k, calib_tokens, seq_len, seed))


def balanced_kmeans(features: torch.Tensor, clusters: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Cluster rows of ``features`` (n, d) into ``clusters`` groups of exactly n / clusters rows
    (cosine similarity; each round assigns the most confident (row, cluster) pairs first)."""
    n = features.shape[0]
    if n % clusters:
        raise ValueError(f"{n} neurons do not split into {clusters} equal experts")
    cap = n // clusters
    f = torch.nn.functional.normalize(features, dim=1)
    cent = f[torch.randperm(n, generator=gen)[:clusters]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = f @ cent.T  # (n, clusters)
        order = torch.argsort(sim.flatten(), descending=True)
        taken = torch.zeros(n, dtype=torch.bool)
        room = torch.full((clusters,), cap)
        for flat in order.tolist():
            i, c = divmod(flat, clusters)
            if taken[i] or room[c] == 0:
                continue
            assign[i], taken[i] = c, True
            room[c] -= 1
            if bool(taken.all()):
                break
        cent = torch.stack([torch.nn.functional.normalize(f[assign == c].mean(0), dim=0) for c in range(clusters)])
    return assign


def _build(out: Path, experts: int, top_k: int, calib_tokens: int, seq_len: int, seed: int) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real import opticks_split, smollm2_135m

    src = smollm2_135m()
    tok = AutoTokenizer.from_pretrained(src)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    cfg = dense.config
    text = opticks_split()[0]
    ids = torch.tensor(tok(text)["input_ids"][: calib_tokens])
    batches = ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    layers = dense.model.layers
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for i, layer in enumerate(layers)]
    with torch.inference_mode():
        for b in batches:
            dense(b[None])
    for h in hooks:
        h.remove()
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    sd["lm_head.weight"] = dense.get_output_embeddings().weight.detach().clone()
    inter = cfg.intermediate_size
    for i, layer in enumerate(layers):
        x = torch.cat(inputs[i]).float()
        mlp = layer.mlp
        with torch.no_grad():
            a = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # (N, inter)
            out_norm = mlp.down_proj.weight.norm(dim=0)  # (inter,)
            mass = a.abs() * out_norm
        assign = balanced_kmeans(a.abs().T.contiguous(), experts, iters=8, gen=gen)
        share = torch.stack([mass[:, assign == e].sum(1) for e in range(experts)], dim=1)
        share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
        router = torch.nn.Linear(x.shape[1], experts, bias=False)
        torch.nn.init.zeros_(router.weight)
        opt = torch.optim.Adam(router.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            loss = -(share * torch.log_softmax(router(x), dim=-1)).sum(1).mean()
            loss.backward()
            opt.step()
        prefix = f"model.layers.{i}.block_sparse_moe"
        sd[f"{prefix}.gate.weight"] = (router.weight.detach() * ROUTER_SCALE).contiguous()
        for e in range(experts):
            idx = (assign == e).nonzero().flatten()
            sd[f"{prefix}.experts.{e}.w1.weight"] = mlp.gate_proj.weight[idx].detach().clone()
            sd[f"{prefix}.experts.{e}.w3.weight"] = mlp.up_proj.weight[idx].detach().clone()
            sd[f"{prefix}.experts.{e}.w2.weight"] = (mlp.down_proj.weight[:, idx] * top_k).detach().contiguous()
    conf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": cfg.hidden_size,
            "intermediate_size": inter // experts, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"],
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "num_local_experts": experts,
            "num_experts_per_tok": top_k, "router_aux_loss_coef": 0.0, "output_router_logits": False,
            "sliding_window": None, "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "torch_dtype": "float32", "overdrive_moefication": {"source": "SmolLM2-135M-Instruct", "experts": experts,
                                                                "top_k": top_k, "router_scale": ROUTER_SCALE}}
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")) or f.suffix == ".jinja":
            shutil.copy2(f, out / f.name)
