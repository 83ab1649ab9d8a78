"""Quality evidence for MBQ vs AWQ vs RTN (a benchmark script, not a test).

    python -m overdrive.benchmarks.mbq_quality [--model DIR] [--json OUT]

For each scheme (W3, W4, W4A8, W8A8) and baseline (rtn, awq, mbq): calibrate a copy of the float model on the
calibration records, report MBQ's vision-weighted calibration objective for the chosen scales, fake-quantize its decoder linears (round to nearest after folding the scales),
and compare with the float model on held-out records: relative error of the last decoder hidden
states on vision tokens and on answer (text) tokens, mean |logit error| on answer tokens, and how
often the argmax next token agrees. Default model: the tiny random-weight Qwen2.5-VL fixture, which
shows that the pipeline works and how the weighting moves errors between modalities; it cannot show
task accuracy (random weights have no task), which needs a real checkpoint and an eval set.
"""
from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header

from overdrive.adapters.transformers.calibration import decoder_layers as _decoder_layers
from overdrive.contracts.llm_calibration import load_for_calibration
from overdrive.mbq import calibrate as _cal
from overdrive.mbq.awq import layer_groups, loss
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.data import build_samples, builtin_records
from overdrive.mbq.quant import fake_quant_act, fake_quant_weight


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return _decoder_layers(model)[1]


def _on_run(fn: Any, model: torch.nn.Module, *args: Any, **kw: Any) -> Any:
    run = load_for_calibration(model, device="cpu", compute_dtype=torch.float32)
    try:
        return fn(run, *args, **kw)
    finally:
        run.close()


def calibrate(model: torch.nn.Module, samples: Any, cfg: MBQConfig) -> Any:
    return _on_run(_cal.calibrate, model, samples, cfg)


@torch.no_grad()
def _fake_quantize(model: torch.nn.Module, cfg: MBQConfig) -> None:
    for layer in decoder_layers(model):
        for g in layer_groups(layer):
            for lin in g.linears:
                lin.weight.copy_(fake_quant_weight(lin.weight, cfg))
                if cfg.act_bits == 8:
                    lin.register_forward_pre_hook(lambda _m, args: (fake_quant_act(args[0]), *args[1:]))


@torch.no_grad()
def vision_weighted_objective(model: torch.nn.Module, samples, cfg: MBQConfig, ratios) -> float:
    """MBQ's calibration objective summed over all groups, for the scales folded into ``model``.

    Folding is function-preserving in float, so every baseline's folded model sees the same block
    inputs; each group's quantized output error is weighted per token as MBQ weighs it (caption 1,
    vision r, others 0).
    """
    total = 0.0
    for i, layer in enumerate(decoder_layers(model)):
        groups = layer_groups(layer)
        feats: dict[str, list[torch.Tensor]] = {}
        hs = [g.linears[0].register_forward_hook(
            lambda m, inp, out, name=g.name: feats.setdefault(name, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
            for g in groups]
        for smp in samples:
            model(**smp.inputs, use_cache=False)
        for h in hs:
            h.remove()
        for g in groups:
            x = torch.cat(feats[g.name]).float()
            if cfg.act_bits == 8:
                xq = fake_quant_act(x)
            else:
                xq = x
            ref = torch.cat([torch.nn.functional.linear(x, l.weight.float()) for l in g.linears], -1)
            out = torch.cat([torch.nn.functional.linear(xq, fake_quant_weight(l.weight.float(), cfg)) for l in g.linears], -1)
            tok_w = torch.cat([_cal._token_weights(smp, g.branch, ratios[i]) for smp in samples])
            total += loss(out, ref, tok_w, "mae")
    return total


@torch.no_grad()
def _outputs(model: torch.nn.Module, samples) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for s in samples:
        r = model(**s.inputs, output_hidden_states=True)
        out.append((r.hidden_states[-1][0].double(), r.logits[0].double()))
    return out


def evaluate(model_dir: Path, group_size: int = 64, n_calib: int = 6) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from overdrive.testing.vlm import sample_image

    proc = AutoProcessor.from_pretrained(model_dir)
    fp = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    vision_ids = [fp.config.image_token_id, fp.config.video_token_id]
    records = builtin_records(with_images=True)
    calib = build_samples(proc, records[:n_calib], vision_ids)
    held = [dict(r, image=sample_image(seed=100 + i)) for i, r in enumerate(records[n_calib:] + records[:2])]
    evals = build_samples(proc, held, vision_ids)
    ref = _outputs(fp, evals)
    ratios = _on_run(_cal.gradient_ratios, copy.deepcopy(fp), calib)
    rows = []
    for bits, act_bits in ((3, 16), (4, 16), (4, 8), (8, 8)):
        for baseline in ("rtn", "awq", "mbq"):
            cfg = MBQConfig(bits=bits, group_size=group_size, act_bits=act_bits, baseline=baseline)
            model = copy.deepcopy(fp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calibrate(model, calib, cfg)
            objective = vision_weighted_objective(model, calib, cfg, ratios)
            _fake_quantize(model, cfg)
            got = _outputs(model, evals)
            num = {"vis": 0.0, "cap": 0.0}
            den = {"vis": 0.0, "cap": 0.0}
            logit_err, agree, n_cap = 0.0, 0, 0
            for s, (h, lg), (h0, lg0) in zip(evals, got, ref):
                for key, mask in (("vis", s.vision_mask), ("cap", s.caption_mask)):
                    num[key] += float((h[mask] - h0[mask]).abs().sum())
                    den[key] += float(h0[mask].abs().sum())
                logit_err += float((lg[s.caption_mask] - lg0[s.caption_mask]).abs().mean(-1).sum())
                agree += int((lg[s.caption_mask].argmax(-1) == lg0[s.caption_mask].argmax(-1)).sum())
                n_cap += int(s.caption_mask.sum())
            rows.append({"scheme": cfg.scheme, "baseline": baseline, "mbq_objective": objective,
                         "vision_hidden_rel_err": num["vis"] / den["vis"],
                         "text_hidden_rel_err": num["cap"] / den["cap"],
                         "answer_logit_abs_err": logit_err / n_cap, "answer_argmax_agreement": agree / n_cap})
    return {**header("mbq-quality", "cpu"), "model": str(model_dir),
            "group_size": group_size, "calibration_samples": len(calib), "eval_samples": len(evals), "rows": rows}


def format_table(r: dict[str, Any]) -> str:
    lines = ["| scheme | baseline | MBQ objective (calibration, vision-weighted) | vision hidden rel. err | text hidden rel. err | answer logit abs err | answer argmax agreement |",
             "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['scheme']} | {x['baseline']} | {x['mbq_objective']:.5f} | {x['vision_hidden_rel_err']:.4f} | {x['text_hidden_rel_err']:.4f} "
                     f"| {x['answer_logit_abs_err']:.4f} | {x['answer_argmax_agreement']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.mbq_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a Qwen2-VL-style checkpoint (default: tiny fixture)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.model is None:
        from overdrive.testing import tiny_qwen2_vl

        args.model = tiny_qwen2_vl()
    r = evaluate(args.model, args.group_size)
    print(f"{r['device']}  {r['date']}  model {r['model']}  group {r['group_size']}")
    print(format_table(r))
    if args.json:
        from overdrive.benchmarks import write_json

        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
