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
import re
from pathlib import Path

import pytest
import torch

from overdrive.testing import tiny_llama, tiny_qwen2_vl
from overdrive.testing.framefusion import partly_static_video
from overdrive.testing.probe import child_env, run_probe
from overdrive.testing.vllm_server import VllmServer

pytestmark = pytest.mark.slow

PROBES = Path(__file__).parent / "probes"

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
def test_vllm_tokens_equal_a_transformers_reference_of_the_same_reduction():
    """vllm.LLM enabled by environment variable on a 16-frame video (8 x 4 x 4 tokens, half of them
    near-duplicates across frames), cost .5: merges and pruning both happen; the text after the video
    keeps its unreduced positions (scaled temporal extent 15 > width 4, where vLLM's EVS would not)."""
    model, opts = tiny_qwen2_vl(), {"cost": 0.5}
    ref = run_probe(PROBES / "framefusion_hf_reference.py", str(model), opts, "6", env=child_env(engine=True)).result
    assert ref["merged"] > 0 and ref["pruned"] > 0 and ref["kept"] == 64
    spec = {"model": str(model), "prompts": [ref["prompt"]], "max_tokens": 6, "video": "partly_static",
            "video_frames": 16, "llm_args": {"limit_mm_per_prompt": {"video": 1, "image": 0}}}
    run = run_probe("overdrive.testing.vllm_generate", spec, timeout=600,
                    env=child_env({"OVERDRIVE_TOKEN_REDUCTION": json.dumps({"framefusion": opts})}, engine=True))
    assert "overdrive framefusion: video 8x4x4 = 128 tokens -> 64 kept" in run.output
    assert run.result["prompt_lens"] == [ref["prompt_len"]]
    assert run.result["tokens"] == [ref["tokens"]]


# -- bad input fails at startup ---------------------------------------------------------------------
def test_bad_options_fail_when_the_engine_config_is_built():
    qwen = str(tiny_qwen2_vl())
    cases = [
        {"model": qwen, "additional_config": {"framefusion": {"cost": 1.5}}},
        {"model": qwen, "additional_config": {"framefusion": {"similarity_lower_bound": -1}}},
        {"model": qwen, "additional_config": {"framefusion": {"cost": 0.3}}, "video_pruning_rate": 0.5},
        {"model": qwen, "additional_config": {"framefusion": {"cost": 0.3}}},
    ]
    res = run_probe("overdrive.testing.vllm_engine_config", cases, env=child_env(engine=True)).result
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
