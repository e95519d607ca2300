"""Load: 20 Grafana clients on the Monitoring dashboard while the collector ingests 500 events/s.

One run of benchmarks.bench_load (real redis-server queue, `cpa-monitor serve` under gunicorn
with the collector on, real HTTP on loopback) shared by the tests below. The run lasts 60 s of
production plus the drain (LOAD_TEST_SECONDS shortens it for local iteration). Latencies are
printed, never asserted: this machine's 2 cores are shared and timings are noisy.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.bench_load import MANAGEMENT_KEY, TOKEN, LoadResult, report, run_load

pytestmark = pytest.mark.slow
RATE, CLIENTS, REFRESH_S, MODE = 500, 20, 5.0, "resp"
SECONDS = float(os.environ.get("LOAD_TEST_SECONDS", "60"))


@pytest.fixture(scope="module")
def load(tmp_path_factory) -> LoadResult:
    result = run_load(str(tmp_path_factory.mktemp("load")), rate=RATE, seconds=SECONDS, clients=CLIENTS,
                      refresh_s=REFRESH_S, mode=MODE, drain_timeout_s=180.0)
    return result


def test_every_produced_event_is_stored_exactly_once(load, capsys):
    with capsys.disabled():
        print("\n" + report(load, rate=RATE, seconds=SECONDS, clients=CLIENTS, refresh_s=REFRESH_S, mode=MODE))
    assert load.produced == int(RATE * SECONDS)
    assert (load.stored, load.dead_letters) == (load.produced, 0)
    assert load.summary_requests == load.produced  # the API counts the same number over HTTP
    # the collector consumed while the clients queried: the queue never held the whole run
    assert 0 < load.max_backlog < load.produced


def test_no_5xx_and_every_answer_is_json(load):
    per_refresh = 10 + 15 + 2  # query variables, panels, annotations of cpa-monitoring
    assert len(load.samples) >= CLIENTS * per_refresh  # every client finished at least one refresh
    assert load.server_errors == []
    assert load.invalid_json == []
    assert load.not_ok == []


def test_server_stopped_cleanly_and_logged_no_secret(load):
    assert load.server_exit == 0
    assert "Traceback" not in load.log and " ERROR " not in load.log
    assert TOKEN not in load.log and MANAGEMENT_KEY not in load.log
    assert "Booting worker" in load.log
