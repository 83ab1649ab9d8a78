"""The served-load benchmark's machinery in --quick mode: its load generator against an in-process stub
OpenAI server (no engine). Counts, greedy/sampled split, malformed requests mid-stream and the 4xx check."""
from __future__ import annotations

import json

from overdrive.benchmarks import serving


def test_requests_mix_greedy_sampled_and_malformed_in_the_middle():
    reqs = serving.make_requests("m", 200, 16, malformed_every=25)
    kinds = [r.kind for r in reqs]
    assert kinds.count("greedy") == kinds.count("sampled") == 100
    bad = [i for i, k in enumerate(kinds) if k == "malformed"]
    assert bad and bad[0] > 10 and bad[-1] < len(reqs) - 10  # neither at the start nor at the end
    bodies = [json.loads(r.body) for r in reqs if r.kind == "sampled"]
    assert all(b["temperature"] > 0 and "seed" in b for b in bodies)


def test_quick_run_reports_counts_and_4xx(tmp_path):
    out = tmp_path / "r.json"
    assert serving.main(["--quick", "--requests", "80", "--concurrency", "8", "--max-tokens", "5",
                         "--malformed-every", "10", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["completions"] == 80 and r["failures"] == 0 and r["completion_tokens"] == 400
    assert r["malformed"] >= 5 and r["malformed_all_4xx"] and r["server_up_after"]
    assert r["latency_p50_s"] <= r["latency_p99_s"]


def test_a_server_answering_malformed_requests_with_500_is_flagged(tmp_path):
    out = tmp_path / "r.json"
    serving.main(["--quick", "--misbehave", "--requests", "40", "--concurrency", "4", "--malformed-every", "10",
                  "--json", str(out)])
    r = json.loads(out.read_text())["results"][0]
    assert not r["malformed_all_4xx"] and any(s.startswith("500") for s in r["malformed_statuses"])


def test_only_loopback():
    import pytest

    with pytest.raises(ValueError, match="127.0.0.1"):
        serving.run_load("http://10.0.0.1:8000", [], 1, 1)
