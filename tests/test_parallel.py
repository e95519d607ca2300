"""NormalizePool: a batch normalized half in a worker process, half in the caller."""

from __future__ import annotations

import json
import os
import signal

import pytest

from datasource.model import Control, Normalized, Rejected
from datasource.normalize import normalize
from datasource.parallel import MIN_PARALLEL, NormalizePool

NOW_MS = 1_778_033_730_123


def raws(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        out.append(json.dumps({"timestamp": NOW_MS + i, "model": "gpt-5.4", "provider": "codex",
                               "request_id": f"r{i}", "tokens": {"input_tokens": i, "output_tokens": 2 * i},
                               "latency_ms": 100 + i}).encode())
    out[3] = b'{"refresh": true}'
    out[7] = b"not json"
    out[-2] = b'{"support_refresh": true}'
    return out


def same(a, b) -> bool:
    """Equal but for created_ms (the time the item was normalized)."""
    if isinstance(a, Normalized) and isinstance(b, Normalized):
        return ({**a.row, "created_ms": 0}, a.private, a.ledger_hash) == ({**b.row, "created_ms": 0}, b.private,
                                                                           b.ledger_hash)
    return a == b


@pytest.fixture
def pool():
    p = NormalizePool(1, "east")
    yield p
    p.close()


def test_results_match_local_normalize_in_input_order(pool):
    items = raws(200)
    got = pool.normalize_all(items)
    want = [normalize(r, instance="east") for r in items]
    assert len(got) == 200
    assert all(same(g, w) for g, w in zip(got, want))
    assert isinstance(got[3], Control) and got[3].kind == "refresh"
    assert isinstance(got[7], Rejected) and got[7].payload == b"not json"
    assert got[0].row["instance"] == "east" and got[0].row["input_tokens"] == 0
    assert got[150].row["input_tokens"] == 150 and got[150].row["output_tokens"] == 300
    assert pool.fallbacks == 0


def test_small_batches_and_zero_workers_stay_in_process():
    zero = NormalizePool(0)
    assert zero.normalize_all(raws(200))[10].row["request_id"] == "r10"
    assert zero._pool is None
    one = NormalizePool(1)
    assert len(one.normalize_all(raws(MIN_PARALLEL - 1))) == MIN_PARALLEL - 1
    assert one._pool is None  # never started for a small batch
    one.close()


def test_a_killed_worker_costs_nothing_but_time(pool):
    items = raws(100)
    pool.normalize_all(items)  # starts the worker
    for pid in list(pool._pool._processes):
        os.kill(pid, signal.SIGKILL)
    got = pool.normalize_all(items)  # the worker part is redone here
    assert [g.row["request_id"] if isinstance(g, Normalized) else None for g in got] == \
        [f"r{i}" if i not in (3, 7, 98) else None for i in range(100)]
    assert pool.fallbacks == 1
    again = pool.normalize_all(items)  # a fresh worker next time
    assert all(same(a, b) for a, b in zip(again, got))
    assert pool.fallbacks == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        NormalizePool(-1)
    with pytest.raises(ValueError):
        NormalizePool(1, share=1.0)
