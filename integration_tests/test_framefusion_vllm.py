"""FrameFusion in real vLLM (before the decoder) on the tiny Qwen2.5-VL.

Engine starts: one server without and one with ``--additional-config '{"framefusion": ...}'`` (OpenAI
client, video + text prompts), one ``vllm.LLM`` enabled through $OVERDRIVE_TOKEN_REDUCTION whose
greedy tokens are compared with an independent transformers reference (the same selection applied to
transformers' own vision embeddings, kept tokens at their original multimodal rotary positions), and
quick startup failures (no engine is built).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from overdrive.testing import tiny_llama, tiny_qwen2_vl
from overdrive.testing.framefusion import partly_static_video
from overdrive.testing.vllm_generate import RESULT_PREFIX
from overdrive.testing.vllm_server import VllmServer

pytestmark = pytest.mark.slow

SERVE = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--limit-mm-per-prompt",
         '{"video": 1, "image": 0}']
FF = {"cost": 0.4}
TEXT = "hello world, this is"
LOG = re.compile(r"overdrive framefusion: video (\d+)x(\d+)x(\d+) = (\d+) tokens -> (\d+) kept \(merged (\d+), pruned (\d+)\)")


def video_data_url(frames: torch.Tensor) -> str:
    """A ``video/jpeg`` data URL (vLLM's frame-list format) carrying lossless PNG frames."""
    from PIL import Image

    parts = []
    for f in frames.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="PNG")
        parts.append(base64.b64encode(buf.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(parts)


def ask(srv: VllmServer, url: str) -> tuple[list[int], int]:
    r = srv.client().chat.completions.create(
        model=srv.model, max_tokens=6, temperature=0.0, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                               {"type": "text", "text": "describe the video."}]}])
    return list(r.choices[0].token_ids), r.usage.prompt_tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Answers of a server without and with FrameFusion to the same video and text prompts."""
    model = tiny_qwen2_vl()
    url = video_data_url(partly_static_video(0, frames=16))
    out = {}
    for key, extra in [("plain", []), ("framefusion", ["--additional-config", json.dumps({"framefusion": FF})])]:
        log = tmp_path_factory.mktemp(key) / "vllm.log"
        with VllmServer(model, SERVE + extra, log_path=log) as srv:
            video, prompt_tokens = ask(srv, url)
            out[key] = {"video": video, "prompt_tokens": prompt_tokens,
                        "text": srv.greedy_token_ids(TEXT, 8), "log": srv.log_text()}
    return out


def test_server_answers_video_prompts_with_the_reduced_token_count_logged(served):
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    ff, plain = served["framefusion"], served["plain"]
    hits = LOG.findall(ff["log"])
    assert hits, "the server log has no FrameFusion line"
    t, r, c, n, k, merged, pruned = map(int, hits[-1])
    assert n == t * r * c and k == compute_retained_tokens_count(r * c, t, 1 - FF["cost"])
    assert merged + pruned == n - k and merged > 0  # the static half of the video merges
    assert plain["prompt_tokens"] - ff["prompt_tokens"] == n - k  # the placeholders shrank by as much
    assert len(ff["video"]) == 6
    assert "overdrive framefusion" not in plain["log"]


def test_requests_without_video_are_untouched(served):
    assert served["framefusion"]["text"] == served["plain"]["text"]


# -- token equality with a transformers reference ---------------------------------------------------
HF_REFERENCE = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count
    from overdrive.contracts.token_reduction import VideoGrid
    from overdrive.framefusion.config import FrameFusionConfig
    from overdrive.framefusion.method import METHOD
    from overdrive.testing.framefusion import partly_static_video
    path, opts, n_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    frames = partly_static_video(0, frames=16).permute(0, 2, 3, 1).numpy()
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inp = proc(text=[prompt], videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], return_tensors="pt")
    cfg = METHOD.resolve(FrameFusionConfig.from_dict(opts), "qwen2_vl")
    with torch.no_grad():
        feats = model.model.get_video_features(inp.pixel_values_videos, inp.video_grid_thw).pooler_output[0]
        t, h, w = inp.video_grid_thw[0].tolist()
        merge = model.config.vision_config.spatial_merge_size
        grid = VideoGrid(t, h // merge, w // merge)
        keep = compute_retained_tokens_count(grid.tokens_per_frame, t, 1 - cfg.cost)
        sel = METHOD.select(feats, grid, keep, cfg)
        ids = inp.input_ids[0]
        pos, _ = model.model.get_rope_index(inp.input_ids, video_grid_thw=inp.video_grid_thw,
                                            second_per_grid_ts=inp.second_per_grid_ts,
                                            attention_mask=inp.attention_mask, mm_token_type_ids=inp.mm_token_type_ids)
        vid = (ids == model.config.video_token_id).nonzero().squeeze(-1)
        emb = model.model.language_model.embed_tokens(ids).clone()
        emb[vid[sel.keep]] = sel.embeds
        rows = torch.ones(ids.numel(), dtype=torch.bool)
        rows[vid] = False
        rows[vid[sel.keep]] = True
        emb, pos = emb[rows][None], pos[:, :, rows]
        S = emb.shape[1]
        text = torch.arange(S)[None, None]
        out = model(inputs_embeds=emb, position_ids=torch.cat([text, pos]), use_cache=True)
        tokens, cache, nxt = [], out.past_key_values, int(pos.max()) + 1
        for i in range(n_new):
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
            p = torch.full((4, 1, 1), nxt + i)
            p[0] = S + i
            out = model(input_ids=torch.tensor([[tok]]), position_ids=p, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    print(json.dumps({"tokens": tokens, "prompt_len": S, "prompt": prompt, "kept": keep,
                      "merged": sel.merged, "pruned": sel.pruned}))
""")

VLLM_CHILD = textwrap.dedent("""
    import json, os, sys
    if __name__ == "__main__":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams
        from overdrive.testing.framefusion import partly_static_video
        path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        frames = partly_static_video(0, frames=16).permute(0, 2, 3, 1).numpy()
        meta = {"fps": 2.0, "duration": 8.0, "total_num_frames": 16, "frames_indices": list(range(16)),
                "video_backend": "opencv", "do_sample_frames": False}
        llm = LLM(model=path, dtype="float32", max_model_len=1024, enforce_eager=True,
                  limit_mm_per_prompt={"video": 1, "image": 0})
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": (frames, meta)}}],
                           SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        print(%r + json.dumps({"tokens": list(out[0].outputs[0].token_ids),
                               "prompt_len": len(out[0].prompt_token_ids)}), flush=True)
""" % RESULT_PREFIX)


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def test_vllm_tokens_equal_a_transformers_reference_of_the_same_reduction():
    """vllm.LLM enabled by environment variable on a 16-frame video (8 x 4 x 4 tokens, half of them
    near-duplicates across frames), cost .5: merges and pruning both happen; the text after the video
    keeps its unreduced positions (scaled temporal extent 15 > width 4, where vLLM's EVS would not)."""
    model, opts = tiny_qwen2_vl(), {"cost": 0.5}
    r = subprocess.run([sys.executable, "-c", HF_REFERENCE, str(model), json.dumps(opts), "6"],
                       capture_output=True, text=True, timeout=300, env=_child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    assert ref["merged"] > 0 and ref["pruned"] > 0 and ref["kept"] == 64
    r = subprocess.run([sys.executable, "-c", VLLM_CHILD, str(model), ref["prompt"], "6"],
                       capture_output=True, text=True, timeout=600,
                       env=_child_env(OVERDRIVE_TOKEN_REDUCTION=json.dumps({"framefusion": opts})))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    got = json.loads(next(x for x in r.stdout.splitlines() if x.startswith(RESULT_PREFIX))[len(RESULT_PREFIX):])
    assert "overdrive framefusion: video 8x4x4 = 128 tokens -> 64 kept" in r.stdout + r.stderr
    assert got["prompt_len"] == ref["prompt_len"]
    assert got["tokens"] == ref["tokens"]


# -- bad input fails at startup ---------------------------------------------------------------------
CONFIG_PROBE = textwrap.dedent("""
    import json, sys
    from vllm.engine.arg_utils import EngineArgs
    out = []
    for case in json.loads(sys.argv[1]):
        try:
            EngineArgs(model=case.pop("model"), dtype="float32", max_model_len=512, **case).create_engine_config()
            out.append("ok")
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    print("RESULTS " + json.dumps(out))
""")


def test_bad_options_fail_when_the_engine_config_is_built():
    qwen = str(tiny_qwen2_vl())
    cases = [
        {"model": qwen, "additional_config": {"framefusion": {"cost": 1.5}}},
        {"model": qwen, "additional_config": {"framefusion": {"similarity_lower_bound": -1}}},
        {"model": qwen, "additional_config": {"framefusion": {"cost": 0.3}}, "video_pruning_rate": 0.5},
        {"model": qwen, "additional_config": {"framefusion": {"cost": 0.3}}},
    ]
    r = subprocess.run([sys.executable, "-c", CONFIG_PROBE, json.dumps(cases)], capture_output=True, text=True,
                       timeout=300, env=_child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULTS "))[8:])
    assert "FrameFusionConfig.cost must be in (0, 1]" in res[0]
    assert "FrameFusionConfig.similarity_lower_bound" in res[1]
    assert "--video-pruning-rate 0.5 conflicts" in res[2]
    assert res[3] == "ok"


def test_unsupported_model_family_fails_at_server_startup(tmp_path):
    log = tmp_path / "vllm.log"
    with pytest.raises(RuntimeError, match="vLLM server exited"):
        with VllmServer(tiny_llama(), ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                                       "--additional-config", json.dumps({"framefusion": {}})], log_path=log):
            pass
    text = log.read_text(errors="replace")
    assert ("framefusion: model architecture 'LlamaForCausalLM' is not supported by overdrive's vLLM token "
            "reduction; supported: Qwen2_5_VLForConditionalGeneration") in text
    assert "init engine" not in text  # it failed while the config was built, before any engine existed
