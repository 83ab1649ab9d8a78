"""``./run demo``: overdrive end to end on embedded tiny models through the real engines.

The plugin surfaces are driven with the example third-party plugin (examples/third_party_plugin,
installed into a temporary folder exactly as pip would): every registration path, a real vLLM server,
SGLang's real registries, a diffusers pipeline and the kernels; then every built-in method end to end,
each against the unmodified path (MBQ: calibrate the tiny VLM at W3, answer a video question in vLLM
and transformers; FrameFusion, PM-KVQ, MoA, DiTFastAttn, ViDiT-Q, VGDFR, R2R likewise). Each step prints
what it did and what it measured; the exit code is non-zero if any step failed.

    python -m overdrive.benchmarks.demo                      # every step
    python -m overdrive.benchmarks.demo --only moa,r2r       # some steps (repeatable or comma list)
    python -m overdrive.benchmarks.demo --skip vllm mbq      # all but some
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

PROMPTS = ["the quick brown fox", "hello world"]


def _h(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 76 - len(title)), flush=True)


class Demo:
    def __init__(self, workdir: Path) -> None:
        from overdrive.testing.distributions import install_example_plugin

        self.work = workdir
        self.site = install_example_plugin(workdir / "site")
        sys.path.insert(0, str(self.site))
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.site), os.environ.get("PYTHONPATH", "")]),
                    "HF_HUB_OFFLINE": "1", "OVERDRIVE_PROGRESS": "0"}
        self.results: list[tuple[str, bool, str]] = []

    def step(self, title: str, fn: Callable[[], str]) -> None:
        _h(title)
        t0 = time.perf_counter()
        try:
            summary = fn()
            ok = True
        except Exception:  # noqa: BLE001 - the demo reports every step and goes on
            traceback.print_exc()
            summary, ok = "FAILED (traceback above)", False
        dt = time.perf_counter() - t0
        print(f"--> {summary}  [{dt:.1f} s]")
        self.results.append((title, ok, summary))

    # -- steps ----------------------------------------------------------------------------------
    def registry(self) -> str:
        import overdrive
        from overdrive import cli

        overdrive.get_registry(reload=True)
        cli.main(["list"])
        return f"{len(overdrive.list_methods())} methods from entry points: {', '.join(overdrive.get_registry().names())}"

    def doctor(self) -> str:
        from overdrive import cli

        r = cli.doctor_report(try_register=True)
        for f, e in r["frameworks"].items():
            print(f"  {f:13s} {e['message']}" + (f"; registers {e['registers']}" if "registers" in e else ""))
        print(f"  kernels: {r['kernel_backend']}")
        if r["problems"]:
            raise RuntimeError("doctor found problems: " + "; ".join(r["problems"]))
        return "no problems"

    def _vllm_tokens(self, ckpt: Path, trace: Path | None = None) -> tuple[list[list[int]], float]:
        from overdrive.testing.vllm_server import VllmServer

        env = {"PYTHONPATH": self.env["PYTHONPATH"], **({"OVERDRIVE_TRACE": str(trace)} if trace else {})}
        t0 = time.perf_counter()
        with VllmServer(ckpt, ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                        env=env, log_path=self.work / f"vllm-{ckpt.name}.log") as srv:
            startup = time.perf_counter() - t0
            return [srv.greedy_token_ids(p, 8) for p in PROMPTS], startup

    @staticmethod
    def _hf_tokens(path: Path) -> list[list[int]]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import overdrive.transformers  # noqa: F401 - registers overdrive's quantizers

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out = []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out.append(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist())
        return out

    @staticmethod
    def _size_mb(d: Path) -> float:
        return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 1e6

    def vllm(self) -> str:
        from overdrive.testing import tiny_llama
        from overdrive_example.w8 import dequantize_checkpoint

        base = tiny_llama()
        q = self.work / "llama-example_w8"
        subprocess.run([sys.executable, "-m", "overdrive.cli", "quantize", "--method", "example_w8",
                        "--model", str(base), "--output", str(q)], env=self.env, check=True)
        print(f"  quantized {base.name}: {self._size_mb(base):.2f} MB -> {self._size_mb(q):.2f} MB")
        trace = self.work / "trace.jsonl"
        got, startup = self._vllm_tokens(q, trace)
        procs = sorted({(x["pid"], x["process"]) for x in map(json.loads, trace.read_text().splitlines())
                        if x["framework"] == "vllm" and x["registered"]})
        print(f"  vLLM server up in {startup:.1f} s; overdrive registered in {len(procs)} vLLM processes: {procs}")
        via_hf = self._hf_tokens(q)
        want = self._hf_tokens(dequantize_checkpoint(q, self.work / "llama-dequantized"))
        print(f"  vLLM tokens {got}\n  transformers, overdrive quantizer {via_hf}\n  transformers, dequantized reference {want}")
        if not got == via_hf == want:
            raise AssertionError("vLLM, transformers and the reference disagree")
        return (f"vLLM served example_w8 from config.json ({len(procs)} processes registered); "
                "transformers loaded it through overdrive's quantizer; both equal the reference")

    def mbq(self) -> str:
        from overdrive.testing import tiny_qwen2_vl
        from overdrive.testing.answers import transformers_video_answer, vllm_video_answer

        base = tiny_qwen2_vl()
        q = self.work / "qwen2.5-vl-mbq-w3"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "overdrive.cli", "quantize", "--method", "mbq", "--bits", "3",
                        "--group-size", "64", "--model", str(base), "--output", str(q)], env=self.env, check=True)
        print(f"  MBQ W3 g64 calibration (built-in image-caption sample) in {time.perf_counter() - t0:.1f} s: "
              f"{self._size_mb(base):.2f} MB -> {self._size_mb(q):.2f} MB")
        hf = transformers_video_answer(q)
        vl = vllm_video_answer(q, hf["prompt"])
        print(f"  video question -> transformers (overdrive quantizer; decoder {hf['decoder_layer']}, "
              f"vision {hf['vision_layer']}): {hf['tokens']}\n  video question -> vLLM: {vl}")
        if vl != hf["tokens"]:
            raise AssertionError("vLLM and transformers disagree on the MBQ checkpoint")
        return f"MBQ-calibrated W3 Qwen2.5-VL: vLLM and transformers give the same {len(vl)} tokens on a video question"

    def framefusion(self) -> str:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import overdrive.transformers as odt
        from overdrive.testing.framefusion import partly_static_video
        from overdrive.testing.llava import tiny_llava_onevision

        path = tiny_llava_onevision()
        proc = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}]
        inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                      videos=[partly_static_video(0, frames=8)], return_tensors="pt")
        with torch.no_grad():
            before = model(**inputs).logits
        att = odt.enable(model, "framefusion", cost=0.3, similarity_lower_bound=0.9)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        s = att.summaries[-1][0]
        odt.disable(model)
        with torch.no_grad():
            restored = torch.equal(model(**inputs).logits, before)
        print(f"  transformers, tiny LLaVA-OneVision (4 layers), {s['vision_tokens']} video tokens: kept per layer "
              f"{s['per_layer']} (merged {s['merged']}, pruned {s['pruned']}), cost {s['cost']:.3f} (target 0.3); "
              f"decoded {out[0, inputs.input_ids.shape[1]:].tolist()}; disable() restores exact logits: {restored}")
        from overdrive.testing import tiny_qwen2_vl
        from overdrive.testing.probe import child_env, run_probe

        spec = {"model": str(tiny_qwen2_vl()), "max_tokens": 6, "video": "partly_static", "video_frames": 16,
                "prompts": ["<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>describe the video.<|im_end|>"
                            "\n<|im_start|>assistant\n"],
                "llm_args": {"limit_mm_per_prompt": {"video": 1, "image": 0},
                             "additional_config": {"framefusion": {"cost": 0.3}}}}
        run = run_probe("overdrive.testing.vllm_generate", spec, env=child_env(self.env, engine=True), timeout=600,
                        check=False)
        logs = [x.split("] ", 1)[-1] for x in run.output.splitlines() if "overdrive framefusion: video" in x]
        if run.returncode != 0 or run.result is None or not logs:
            raise RuntimeError(f"vLLM with FrameFusion failed:\n{run.output[-3000:]}")
        res = {"prompt": run.result["prompt_lens"][0], "tokens": run.result["tokens"][0]}
        print(f"  vLLM (--additional-config framefusion cost 0.3), tiny Qwen2.5-VL: {logs[-1]}; "
              f"prompt {res['prompt']} tokens; answer {res['tokens']}")
        if not restored:
            raise AssertionError("disabling FrameFusion did not restore the original logits")
        return (f"FrameFusion: transformers cost {s['cost']:.3f} for target 0.3 with exact restore; "
                f"vLLM served the video prompt with {logs[-1].split('-> ')[1].split(' (')[0]}")

    def pmkvq(self) -> str:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import overdrive.transformers as odt
        from overdrive.kernels.kv_attention import cell_words
        from overdrive.pmkvq import load_plan
        from overdrive.testing import tiny_llama
        from overdrive.testing.vllm_server import kv_cache_tokens

        base, plan_path = tiny_llama(), self.work / "pmkvq-plan.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "pmkvq", "--model", str(base),
                        "--output", str(plan_path), "--budget", "55000B", "--max-len", "256", "--window", "16",
                        "--samples", "2", "--seq-len", "64"], env=self.env, check=True)
        plan = load_plan(plan_path)
        print(f"  calibrated in {time.perf_counter() - t0:.1f} s: per-layer bits {plan.layer_bits}, "
              f"alphas {[x.get('alpha') for x in plan.layers]}, {plan.budget_bytes} B per 256-token sequence")
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        want = []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            cache = odt.kv_cache(model, "pmkvq", plan=str(plan_path), mode="static")
            want.append(model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                       past_key_values=cache)[0, ids.shape[1]:].tolist())
        from overdrive.testing.probe import child_env, run_probe

        spec = {"model": str(base), "prompts": PROMPTS, "max_tokens": 24,
                "llm_args": {"max_model_len": 256, "block_size": 32,
                             "additional_config": {"pmkvq": {"plan": str(plan_path)}}}}
        run = run_probe("overdrive.testing.vllm_generate", spec, env=child_env(self.env, engine=True), timeout=600,
                        check=False)
        if run.returncode != 0 or run.result is None or "KV cache size" not in run.output:
            raise RuntimeError(f"vLLM with PM-KVQ failed:\n{run.output[-3000:]}")
        got = run.result["tokens"]
        ident = plan.identity
        dense = ident.num_layers * ident.num_kv_heads * 2 * ident.head_size * 4  # float32 K/V bytes per token
        packed = sum(ident.num_kv_heads * 4 * cell_words(ident.head_size, b, 32) for b in plan.layer_bits)
        tokens = kv_cache_tokens(run.output)
        print(f"  vLLM (--additional-config pmkvq plan, CPU_ATTN override): KV cache size {tokens:,} tokens at 1 GiB "
              f"({dense} -> {packed} bytes per token: {dense / packed:.1f}x the {2**30 // dense:,} of float32 pages)\n"
              f"  vLLM tokens {got}\n  transformers (overdrive.transformers.kv_cache, same plan) {want}")
        if got != want:
            raise AssertionError("vLLM and transformers disagree with the same PM-KVQ plan")
        return (f"PM-KVQ plan bits {plan.layer_bits}: vLLM holds {dense / packed:.1f}x more KV tokens and answers "
                "like transformers with the same plan")

    def sglang(self) -> str:
        from overdrive.testing.probe import run_probe

        out = run_probe("overdrive.testing.sglang_registry", env=self.env).result
        if "example_w8" not in out["quantization"] or "example_w8" not in out["choices"]:
            raise AssertionError(f"unexpected SGLang registry state {out}")
        return (f"SGLang load_plugins() put {', '.join(out['quantization'])} into QUANTIZATION_METHODS and the "
                "--quantization choices")

    def diffusers(self) -> str:
        import torch

        import overdrive.diffusers as odd
        from overdrive.testing import pipeline_inputs, tiny_pipeline

        pipe = tiny_pipeline("flux")
        kw = dict(num_inference_steps=8, output_type="pt")

        def run() -> tuple[torch.Tensor, float]:
            t = time.perf_counter()
            img = pipe(**pipeline_inputs("flux", **kw)).images
            return img, time.perf_counter() - t

        base, t_base = run()
        att = odd.enable(pipe, "example_stepcache", interval=2)
        cached, t_cached = run()
        evals = att.computed
        odd.disable(pipe)
        again, _ = run()
        mse = torch.mean((cached.double() - base.double()) ** 2).item()
        psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
        print(f"  denoiser evaluations {evals} of 8 steps; wall {t_cached / t_base:.2f}x of uncached; PSNR {psnr:.1f} dB")
        if not torch.equal(again, base):
            raise AssertionError("disable() did not restore the original output")
        return "tiny Flux through overdrive.diffusers; disable() restored bit-identical output"

    def ditfastattn(self) -> str:
        import torch
        from safetensors.torch import save_file

        import overdrive.diffusers as odd
        from overdrive.metrics import psnr
        from overdrive.testing import pipeline_inputs, tiny_pipeline

        pipe = tiny_pipeline("sd3")  # MMDiT with batched classifier-free guidance
        size, steps = 32, 8          # 1024 image tokens
        pipe.save_pretrained(self.work / "sd3")
        kw = dict(num_inference_steps=steps, height=size, width=size, output_type="pt")
        tensors = {k: v for k, v in pipeline_inputs("sd3", seed=100).items() if torch.is_tensor(v)}
        save_file(tensors, str(self.work / "calib.safetensors"))
        # v1 through the CLI (a saved pipeline + embeddings file), v2 through the Python API
        r = subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "ditfastattn",
                            "--pipeline", str(self.work / "sd3"), "--embeds", str(self.work / "calib.safetensors"),
                            "--steps", str(steps), "--height", str(size), "--width", str(size),
                            "--variant", "v1", "--threshold", "0.1", "--output", str(self.work / "dfa-v1.json")],
                           env=self.env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"calibration failed:\n{r.stderr[-3000:]}")
        print("  " + r.stdout.strip().splitlines()[-1])
        plan = odd.calibrate(pipe, "ditfastattn", {"variant": "v2", "alpha": 0.5},
                             **pipeline_inputs("sd3", seed=100, **kw))
        plan.save(self.work / "dfa-v2.json")
        print(f"  odd.calibrate(pipe, 'ditfastattn', {{'variant': 'v2', 'alpha': 0.5}}): predicted attention FLOPs "
              f"{plan.meta['predicted_attention_flops_fraction']:.3f} of full")

        def run() -> tuple[torch.Tensor, float]:
            t = time.perf_counter()
            img = pipe(**pipeline_inputs("sd3", seed=1, **kw)).images
            return img, time.perf_counter() - t

        base, _ = run()
        summary = []
        for variant in ("v1", "v2"):
            att = odd.enable(pipe, "ditfastattn", plan=str(self.work / f"dfa-{variant}.json"))
            out, _ = run()
            odd.disable(pipe)
            print(f"  {variant} plan on another prompt: attention FLOPs {att.flops_fraction:.2f} of full, reused "
                  f"{att.reused}, PSNR {psnr(out, base):.1f} dB vs unaccelerated (speed: docs/benchmarks, "
                  "this model is too small for attention to dominate)")
            summary.append(f"{variant} {att.flops_fraction:.2f}")
        again, _ = run()
        if not torch.equal(again, base):
            raise AssertionError("disable() did not restore the original output")
        return ("calibrated plans on tiny SD3 (1024 tokens, CFG): attention FLOPs " + ", ".join(summary)
                + "; disable() restored bit-identical output")

    def viditq(self) -> str:
        import torch
        from safetensors.torch import save_file

        import overdrive.diffusers as odd  # registers the diffusers quantizer for ViDiT-Q checkpoints
        from overdrive.metrics import psnr
        from overdrive.testing import pipeline_inputs, tiny_pipeline

        pipe = tiny_pipeline("flux")
        size, steps = 32, 4
        pipe.save_pretrained(self.work / "flux")
        kw = dict(num_inference_steps=steps, height=size, width=size, output_type="pt")
        save_file({k: v for k, v in pipeline_inputs("flux", seed=100).items() if torch.is_tensor(v)},
                  str(self.work / "flux-calib.safetensors"))
        out = self.work / "flux-viditq"
        r = subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "viditq",
                            "--pipeline", str(self.work / "flux"), "--embeds", str(self.work / "flux-calib.safetensors"),
                            "--steps", str(steps), "--height", str(size), "--width", str(size), "--scheme", "w8a8",
                            "--output", str(out)], env=self.env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"calibration failed:\n{r.stderr[-3000:]}")
        print("  " + r.stdout.strip().splitlines()[-1])
        base = pipe(**pipeline_inputs("flux", seed=1, **kw)).images
        # the quantized denoiser loads through the registered quantizer: int8 layers as stored
        pipe.transformer = type(pipe.transformer).from_pretrained(out / "transformer")
        got = pipe(**pipeline_inputs("flux", seed=1, **kw)).images
        mb = {d: sum(f.stat().st_size for f in (d / "transformer").glob("*.safetensors")) / 1e6
              for d in (self.work / "flux", out)}
        print(f"  denoiser weights {mb[self.work / 'flux']:.2f} MB -> {mb[out]:.2f} MB; W8A8 image vs the float "
              f"pipeline on another prompt: PSNR {psnr(got, base):.1f} dB")
        if not (odd.enabled(pipe) == "viditq" and mb[out] < mb[self.work / "flux"]):
            raise AssertionError("the ViDiT-Q checkpoint did not load quantized")
        return (f"ViDiT-Q W8A8 denoiser loaded by from_pretrained: {mb[out] / mb[self.work / 'flux']:.2f}x the float "
                f"weights, PSNR {psnr(got, base):.1f} dB vs the float pipeline")

    def vgdfr(self) -> str:
        import torch

        import overdrive.diffusers as odd
        from overdrive.metrics import psnr
        from overdrive.testing import pipeline_inputs, tiny_pipeline

        pipe = tiny_pipeline("wan")
        call = dict(num_inference_steps=6, num_frames=33, height=16, width=16, output_type="pt")  # 9 latent frames

        def frames(out: Any) -> torch.Tensor:
            return out.frames if hasattr(out, "frames") else out[0]

        base = frames(pipe(**pipeline_inputs("wan", seed=1, **call)))
        vg = odd.enable(pipe, "vgdfr", keep_ratio=0.75, compress_step=2)
        try:
            got = frames(vg(**pipeline_inputs("wan", seed=1, **call)))
            s, calls = vg.schedule, vg.denoiser_calls
        finally:
            odd.disable(pipe)
        again = frames(pipe(**pipeline_inputs("wan", seed=1, **call)))
        work = sum(n for _, n in calls) / (len(calls) * s.latent_frames)
        print(f"  tiny Wan, 33 frames (9 latent), 6 steps: after step {s.step} the latent goes {s.latent_frames} -> "
              f"{s.compact_frames} frames (groups {list(s.groups)}); denoiser frame-steps {work:.2f} of the unmodified "
              f"run; {tuple(got.shape)} output like the unmodified {tuple(base.shape)}; PSNR {psnr(got, base):.1f} dB")
        if got.shape != base.shape or s.compact_frames >= s.latent_frames:
            raise AssertionError("VGDFR did not shorten the latent or changed the output shape")
        if not torch.equal(again, base):
            raise AssertionError("disable() did not restore the original output")
        return (f"VGDFR keep ratio {s.keep_ratio:.2f}: {work:.2f} of the denoiser frame-steps, same frame count, "
                "disable() restored bit-identical output")

    def moa(self) -> str:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import overdrive.framefusion.runtime as ff_doc
        import overdrive.moa.calibrate as moa_doc
        import overdrive.transformers as odt
        from overdrive.moa import MoAPlan
        from overdrive.testing import tiny_llama

        base, plan_path = tiny_llama(), self.work / "moa-plan.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "moa", "--model", str(base),
                        "--output", str(plan_path), "--density", "0.5", "--lengths", "64,128", "--validate-length",
                        "96", "--max-len", "128", "--sink", "4", "--min-span", "16", "--samples", "1"],
                       env=self.env, check=True, stdout=subprocess.DEVNULL)
        plan = MoAPlan.load(plan_path)
        print(f"  calibrated (built-in text) in {time.perf_counter() - t0:.1f} s: attention density "
              f"{plan.density_at(128):.2f} at 128 tokens (budget 0.5), sink {plan.sink}")
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        # held-out text: not the calibration text
        ids = tok(moa_doc.__doc__ + ff_doc.__doc__, return_tensors="pt").input_ids[:, :128]
        with torch.no_grad():
            dense = model(ids).logits[0]
            cache = odt.kv_cache(model, "moa", plan=str(plan_path))
            sparse = model(ids, past_key_values=cache).logits[0]
        agree = (dense.argmax(-1) == sparse.argmax(-1)).float().mean().item()
        kept = sum(int(layer.positions_kept().sum()) for layer in cache.layers)
        dense_kept = ids.shape[1] * len(cache.layers) * model.config.num_key_value_heads
        prompt = tok(moa_doc.__doc__, return_tensors="pt").input_ids[:, :100]
        kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
        dense_tokens = model.generate(prompt, **kw)[0, 100:].tolist()
        moa_tokens = model.generate(prompt, past_key_values=odt.kv_cache(model, "moa", plan=str(plan_path)),
                                    **kw)[0, 100:].tolist()
        same = sum(a == b for a, b in zip(dense_tokens, moa_tokens))
        print(f"  transformers, {ids.shape[1]} held-out tokens in one prefill: KV positions held {kept} of {dense_kept} "
              f"dense ({kept / dense_kept:.2f}); next-token argmax equal to dense attention's at {agree:.2f} of them\n"
              f"  a 100-token prompt, 24 greedy tokens: {same} of 24 equal the dense model's")
        if not kept < dense_kept:
            raise AssertionError("the MoA cache held as many positions as a dense one")
        return (f"MoA plan at density {plan.density_at(128):.2f} (128 tokens): {kept / dense_kept:.2f} of the dense KV positions, "
                f"next-token argmax as dense at {agree:.2f} of the positions, {same}/24 greedy tokens as dense")

    def r2r(self) -> str:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import overdrive.r2r as r2r
        from overdrive.testing.r2r import PROMPTS as R2R_PROMPTS
        from overdrive.testing.r2r import tiny_r2r_pair, tiny_r2r_router

        small_path, large_path = tiny_r2r_pair()
        t0 = time.perf_counter()
        # trained by `overdrive calibrate --method r2r`'s pipeline on the pair's mismatches, cached like the
        # checkpoints (labelling and training take minutes on a 2-core machine: set up once)
        router_dir = tiny_r2r_router()
        print(f"  router (overdrive calibrate --method r2r on the tiny pair, cached) ready in "
              f"{time.perf_counter() - t0:.1f} s: {router_dir}")
        tok = AutoTokenizer.from_pretrained(small_path)
        small = AutoModelForCausalLM.from_pretrained(small_path, dtype=torch.float32)
        large = AutoModelForCausalLM.from_pretrained(large_path, dtype=torch.float32)
        router = r2r.load_router(router_dir, small_path)
        n, totals = 16, {"small": 0, "routed": 0, "positions": 0, "on_large": 0}
        for p in R2R_PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            want = large.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
            alone = small.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
            out = r2r.generate(small, large, router, ids, max_new_tokens=n, ignore_eos=True)
            every = r2r.generate(small, large, router, ids, max_new_tokens=n, threshold=0.0, ignore_eos=True)
            if every.tokens != want:
                raise AssertionError("threshold 0 (every position routed) differs from the large model's greedy tokens")
            totals["small"] += sum(a == b for a, b in zip(alone, want))
            totals["routed"] += sum(a == b for a, b in zip(out.tokens, want))
            totals["positions"] += len(want)
            totals["on_large"] += out.num_routed
        t = totals
        print(f"  {len(R2R_PROMPTS)} prompts x {n} greedy tokens, large model alone as the reference: small alone "
              f"matches {t['small']}/{t['positions']}, routed (router threshold {router.threshold:.3g}) matches "
              f"{t['routed']}/{t['positions']} with {t['on_large']} positions ({t['on_large'] / t['positions']:.2f}) "
              "on the large model; threshold 0 reproduces the large model exactly")
        return (f"R2R: {t['on_large'] / t['positions']:.2f} of positions on the large model, "
                f"{t['routed']}/{t['positions']} tokens equal its own (small alone {t['small']})")

    def eep(self) -> str:
        import torch
        from transformers import AutoModelForCausalLM

        from overdrive.adapters.transformers.expert_pruning import TransformersExpertSession, apply_maps
        from overdrive.contracts.expert_pruning import TaskRecord
        from overdrive.eep.calibrate import calibrate
        from overdrive.eep.config import EEPConfig
        from overdrive.eep.export import export_checkpoint
        from overdrive.testing.moe import tiny_moe

        src = tiny_moe("mixtral")
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        recs = [TaskRecord(torch.randint(0, 400, (4,), generator=g).tolist(),
                           torch.randint(0, 400, (12,), generator=g).tolist()) for _ in range(6)]
        plan = calibrate(TransformersExpertSession(model), recs[:4], recs[4:],
                         EEPConfig(experts=4, population=4, elite=2, prune_generations=2, merge_generations=1,
                                   freeze_route=True))
        out = export_checkpoint(src, plan, self.work / "eep-mixtral-4")
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = torch.randint(0, 400, (1, 12), generator=g)
        with torch.inference_mode():
            full = model(ids).logits
            apply_maps(model, plan.layers)
            err = float((pruned(ids).logits - model(ids).logits).abs().max())
        print(f"  tiny Mixtral, 8 -> 4 experts per layer ({plan.top_k} active), EEP search "
              f"{plan.fitness['evaluations']:.0f} evaluations: task log-likelihood {plan.fitness['train']:.3f} "
              f"(unpruned {plan.fitness['unpruned_train']:.3f}); exported checkpoint vs the in-memory pruned model: "
              f"max |logit diff| {err:.1e}; vs the unpruned model {float((pruned(ids).logits - full).abs().max()):.2f}")
        if err > 1e-3:
            raise AssertionError("the exported checkpoint differs from the pruned model")
        return f"EEP: 4 of 8 experts kept, export == pruned model (max |diff| {err:.1e}), stock engines serve it"

    def mxmoe(self) -> str:
        import json

        import overdrive.transformers  # noqa: F401 - registers the quantizer
        from overdrive.testing.moe import tiny_moe

        src = tiny_moe("mixtral")
        q = self.work / "mixtral-mxmoe"
        subprocess.run([sys.executable, "-m", "overdrive.cli", "quantize", "--method", "mxmoe", "--model", str(src),
                        "--output", str(q), "--avg-bits", "3.25", "--quantizer", "rtn", "--candidates",
                        "w2g32,w3g32,w4g32,w8g64", "--samples", "2", "--seq-len", "64", "--device", "cpu"],
                       check=True, env=self.env)
        qc = json.loads((q / "config.json").read_text())["quantization_config"]
        hist: dict[str, int] = {}
        for per in qc["formats"].values():
            for lin in per.values():
                for f in lin.values():
                    hist[f] = hist.get(f, 0) + 1
        agree = self._next_token_agreement(src, q)
        print(f"  tiny Mixtral at 3.25 bits per expert weight: formats {dict(sorted(hist.items()))}; top-1 agreement "
              f"with the float model {agree:.2f}")
        return f"MxMoE: per-expert formats {dict(sorted(hist.items()))} at 3.25 bits, transformers loads it"

    @staticmethod
    def _next_token_agreement(float_dir: Path, quant_dir: Path) -> float:
        """Share of 16 random positions where the quantized checkpoint's next-token argmax equals the float one's
        (both loaded by transformers, the quantized one through overdrive's registered quantizer)."""
        import torch
        from transformers import AutoModelForCausalLM

        ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            a, b = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(ids).logits
                    for d in (float_dir, quant_dir))
        return float((a.argmax(-1) == b.argmax(-1)).float().mean())

    def pcdvq(self) -> str:
        import overdrive.transformers  # noqa: F401 - registers the quantizer
        from overdrive.testing import tiny_llama

        base = tiny_llama()
        q = self.work / "llama-pcdvq"
        subprocess.run([sys.executable, "-m", "overdrive.cli", "quantize", "--method", "pcdvq", "--model", str(base),
                        "--output", str(q), "--direction-bits", "10"], check=True, env=self.env)
        agree = self._next_token_agreement(base, q)
        print(f"  tiny Llama, direction codebook 2^10 (E8 shells) + 2-bit chi(8) magnitudes: checkpoint "
              f"{self._size_mb(q):.2f} MB vs {self._size_mb(base):.2f} MB; next-token agreement with float {agree:.2f}")
        return f"PCDVQ: quantized from the CLI, loaded by transformers, next-token agreement {agree:.2f}"

    def vocabtailor(self) -> str:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

        import overdrive.transformers as odt
        from overdrive.testing import tiny_llama
        from overdrive.vocabtailor.config import VocabTailorConfig
        from overdrive.vocabtailor.method import METHOD

        base = tiny_llama()
        corpus = self.work / "vocab-corpus.txt"
        corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)) + "\n")
        profile = self.work / "vocab-profile.json"
        subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "vocabtailor", "--model",
                        str(base), "--corpus", str(corpus), "--output", str(profile)], check=True, env=self.env)
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        ids = tok("the quick brown fox", return_tensors="pt").input_ids
        loaded = METHOD.load_profile(str(profile))
        allowed = METHOD.allowed(loaded, VocabTailorConfig(profile=str(profile)), [ids[0]])[0]

        def masked(_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            # the unmodified model's full-vocabulary logits with every row outside the allowed set at -inf
            out = torch.full_like(scores, float("-inf"))
            out[:, allowed] = scores[:, allowed]
            return out

        def greedy(**kw: object) -> list[int]:
            g = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, **kw)
            return g[0, ids.shape[1]:].tolist()

        full = greedy()
        want = greedy(logits_processor=LogitsProcessorList([masked]))
        odt.enable(model, "vocabtailor", profile=str(profile))
        try:
            got = greedy()
        finally:
            odt.disable(model)
        same = sum(x == y for x, y in zip(got, want))
        print(f"  tiny Llama, profile from a one-line corpus: {allowed.numel()} of {model.config.vocab_size} rows "
              f"allowed for this prompt; greedy tokens with the tailored LM head {got}; the full model with the "
              f"same rows masked {want} ({same}/8 equal); unrestricted full vocabulary {full}")
        if got != want:
            raise AssertionError("the tailored LM head disagrees with the masked full-vocabulary model")
        return (f"VocabTailor: LM head over {allowed.numel()}/{model.config.vocab_size} rows, tokens equal the masked "
                f"full model's ({same}/8)")

    def kernels(self) -> str:
        from overdrive.testing.probe import run_probe

        out = run_probe("overdrive.testing.kernel_selfcheck", env={**self.env, "OVERDRIVE_KERNELS": "interpret"}).result
        print(f"  int8_weight_linear (Triton kernel in the interpreter, M=5 K=70 N=33): max |err| vs float64 {out['err']:.2e}")
        if out["err"] > 1e-3:
            raise AssertionError("kernel disagrees with the float64 reference")
        return f"backend {out['backend']}: Triton kernel matches float64"


#: (name, title) of every step, in the order they run; the name is the Demo method that runs it
STEPS: list[tuple[str, str]] = [
    ("registry", "Registry: methods x frameworks (overdrive list)"),
    ("doctor", "Environment (overdrive doctor)"),
    ("kernels", "Kernels: Triton in the interpreter vs float64"),
    ("vllm", "vLLM + transformers: quantize, serve, load, compare"),
    ("mbq", "MBQ: calibrate a VLM, answer a video question in vLLM and transformers"),
    ("framefusion", "FrameFusion: video token merging + pruning in transformers and vLLM"),
    ("pmkvq", "PM-KVQ: calibrate a KV plan, serve it in vLLM with more KV capacity, compare with transformers"),
    ("moa", "MoA: calibrate per-head attention spans, compare with dense attention in transformers"),
    ("sglang", "SGLang: real plugin loader and registries"),
    ("diffusers", "Diffusers: a DiT cache through overdrive.diffusers"),
    ("ditfastattn", "DiTFastAttn: calibrate v1/v2 plans (CLI), generate with them, disable"),
    ("viditq", "ViDiT-Q: calibrate W8A8 (CLI), load the quantized pipeline, compare with float"),
    ("vgdfr", "VGDFR: a shorter latent after a few steps on a video pipeline, compare, disable"),
    ("r2r", "R2R: route a small/large pair with a trained router, compare with the large model"),
    ("eep", "EEP: search which experts to keep, export a smaller standard MoE checkpoint, compare"),
    ("mxmoe", "MxMoE: mixed-precision MoE experts from the CLI, loaded in transformers"),
    ("pcdvq", "PCDVQ: 2-bit polar vector quantization from the CLI, load in transformers, compare with float"),
    ("vocabtailor", "VocabTailor: profile a task vocabulary, generate with the tailored LM head, compare"),
]


def _names(values: list[str]) -> list[str]:
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options; ``only`` / ``skip`` become lists of known step names (unknown ones: an error
    that lists the known names)."""
    known = [k for k, _ in STEPS]
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only these steps (repeatable, or a comma list): " + " ".join(known))
    ap.add_argument("--skip", nargs="*", default=[], metavar="NAME", help="steps to skip: " + " ".join(known))
    args = ap.parse_args(argv)
    args.only, args.skip = _names(args.only), _names(args.skip)
    unknown = [n for n in args.only + args.skip if n not in known]
    if unknown:
        ap.error(f"unknown step{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; known steps: {', '.join(known)}")
    return args


def selected(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The steps to run, in the demo's order."""
    return [s for s in STEPS if (not args.only or s[0] in args.only) and s[0] not in args.skip]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="overdrive-demo-") as tmp:
        d = Demo(Path(tmp))
        for name, title in selected(args):
            d.step(title, getattr(d, name))
    _h("Summary")
    for title, ok, summary in d.results:
        print(f"  [{'ok' if ok else 'FAIL'}] {title}: {summary}")
    print(f"  {len(d.results)} steps in {time.perf_counter() - t0:.0f} s")
    return 0 if all(ok for _, ok, _ in d.results) else 1


if __name__ == "__main__":
    sys.exit(main())
