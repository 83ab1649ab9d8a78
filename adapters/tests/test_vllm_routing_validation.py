"""The routing server's request validation and error isolation, without engines (fast tier).

References: vLLM 0.32's own checks called directly — ``TokenizeParams`` (max_tokens against the
context, prompt length), ``InputProcessor._validate_prompt_len`` (empty prompt, prompt filling the
context), ``SamplingParams`` (max_tokens >= 1) and ``get_max_tokens`` (the clamp) — against this
server's own implementation of that rule; vLLM's ``ErrorResponse`` model for the error body's shape;
the tokenizer's own encoding and chat template for the prompt. The HTTP app runs with stand-in engines
(FastAPI's TestClient) to check that an engine error fails only its request.
"""
from __future__ import annotations

import json
import types

import pytest

from overdrive.adapters.vllm.routing.validation import (Limits, RequestError, check_prompt, output_budget,
                                                        validate)
from overdrive.testing.bad_requests import malformed_requests
from overdrive.testing.llm import tiny_llama

LIMITS = Limits("r2r", max_model_len=64, vocab_size=500)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama())


def _vllm_rule(max_len: int, requested: int | None, n: int) -> int | None:
    """vLLM's own pieces, in its server's order: the number of tokens it would generate, or None if refused."""
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.params import TokenizeParams
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    fake = types.SimpleNamespace(skip_prompt_length_check=False, supports_mm_inputs=False,
                                 model_config=types.SimpleNamespace(max_model_len=max_len, runner_type="generate"))
    try:
        params = TokenizeParams(max_total_tokens=max_len, max_output_tokens=requested or 0,
                                max_total_tokens_param="max_model_len", max_output_tokens_param="max_tokens")
        params._token_len_check(None, [1] * n)
        InputProcessor._validate_prompt_len(fake, n, "decoder")
        m = get_max_tokens(max_len, requested, n, {})
        SamplingParams(max_tokens=m)
        return m
    except VLLMValidationError:
        return None


@pytest.mark.parametrize("max_len", [8, 64])
def test_context_rule_equals_vllms(max_len):
    for n in (0, 1, 2, max_len // 2, max_len - 1, max_len, max_len + 1, 3 * max_len):
        for requested in (None, -3, 0, 1, 5, max_len - n, max_len - n + 1, max_len, max_len + 1, 10**9):
            limits = Limits("m", max_len, 500)
            try:
                check_prompt([1] * n, limits)
                ours = output_budget(requested, n, max_len)
            except RequestError as e:
                assert e.status == 400 and e.param
                ours = None
            assert ours == _vllm_rule(max_len, requested, n), (n, requested)


def test_token_ids_must_index_both_models(tok):
    check_prompt([0, 499], LIMITS)
    for ids in ([500], [0, -1], [len(tok)], [10**9]):
        with pytest.raises(RequestError, match="out of vocabulary") as e:
            check_prompt(ids, LIMITS)
        assert e.value.status == 400 and e.value.param == "prompt"


def test_every_malformed_request_is_refused_with_vllms_error_shape(tok):
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    bad = malformed_requests("r2r", LIMITS.max_model_len, LIMITS.vocab_size)
    checked = 0
    for b in bad:
        try:
            body = json.loads(b.body)
        except ValueError:
            continue  # invalid JSON is the HTTP layer's (tested with the app below and against the real server)
        with pytest.raises(RequestError) as e:
            validate(body, b.path.endswith("chat/completions"), tok, LIMITS)
        assert e.value.status == b.status, (b.name, e.value.message)
        err = ErrorResponse.model_validate(e.value.body()).error
        assert err.code == b.status and err.message == e.value.message, b.name
        checked += 1
    assert checked == len(bad) - 1


def test_valid_requests_give_the_prompt_and_sampling(tok):
    v = validate({"model": "r2r", "prompt": "hello world", "temperature": 0, "stop": "xy", "seed": 3}, False, tok, LIMITS)
    assert v.prompt == tok("hello world").input_ids and v.stop == ["xy"] and not v.stream
    s = v.sampling
    assert (s.max_tokens, s.temperature, s.seed, s.threshold, s.return_scores) == (16, 0.0, 3, None, False)
    v = validate({"prompt": [[5, 6, 7]], "max_tokens": 62, "top_k": 4, "top_p": 0.5,
                  "router_threshold": 0.25, "return_router_scores": True, "stream": True,
                  "stream_options": {"include_usage": True}, "stop_token_ids": [9], "ignore_eos": True}, False, tok,
                 LIMITS)
    assert v.prompt == [5, 6, 7] and v.stream and v.include_usage
    s = v.sampling
    assert (s.max_tokens, s.top_k, s.top_p, s.threshold, s.return_scores, s.stop_token_ids, s.ignore_eos) == \
        (LIMITS.max_model_len - 3, 4, 0.5, 0.25, True, (9,), True)
    msgs = [{"role": "user", "content": "hello"}]
    v = validate({"messages": msgs, "user": "u1", "presence_penalty": 0.0}, True, tok, LIMITS)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert v.prompt == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert v.sampling.max_tokens == LIMITS.max_model_len - len(v.prompt)  # chat: the context left by default


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs"),
                                          ({"echo": True}, "echo"), ({"presence_penalty": 0.5}, "presence_penalty"),
                                          ({"use_beam_search": True}, "use_beam_search"),
                                          ({"prompt": ["a", "b"]}, "prompt"),
                                          ({"router_threshold": 1.5}, "router_threshold"),
                                          ({"router_threshold": "0.5"}, "router_threshold"),
                                          ({"return_router_scores": "yes"}, "return_router_scores"),
                                          ({"stop_token_ids": [600]}, "stop_token_ids"),
                                          ({"stop": [""]}, None)])  # vLLM's SamplingParams: no param
def test_what_the_loop_does_not_do_is_refused_by_name(tok, extra, param):
    with pytest.raises(RequestError) as e:
        validate({"model": "r2r", "prompt": "hello", **extra}, False, tok, LIMITS)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    assert (param or next(iter(extra))) in e.value.message


# ------------------------------------------------------------------------------- isolation (no engines)
def test_a_failing_router_row_fails_only_its_request():
    import asyncio

    import torch

    from overdrive.adapters.vllm.routing.engines import RouterBatcher

    class Router:
        def scores(self, inputs):
            if (inputs.token == 13).any():
                raise IndexError("token 13 is outside the router's embedding table")
            return inputs.token.float()

    async def main():
        b = RouterBatcher(Router())
        return await asyncio.gather(*(b.score(torch.zeros(4), torch.zeros(2), t) for t in (5, 13, 7)),
                                    return_exceptions=True)

    five, bad, seven = asyncio.run(main())
    assert (five, seven) == (5.0, 7.0) and isinstance(bad, IndexError)


class _Engines:
    """Stand-in for RoutingEngines: prompts starting with 13 fail on 'the engine' after two tokens."""

    def __init__(self):
        from overdrive.adapters.vllm.routing.engines import RouterBatcher

        self.dead, self.threshold = False, 0.5
        self.totals = {"requests": 0, "tokens": 0, "routed_tokens": 0, "large_calls": 0, "failed": 0}
        self.batcher = RouterBatcher(None)

    async def generate(self, prompt, sp, seq_out):
        from overdrive.adapters.vllm.routing.engines import StepEvent
        from overdrive.contracts.token_routing import RoutedSequence

        seq = RoutedSequence(prompt, sp.max_tokens)
        seq_out.append(seq)
        self.totals["requests"] += 1
        while not seq.finished:
            if prompt[0] == 13 and len(seq.tokens) == 2:
                raise RuntimeError("the engine failed this request")
            seq.accept(40 + len(seq.tokens), False)
            yield StepEvent(seq.tokens[-1], False, 0.0)


def test_an_engine_error_fails_only_its_request_and_death_turns_health_503(tok):
    from fastapi.testclient import TestClient
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    from overdrive.adapters.vllm.routing.api import build_app

    app = build_app("r2r", "r2r")
    app.state.engines, app.state.tokenizer, app.state.limits = _Engines(), tok, LIMITS
    client = TestClient(app)
    ok = {"model": "r2r", "prompt": [5, 6], "max_tokens": 4}
    bad = {"model": "r2r", "prompt": [13, 6], "max_tokens": 4}
    r = client.post("/v1/completions", json=bad)
    assert r.status_code == 500 and ErrorResponse.model_validate(r.json()).error.type == "InternalServerError"
    r = client.post("/v1/completions", json=ok)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == [40, 41, 42, 43]
    events = [line[6:] for line in client.post("/v1/completions", json={**bad, "stream": True}).text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and ErrorResponse.model_validate(json.loads(events[-2])).error.code == 500
    assert len(events) == 4  # two tokens, the error, [DONE]
    r = client.post("/v1/completions", content=b'{"prompt": ')
    assert r.status_code == 400 and ErrorResponse.model_validate(r.json()).error.code == 400
    assert client.get("/r2r/stats").json()["failed"] == 2 and client.get("/health").status_code == 200
    app.state.engines.dead = True
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json=ok)
    assert r.status_code == 503 and ErrorResponse.model_validate(r.json()).error.code == 503
