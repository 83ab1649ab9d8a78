"""``overdrive serve-r2r``: two real vLLM engines (CPU, float32) behind one OpenAI server, on the tiny pair.

References: transformers' own greedy generation of each model (thresholds 0 and 1) and the transformers
routing loop with the same router (any threshold); the comparison threshold is chosen so that no
router score lies within 1e-3 of it, so float32 differences between vLLM's and transformers' kernels
cannot flip a decision by chance (the scores themselves are compared within 1e-3). Malformed requests:
the set vLLM's own server refuses (``overdrive.testing.bad_requests``), each a 4xx with vLLM's error body
(checked with vLLM's ``ErrorResponse`` model), none reaching an engine (the request counter stands
still), and the server then answers as before. The context limit: vLLM's rule in closed form
(``max_model_len - prompt length`` tokens at most).
One server is shared by the module (each start is two engine starts); the last test stops it with
SIGTERM, measures the time to a clean exit and checks that both engines' processes are gone. SIGINT is
not tested separately: uvicorn handles SIGINT and SIGTERM with one handler, and a second server would
cost two more engine starts. An engine's death is tested in ``test_r2r_server_death.py``.
"""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

import overdrive.r2r as r2r
from overdrive.contracts.token_routing import threshold_logit
from overdrive.testing.bad_requests import malformed_requests, post_raw
from overdrive.testing.r2r import PROMPTS, RoutingServer, tiny_r2r_pair, tiny_r2r_router

pytestmark = pytest.mark.slow

N = 24
MAX_MODEL_LEN = 512
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", "1"]


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s, l = tiny_r2r_pair()
    small = AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32).eval()
    large = AutoModelForCausalLM.from_pretrained(l, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(s)
    return small, large, tok, r2r.load_router(tiny_r2r_router(), s), [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def server():
    s, l = tiny_r2r_pair()
    srv = RoutingServer(s, l, tiny_r2r_router(), SERVER_ARGS, startup_timeout=900)
    with srv:
        yield srv


@pytest.fixture(scope="module")
def reference(models):
    """A threshold with every router score at least 1e-3 away from it, and the loop's outputs there."""
    small, large, _, router, prompts = models
    for t in (router.threshold, 0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3):
        outs = [r2r.generate(small, large, router, ids, max_new_tokens=N, threshold=t, ignore_eos=True) for ids in prompts]
        margin = min(abs(z - threshold_logit(t)) for o in outs for z in o.scores)
        if margin >= 1e-3 and sum(0 < o.num_routed < N for o in outs) >= len(prompts) // 2:
            return t, outs
    pytest.fail("no threshold with a 1e-3 margin that mixes both models on the tiny pair")


def post(srv, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(srv.base_url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(srv, ids: list[int], threshold: float | None, **extra) -> dict:
    body = {"model": "r2r", "prompt": ids, "max_tokens": N, "temperature": 0, "ignore_eos": True,
            "return_router_scores": True, **extra}
    if threshold is not None:
        body["router_threshold"] = threshold
    status, out = post(srv, "/v1/completions", body)
    assert status == 200, out
    return out


def greedy(model, ids: list[int]) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False)[0, len(ids):].tolist()


def test_threshold_0_is_the_large_model_and_1_the_small_model(server, models):
    small, large, _, _, prompts = models
    for ids in prompts[:4]:
        out = complete(server, ids, 0.0)
        assert out["choices"][0]["token_ids"] == greedy(large, ids)
        assert out["usage"]["routed_tokens"] == N and out["usage"]["small_tokens"] == 0
        out = complete(server, ids, 1.0)
        assert out["choices"][0]["token_ids"] == greedy(small, ids)
        assert out["usage"]["routed_tokens"] == 0 and out["usage"]["completion_tokens"] == N


def test_server_equals_the_transformers_loop(server, models, reference):
    _, _, _, _, prompts = models
    t, outs = reference
    for ids, ref in zip(prompts, outs):
        got = complete(server, ids, t)
        ch = got["choices"][0]
        assert ch["token_ids"] == ref.tokens and ch["routed"] == ref.routed
        torch.testing.assert_close(torch.tensor(ch["router_scores"]), torch.tensor(ref.scores), rtol=0, atol=1e-3)
        assert got["usage"] == {"prompt_tokens": len(ids), "completion_tokens": N, "total_tokens": len(ids) + N,
                                "routed_tokens": ref.num_routed, "small_tokens": N - ref.num_routed}


def test_concurrent_requests_are_batched_and_equal_the_loop(server, models, reference):
    _, _, _, _, prompts = models
    t, outs = reference
    before = json.loads(urllib.request.urlopen(server.base_url + "/r2r/stats").read())
    client = server.client()

    def one(ids):
        r = client.completions.create(model="r2r", prompt=ids, max_tokens=N, temperature=0,
                                      extra_body={"ignore_eos": True, "router_threshold": t})
        return r.choices[0].token_ids, r.choices[0].routed, r.usage.routed_tokens

    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(one, prompts))
    for (tokens, routed, n_routed), ref in zip(got, outs):
        assert tokens == ref.tokens and routed == ref.routed and n_routed == ref.num_routed
    after = json.loads(urllib.request.urlopen(server.base_url + "/r2r/stats").read())
    rows, batches = after["router_rows"] - before["router_rows"], after["router_batches"] - before["router_batches"]
    assert rows == N * len(prompts) and batches < rows  # several requests' steps scored in one router call
    assert after["routed_tokens"] - before["routed_tokens"] == sum(o.num_routed for o in outs)


def test_streaming_returns_the_same_tokens_and_usage(server, models, reference):
    _, _, tok, _, prompts = models
    t, outs = reference
    stream = server.client().completions.create(model="r2r", prompt=prompts[1], max_tokens=N, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True, "router_threshold": t})
    tokens, routed, text, usage, finish = [], [], "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            tokens += c.token_ids
            routed += c.routed
            text += c.text
            finish = c.finish_reason or finish
    assert tokens == outs[1].tokens and routed == outs[1].routed and finish == "length"
    assert text == tok.decode(outs[1].tokens, skip_special_tokens=True)
    assert usage.routed_tokens == outs[1].num_routed and usage.completion_tokens == N


def test_chat_completion_and_stop_strings(server, models, reference):
    small, large, tok, router, _ = models
    t, _ = reference
    msgs = [{"role": "user", "content": "hello world"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = r2r.generate(small, large, router, ids, max_new_tokens=8, threshold=t, ignore_eos=True)
    status, out = post(server, "/v1/chat/completions", {"model": "r2r", "messages": msgs, "max_tokens": 8,
                                                          "temperature": 0, "ignore_eos": True, "router_threshold": t})
    assert status == 200 and out["choices"][0]["token_ids"] == ref.tokens
    assert out["choices"][0]["message"]["content"] == tok.decode(ref.tokens, skip_special_tokens=True)
    assert out["usage"]["routed_tokens"] == ref.num_routed
    # a stop string cuts the text where it first appears
    full = tok.decode(ref.tokens, skip_special_tokens=True)
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].strip())
    status, out = post(server, "/v1/chat/completions", {"model": "r2r", "messages": msgs, "max_tokens": 8,
                                                          "temperature": 0, "ignore_eos": True,
                                                          "router_threshold": t, "stop": [stop]})
    assert status == 200 and out["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def stats(srv) -> dict:
    return json.loads(urllib.request.urlopen(srv.base_url + "/r2r/stats").read())


def model_vocab(path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, models):
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    small, large, _, _, prompts = models
    s, l = tiny_r2r_pair()
    vocab = min(model_vocab(s), model_vocab(l))
    before = stats(server)
    bad = malformed_requests("r2r", MAX_MODEL_LEN, vocab)
    assert len(bad) >= 9
    for b in bad:
        status, body = post_raw(server.base_url + b.path, b.body)
        assert status == b.status, (b.name, status, body)
        err = ErrorResponse.model_validate(body).error  # vLLM's error body shape
        assert err.code == status and err.message and err.type, (b.name, body)
        assert urllib.request.urlopen(server.base_url + "/health").status == 200, b.name
    after = stats(server)
    assert after["requests"] == before["requests"] and after["failed"] == before["failed"]  # no engine saw them
    assert urllib.request.urlopen(server.base_url + "/health").status == 200
    models_ = json.loads(urllib.request.urlopen(server.base_url + "/v1/models").read())
    assert [m["id"] for m in models_["data"]] == ["r2r"] and models_["data"][0]["max_model_len"] == MAX_MODEL_LEN
    for ids in prompts[:2]:  # the same tokens as each model's own greedy generation, as before the bad requests
        assert complete(server, ids, 0.0)["choices"][0]["token_ids"] == greedy(large, ids)
        assert complete(server, ids, 1.0)["choices"][0]["token_ids"] == greedy(small, ids)
    code, body = post(server, "/v1/completions", {"model": "r2r", "prompt": "hi", "n": 2})
    assert code == 400 and body["error"]["param"] == "n"
    code, body = post(server, "/v1/completions", {"model": "r2r", "prompt": "hi", "router_threshold": 2})
    assert code == 400 and "router_threshold" in body["error"]["message"]
    code, body = post(server, "/v1/completions", {"model": "r2r", "prompt": "hi", "presence_penalty": 0.5})
    assert code == 400 and body["error"]["param"] == "presence_penalty"  # not silently ignored


def test_max_tokens_is_clamped_to_the_context_left(server, models):
    """vLLM's rule: at most ``max_model_len - prompt length`` tokens; both engines' sessions reach the limit."""
    _, _, _, _, prompts = models
    for n_prompt, threshold in ((MAX_MODEL_LEN - 12, 0.0), (MAX_MODEL_LEN - 12, 1.0), (MAX_MODEL_LEN - 1, 0.0)):
        ids = (prompts[0] * MAX_MODEL_LEN)[:n_prompt]
        out = complete(server, ids, threshold, max_tokens=100, return_router_scores=False)
        assert out["usage"]["completion_tokens"] == MAX_MODEL_LEN - n_prompt
        assert out["choices"][0]["finish_reason"] == "length"
    assert urllib.request.urlopen(server.base_url + "/health").status == 200


def _stop_and_check(srv, sig: int) -> None:
    """The server ends by the signal after its shutdown (uvicorn re-raises SIGTERM/SIGINT once it has shut
    down, so a supervisor sees a normal stop) and leaves no child process; the time from the signal to
    both is printed (the docs' measured shutdown time). The waits are the bound the server enforces: 5 s
    for in-flight requests (none here), 10 s per engine shutdown, 3 + 3 s to terminate and kill leftovers."""
    proc = psutil.Process(srv.proc.pid)
    children = proc.children(recursive=True)
    assert sum("EngineCore" in c.name() for c in children) == 2, [c.name() for c in children]
    t0 = time.monotonic()
    os.kill(srv.proc.pid, sig)  # the server process only, as a process manager does
    assert srv.proc.wait(timeout=30) == -sig
    exited = time.monotonic() - t0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"orphans after {signal.Signals(sig).name}: {[(p.pid, p.name()) for p in alive]}"
    print(f"\n{signal.Signals(sig).name}: server exited after {exited:.1f} s, children gone after "
          f"{time.monotonic() - t0:.1f} s")
    assert "shutting down both engines" in srv.log_text() and "leftover child" not in srv.log_text()


def test_sigterm_stops_both_engines(server):
    _stop_and_check(server, signal.SIGTERM)

