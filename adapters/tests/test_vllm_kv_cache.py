"""The full-precision (sink + recent window) store bookkeeping of the vLLM KV-cache backend, simulated
against an independent record of what was written where; no vLLM process needed."""
from __future__ import annotations

import random

import torch

from overdrive.adapters.vllm.kv_cache import FullPrecisionStore, backend_class_name, backend_name, plan_env
from overdrive.contracts.kv_cache import LayerKVFormat

BS, SINK, WINDOW = 4, 1, 4
FMT = LayerKVFormat(layer=0, num_kv_heads=1, head_size=32, bits=2, group=32, sink=SINK, window=WINDOW, cell_bytes=32)


def test_window_start_closed_form():
    # sink 1, window 4: chunks [1, 5), [5, 9), ... are flushed once complete
    assert [FMT.window_start(n) for n in (0, 1, 2, 4, 5, 6, 9, 13)] == [1, 1, 1, 1, 5, 5, 9, 13]


def test_one_row_by_hand():
    st = FullPrecisionStore(BS, SINK, FMT.window_start)
    table = [[7, 3, 5, 6]]
    r = st.step([10], [10], [0, 10], table)  # prefill of 10 tokens
    assert r["w_index"] == [0, 9]  # the sink and position 9 (window [9, 10) after the flush of [1, 9))
    assert set(st.slot_of) == {7, 5}
    r = st.step([11], [1], [0, 1], table)  # decode: reads sink + [9, 10) from the store, writes 10
    assert r["fp_from"] == [9] and r["sink_ok"] == [1] and r["w_index"] == [0]
    r = st.step([12], [1], [0, 1], table)
    assert r["fp_from"] == [9]
    r = st.step([13], [1], [0, 1], table)  # total 13 flushes [9, 13): nothing new kept
    assert r["fp_from"] == [9] and r["w_index"] == []
    r = st.step([14], [1], [0, 1], table)
    assert r["fp_from"] == [13] and set(st.slot_of) == {7, 6}  # block 5 released, 6 holds position 13
    fbt = st.block_table(torch.tensor(table, dtype=torch.int32))
    assert fbt[0, 1].item() == -1 and fbt[0, 2].item() == -1 and fbt[0, 0].item() == st.slot_of[7]


def test_random_schedules_against_an_independent_record():
    rnd = random.Random(0)
    st = FullPrecisionStore(BS, SINK, FMT.window_start)
    free_blocks = list(range(200))
    rnd.shuffle(free_blocks)
    rows: dict[int, dict] = {}  # request id -> {"len": cached tokens, "blocks": [...], "missed": bool}
    written: dict[int, tuple[int, int]] = {}  # store position (slot * BS + offset) -> (request, position)
    next_id, checked, fallbacks = 0, 0, 0
    for _ in range(300):
        if len(rows) < 4 and rnd.random() < 0.3:
            rows[next_id] = {"len": 0, "blocks": [], "missed": False}
            next_id += 1
        if rows and rnd.random() < 0.05:  # a request finishes; its blocks return to the pool
            rid = rnd.choice(list(rows))
            free_blocks.extend(rows.pop(rid)["blocks"])
        for rid in [rid for rid, row in rows.items() if row["len"] > 24]:  # at most 8 blocks per request
            free_blocks.extend(rows.pop(rid)["blocks"])
        sched = [rid for rid in rows if rnd.random() < 0.9]
        for rid in rows:
            if rid not in sched:
                rows[rid]["missed"] = True
        if not sched:
            continue
        seq, q, qsl, table = [], [], [0], []
        for rid in sched:
            row = rows[rid]
            n = rnd.choice([1, 1, 1, 3, 7]) if row["len"] else rnd.randint(1, 11)
            total = row["len"] + n
            while len(row["blocks"]) * BS < total:
                row["blocks"].append(free_blocks.pop())
            seq.append(total)
            q.append(n)
            qsl.append(qsl[-1] + n)
            table.append(row["blocks"] + [-1] * (8 - len(row["blocks"])))
        res = st.step(seq, q, qsl, table)
        for i, rid in enumerate(sched):
            prev = seq[i] - q[i]
            ws = FMT.window_start(prev)
            fp_from = res["fp_from"][i]
            assert fp_from >= max(ws, min(SINK, prev))
            if not rows[rid]["missed"]:
                assert fp_from == max(ws, min(SINK, prev)), "a row scheduled every step keeps its whole window"
                assert res["sink_ok"][i] == 1, "... and its sink"
            fallbacks += fp_from > max(ws, min(SINK, prev))
            reads = list(range(fp_from, prev)) + (list(range(min(SINK, prev))) if res["sink_ok"][i] else [])
            for p in reads:  # every position read from the store holds this request's token p
                blk = table[i][p // BS]
                assert written[st.slot_of[blk] * BS + p % BS] == (rid, p)
                checked += 1
        tok_req = [(rid, seq[i] - q[i] + j) for i, rid in enumerate(sched) for j in range(q[i])]
        for idx, dst in zip(res["w_index"], res["w_slot"]):
            written[dst] = tok_req[idx]
        for rid, total in zip(sched, seq):
            rows[rid]["len"] = total
    assert st.capacity <= 4 * 8  # slots are recycled: at most a few blocks per live request
    assert checked > 300 and fallbacks > 0  # the schedule exercised reads and the fallback path


def test_names():
    assert backend_name("pmkvq") == "PMKVQ" and plan_env("pmkvq") == "OVERDRIVE_PMKVQ_PLAN"
    assert backend_class_name("pmkvq", 48) == "PmkvqBackend_48B"
