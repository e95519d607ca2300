"""NormalizePool: a batch normalized half in a worker process, half in the caller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from datasource.model import Control, Normalized, Rejected
from datasource.normalize import normalize
from datasource.parallel import AUTO_IDLE_S, MIN_PARALLEL, NormalizePool, backlog_items
from datasource.parallel import usable_cpus as real_usable_cpus  # the autouse fixture replaces it in the module

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


def test_a_pending_batch_lets_go_of_its_bytes_once_normalized(pool):
    """The popped bytes are dropped once the result is in; a store retry asks result() again and
    gets the same list, and the batch keeps its length."""
    items = raws(200)
    pending = pool.submit(items)
    assert len(pending) == 200 and pending.raws == items
    first = pending.result()
    assert pending.raws == [] and len(pending) == 200
    assert pending.result() is first and len(first) == 200
    assert isinstance(first[7], Rejected) and first[7].payload == b"not json"  # dead letters keep theirs


def test_a_batch_submitted_to_two_workers_is_split_and_comes_back_in_input_order():
    two = NormalizePool(2, "east")
    try:
        items = raws(300)
        pending = two.submit(items)
        assert len(pending._futures) == 2  # one part per worker: 150 + 150
        got = pending.result()
        want = [normalize(r, instance="east") for r in items]
        assert len(got) == 300 and all(same(g, w) for g, w in zip(got, want))
        assert got[299].row["input_tokens"] == 299 and two.fallbacks == 0
        small = two.submit(raws(MIN_PARALLEL + 10))
        assert len(small._futures) == 1  # a part per worker only when each gets MIN_PARALLEL items
        assert len(small.result()) == MIN_PARALLEL + 10
    finally:
        two.close()


def test_small_batches_and_zero_workers_stay_in_process():
    zero = NormalizePool(0)
    assert zero.normalize_all(raws(200))[10].row["request_id"] == "r10"
    assert zero._pool is None
    one = NormalizePool(1)
    assert len(one.normalize_all(raws(MIN_PARALLEL - 1))) == MIN_PARALLEL - 1
    assert one._pool is None  # never started for a small batch
    one.close()


def test_min_items_keeps_smaller_batches_in_process_for_split_and_submit():
    """`auto`'s rule for subscription piles (normalize_all) and popped groups (submit) alike."""
    pool = NormalizePool(1, min_items=200)
    try:
        assert [o.row["request_id"] for o in pool.normalize_all(raws(199))[:2]] == ["r0", "r1"]
        assert not pool.submit(raws(199))._futures
        assert (pool.running, pool.starts) == (False, 0)
        assert len(pool.normalize_all(raws(200))) == 200
        assert (pool.running, pool.starts) == (True, 1)
    finally:
        pool.close()


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


def test_a_worker_ignores_sigint_and_stops_with_its_pool(pool):
    """Ctrl-C signals the process group: the worker leaves its end to the parent's orderly stop."""
    items = raws(100)
    first = pool.normalize_all(items)  # starts the worker (its initializer ran before its first task)
    (pid,) = list(pool._pool._processes)
    process = pool._pool._processes[pid]
    os.kill(pid, signal.SIGINT)
    again = pool.normalize_all(items)
    assert process.is_alive() and pool.fallbacks == 0  # still working: the same process answered
    assert all(same(a, b) for a, b in zip(again, first))
    pool.close()
    assert process.exitcode == 0  # ended by the shutdown, not by the signal


CONSOLE_LIKE_SCRIPT = """
import sys
from datasource.cli import cli  # all the cpa-monitor console script imports; spawn runs it again in the worker


def loaded():
    return sorted(sys.modules)


if __name__ == "__main__":
    from datasource.parallel import NormalizePool
    pool = NormalizePool(1, "east")
    try:
        print(" ".join(pool._executor().submit(loaded).result(timeout=60)))
    finally:
        pool.close()
"""


def test_a_worker_started_under_the_console_script_loads_no_web_or_queue_library(tmp_path):
    """spawn re-runs the parent's main script in the worker: for `cpa-monitor` that must stay light."""
    script = tmp_path / "console_like.py"
    script.write_text(CONSOLE_LIKE_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    modules = set(done.stdout.split())
    assert {"__mp_main__", "datasource.cli", "datasource.normalize"} <= modules  # the script and the worker's code
    heavy = {"flask", "werkzeug", "gunicorn", "redis", "apsw", "datasource.store", "datasource.collector"}
    assert modules & heavy == set()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        NormalizePool(-1)
    with pytest.raises(ValueError):
        NormalizePool(1, share=1.0)


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    """`auto` sees two usable CPUs, whatever machine runs the tests (it runs no worker on one)."""
    from datasource import parallel

    monkeypatch.setattr(parallel, "usable_cpus", lambda cpu_max=parallel.CGROUP_CPU_MAX: 2.0)


def _loop(settings, workers: int, batch: int, commit_max: int | None = None):
    """A loop storing into settings.db; commit_max defaults to one pop per transaction."""
    import threading
    from dataclasses import replace

    from datasource.db import open_database
    from datasource.ingest import Ingestor
    from datasource.upstream import UpstreamLoop

    s = replace(settings, normalize_workers=workers, batch_size=batch, commit_max=commit_max or batch,
                cpa_url="http://127.0.0.1:1",
                cpa_management_key="k")
    loop = UpstreamLoop(s, "default", s.cpa_url, threading.Event())
    loop.conn = open_database(s.db)
    loop.ingestor = Ingestor(loop.conn, "default", normalize_workers=workers,
                             behind_items=backlog_items(s.batch_size, s.commit_max))
    return loop


def _events(lo: int, hi: int) -> list[bytes]:
    return [json.dumps({"timestamp": NOW_MS + i, "model": "gpt-5.4", "request_id": f"r{i:04d}",
                        "tokens": {"input_tokens": i}}).encode() for i in range(lo, hi)]


def _pops_then_reset(batches: list[list[bytes]]):
    """A pop that hands out `batches` in order, then fails as a dropped connection would."""
    def pop() -> list[bytes]:
        if not batches:
            raise ConnectionError("connection reset")
        return batches.pop(0)
    return pop


@pytest.mark.parametrize("workers", [0, 1, "auto"])
def test_pump_pops_ahead_only_with_a_worker_and_stores_every_batch_once_in_order(settings, workers):
    loop = _loop(settings, workers, batch=100)
    batches = [_events(0, 100), _events(100, 200), _events(200, 250), []]
    stored_at_pop: list[int] = []

    def pop() -> list[bytes]:
        stored_at_pop.append(loop.conn.execute("SELECT count(*) FROM events").get)
        return batches.pop(0)

    try:
        assert loop.pump(pop, drain=False) == 250
        # with a worker the next batch is popped (and normalized meanwhile) before the previous one
        # is stored: at most two batches in memory; without one, each pop follows the commit
        # `auto` pops ahead of the two full pops (the loop is behind), not of the short one of 50
        assert stored_at_pop == {0: [0, 100, 200, 250], 1: [0, 0, 100, 200], "auto": [0, 0, 100, 250]}[workers]
        ids = [r[0] for r in loop.conn.execute("SELECT request_id FROM events ORDER BY id")]
        assert ids == [f"r{i:04d}" for i in range(250)]
        assert (loop.status.inserted, loop.status.duplicates) == (250, 0)
    finally:
        loop.ingestor.close()
        loop.conn.close()


@pytest.mark.parametrize("workers", [0, 1, "auto"])
def test_pump_stores_consecutive_full_pops_together_up_to_commit_max(settings, monkeypatch, workers):
    from datasource import store

    loop = _loop(settings, workers, batch=100, commit_max=300)
    batches = [_events(0, 100), _events(100, 200), _events(200, 300), _events(300, 400), _events(400, 500),
               _events(500, 537), []]
    stored_at_pop: list[int] = []
    transactions: list[int] = []
    insert_batch = store.insert_batch

    def spy(conn, items, **kw):  # the real insert; records each transaction's size
        transactions.append(len(items))
        return insert_batch(conn, items, **kw)

    def pop() -> list[bytes]:
        stored_at_pop.append(loop.conn.execute("SELECT count(*) FROM events").get)
        return batches.pop(0)

    monkeypatch.setattr(store, "insert_batch", spy)
    try:
        assert loop.pump(pop, drain=False) == 537
        # three full pops fill a group of 300 (a fourth would pass it); the next group ends at the short pop
        assert transactions == [300, 237]
        # both groups pass backlog_items(100, 300) = 201 (full pops up to the cap), so `auto` pops ahead
        # like one worker
        assert stored_at_pop == ([0, 0, 0, 0, 0, 0, 300] if workers else [0, 0, 0, 300, 300, 300, 537])
        ids = [r[0] for r in loop.conn.execute("SELECT request_id FROM events ORDER BY id")]
        assert ids == [f"r{i:04d}" for i in range(537)]
        assert (loop.status.inserted, loop.status.duplicates) == (537, 0)
    finally:
        loop.ingestor.close()
        loop.conn.close()


def test_pump_stores_a_partial_group_when_a_later_pop_fails(settings, monkeypatch):
    from datasource import store

    loop = _loop(settings, 0, batch=100, commit_max=1000)
    batches = [_events(0, 100), _events(100, 200)]
    transactions: list[int] = []
    insert_batch = store.insert_batch
    monkeypatch.setattr(store, "insert_batch",
                        lambda conn, items, **kw: transactions.append(len(items)) or insert_batch(conn, items, **kw))

    pop = _pops_then_reset(batches)
    try:
        with pytest.raises(ConnectionError):
            loop.pump(pop, drain=False)
        assert transactions == [200]  # the two popped batches, stored before the error went up
        assert loop.conn.execute("SELECT count(*), sum(input_tokens) FROM events").fetchone() == (200, 19900)
    finally:
        loop.ingestor.close()
        loop.conn.close()


def test_pump_stores_the_batch_in_hand_when_a_pop_fails_and_drain_stops_at_a_short_pop(settings):
    loop = _loop(settings, 1, batch=100)
    batches = [_events(0, 100), _events(100, 200)]
    pop = _pops_then_reset(batches)
    try:
        with pytest.raises(ConnectionError):
            loop.pump(pop, drain=False)
        assert loop.conn.execute("SELECT count(*), sum(input_tokens) FROM events").fetchone() == (200, 19900)
        batches[:] = [_events(200, 300), _events(300, 340), _events(340, 400)]
        assert loop.pump(pop, drain=True) == 140  # stops after the short pop of 40
        assert loop.conn.execute("SELECT count(*) FROM events").get == 340
        assert len(batches) == 1
    finally:
        loop.ingestor.close()
        loop.conn.close()


def test_pump_stopping_during_a_store_outage_gives_up_each_held_batch_once(settings, caplog):
    import apsw

    from datasource.db import connect

    loop = _loop(settings, 1, batch=100)
    loop.conn.set_busy_timeout(50)
    blocker = connect(settings.db)
    batches = [_events(0, 100), _events(100, 160)]

    def pop() -> list[bytes]:
        if len(batches) == 1:  # batch 1 is prepared; the store locks up and stop comes while batch 2 is popped
            blocker.execute("BEGIN IMMEDIATE")
            loop.stop.set()
        return batches.pop(0)

    try:
        with caplog.at_level("ERROR", logger="datasource.upstream"):
            with pytest.raises(apsw.BusyError):
                loop.pump(pop, drain=False)
        gave_up = [r.getMessage().split(": ")[1] for r in caplog.records
                   if "popped items not stored" in r.getMessage()]
        # the batch being stored (100) and the one popped ahead (60): each given up once, none twice
        assert gave_up == ["stopping with 100 popped items not stored", "stopping with 60 popped items not stored"]
        blocker.execute("ROLLBACK")
        assert loop.conn.execute("SELECT count(*) FROM events").get == 0
        assert loop.conn.execute("SELECT count(*) FROM event_ledger").get == 0
    finally:
        blocker.close()
        loop.ingestor.close()
        loop.conn.close()


def test_auto_starts_its_worker_only_for_backlog_groups_and_stops_it_when_idle(settings, caplog):
    """Pops of 100, one per transaction, so a full pop reaches the cap (backlog_items): short ones
    (40, 30) are normalized in the loop and no worker starts; a full one starts it; a pump AUTO_IDLE_S after the last full group stops it, and the next full group
    starts it again. Every event is stored once, in pop order, and the log says each start and stop."""
    caplog.set_level("INFO", logger="datasource.ingest")
    loop = _loop(settings, "auto", batch=100)
    clock = [1000.0]
    normalizer = loop.ingestor.normalizer
    normalizer._clock = lambda: clock[0]
    try:
        assert loop.pump(_pops_then_reset([_events(0, 40), _events(40, 70), []]), drain=False) == 70
        assert (normalizer.running, normalizer.starts) == (False, 0)
        assert loop.pump(_pops_then_reset([_events(70, 170), []]), drain=False) == 100
        assert (normalizer.running, normalizer.starts) == (True, 1)
        clock[0] += AUTO_IDLE_S - 1  # not idle long enough: kept
        assert loop.pump(_pops_then_reset([_events(170, 180), []]), drain=False) == 10
        assert (normalizer.running, normalizer.starts) == (True, 1)
        clock[0] += 1  # AUTO_IDLE_S since the full group: stopped at the next pump
        assert loop.pump(_pops_then_reset([[]]), drain=False) == 0
        assert (normalizer.running, normalizer.starts) == (False, 1)
        assert loop.pump(_pops_then_reset([_events(180, 280), []]), drain=False) == 100
        assert (normalizer.running, normalizer.starts) == (True, 2)
        ids = [r[0] for r in loop.conn.execute("SELECT request_id FROM events ORDER BY id")]
        assert ids == [f"r{i:04d}" for i in range(280)]
        said = [r.getMessage() for r in caplog.records if r.name == "datasource.ingest"]
        assert said == ["default: starting a normalize worker: a group of 100 items, the collector is behind its queue",
                        f"default: normalize worker stopped (no backlog for {AUTO_IDLE_S:.0f} s)",
                        "default: starting a normalize worker: a group of 100 items, the collector is behind its queue"]
    finally:
        loop.ingestor.close()
        loop.conn.close()


def test_a_fixed_worker_count_is_never_released(settings):
    loop = _loop(settings, 1, batch=100)
    clock = [1000.0]
    normalizer = loop.ingestor.normalizer
    normalizer._clock = lambda: clock[0]
    try:
        assert loop.pump(_pops_then_reset([_events(0, 100), []]), drain=False) == 100
        clock[0] += 100 * AUTO_IDLE_S
        assert loop.pump(_pops_then_reset([[]]), drain=False) == 0
        assert (normalizer.running, normalizer.starts) == (True, 1)
    finally:
        loop.ingestor.close()
        loop.conn.close()


@pytest.mark.parametrize("value, plan", [("auto", (1, True)), (" AUTO ", (1, True)), ("0", (0, False)),
                                         ("2", (2, False)), (1, (1, False))])
def test_worker_plan_reads_the_setting(value, plan):
    from datasource.parallel import worker_plan

    assert worker_plan(value, cpus=2) == plan


def test_auto_runs_no_worker_with_one_usable_cpu():
    from datasource.parallel import worker_plan

    assert worker_plan("auto", cpus=1) == (0, True)
    assert worker_plan("auto", cpus=1.5) == (1, True)  # `--cpus 1.5`: the worker has half a core
    assert worker_plan("1", cpus=1) == (1, False)  # a number is taken as given


@pytest.mark.parametrize("text, cpus", [("max 100000\n", 2), ("100000 100000\n", 1.0), ("150000 100000", 1.5),
                                        ("400000 100000", 2), ("garbage", 2), ("100000 0", 2)])
def test_usable_cpus_takes_the_cgroup_quota_under_the_affinity(tmp_path, monkeypatch, text, cpus):
    """Two CPUs in the affinity mask; cgroup v2's cpu.max caps them when it sets a quota ("quota period")."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert real_usable_cpus(str(path), str(tmp_path / "v1")) == cpus
    # neither cgroup file: the affinity
    assert real_usable_cpus(str(tmp_path / "none"), str(tmp_path / "v1")) == 2


@pytest.mark.parametrize("quota, cpus", [("100000", 1.0), ("-1", 2), ("250000", 2)])
def test_usable_cpus_reads_cgroup_v1_when_there_is_no_v2_file(tmp_path, monkeypatch, quota, cpus):
    """cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us (period 100000 here), -1 for no quota."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text(quota + "\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert real_usable_cpus(str(tmp_path / "cpu.max"), str(v1)) == cpus


@pytest.mark.parametrize("value", ["-1", "one", "", "1.5"])
def test_worker_plan_refuses_anything_else(value):
    from datasource.parallel import worker_plan

    with pytest.raises(ValueError, match="normalize workers must be auto or a whole number >= 0"):
        worker_plan(value)


def test_backlog_items_is_a_group_that_reached_the_transaction_cap() -> None:
    """Pops of 500 capped at 4,000: a group stops before a pop that would pass the cap, so one that
    reached it holds over 3,500 (8 full pops hold 4,000); one pop per transaction: a full pop."""
    assert backlog_items(500, 4000) == 3501
    assert backlog_items(100, 100) == 100
    assert backlog_items(100, 300) == 201
    assert backlog_items(500, 200) == 500  # a cap below a pop: a full pop
