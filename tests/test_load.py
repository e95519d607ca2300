"""Load: 20 Grafana clients on the Monitoring dashboard while the collector ingests 500 events/s.

One run of benchmarks.bench_load per collector mode (real redis-server queue, `cpa-monitor serve`
under gunicorn with the collector on, real HTTP on loopback), shared by the tests below:
`subscribe` (what auto mode uses against CPA: events are PUBLISHed while a subscriber is attached,
queued otherwise) for 60 s of production, and `resp` (RPUSH + pops) for 20 s, each plus the drain.
LOAD_TEST_SECONDS sets both durations for local iteration. Latencies are printed, never asserted:
this machine's 2 cores are shared and timings are noisy.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.bench_load import MANAGEMENT_KEY, TOKEN, LoadResult, report, run_load

pytestmark = pytest.mark.slow
RATE, CLIENTS, REFRESH_S = 500, 20, 5.0
SECONDS = {mode: float(os.environ.get("LOAD_TEST_SECONDS", default))
           for mode, default in (("subscribe", "60"), ("resp", "20"))}


@pytest.fixture(scope="module", params=["subscribe", "resp"])
def load(request, tmp_path_factory) -> tuple[str, LoadResult]:
    mode = request.param
    result = run_load(str(tmp_path_factory.mktemp(f"load-{mode}")), rate=RATE, seconds=SECONDS[mode],
                      clients=CLIENTS, refresh_s=REFRESH_S, mode=mode, drain_timeout_s=180.0)
    return mode, result


def test_every_produced_event_is_stored_exactly_once(load, capsys):
    mode, result = load
    with capsys.disabled():
        print("\n" + report(result, rate=RATE, seconds=SECONDS[mode], clients=CLIENTS, refresh_s=REFRESH_S,
                            mode=mode))
    assert result.produced == int(RATE * SECONDS[mode])
    assert (result.stored, result.dead_letters) == (result.produced, 0)
    assert result.summary_requests == result.produced  # the API counts the same number over HTTP
    # the collector consumed while the clients queried: the queue never held the whole run
    assert result.max_backlog < result.produced
    if mode == "resp":
        assert result.max_backlog > 0
    # the subscription lived through the run: no collector error (a read timeout once ended it)
    collector_errors = [line for line in result.log.splitlines()
                        if "datasource.upstream" in line and " error: " in line]
    assert collector_errors == []


def test_no_5xx_and_every_answer_is_json(load):
    _, result = load
    per_refresh = 10 + 15 + 2  # query variables, panels, annotations of cpa-monitoring
    assert len(result.samples) >= CLIENTS * per_refresh  # every client finished at least one refresh
    assert result.server_errors == []
    assert result.invalid_json == []
    assert result.not_ok == []


def test_server_stopped_cleanly_and_logged_no_secret(load):
    _, result = load
    assert result.server_exit == 0
    assert "Traceback" not in result.log and " ERROR " not in result.log
    assert TOKEN not in result.log and MANAGEMENT_KEY not in result.log
    assert "Booting worker" in result.log
