"""`cpa-monitor collect` as real processes: one consumer per database, clean SIGTERM, `status`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

from collector_helpers import KEY, event, event_count, request_ids, service, settings_for, status, wait_for
from datasource.cli import cli
from datasource.fakecpa import FakeCPA
from datasource.lock import read_holder
from redis_server import RedisServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def server():
    with RedisServer(KEY) as srv:
        yield srv


def collect(db: str, url: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "datasource", "collect", "--db", db, "--cpa-url", url,
            "--cpa-management-key", KEY, "--collector-mode", "resp", "--pop-side", "left",
            "--poll-interval-ms", "100", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))


def read_until(proc: subprocess.Popen, text: str, timeout: float = 15.0) -> list[str]:
    """stderr lines of `proc` up to the first one containing `text` (read on a helper thread)."""
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), f"{text!r} not logged: {''.join(lines)}"
    return lines


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def enqueue_many(server: RedisServer, start: int, stop: int) -> None:
    pipe = server.client().pipeline(transaction=False)
    for i in range(start, stop):
        pipe.rpush("usage", event(i))
    pipe.execute()


def test_two_collector_processes_on_one_database_only_one_consumes(server, db_path):
    procs = [collect(db_path, server.url), collect(db_path, server.url)]
    try:
        holder = wait_for(lambda: read_holder(db_path + ".collector.lock"), timeout=15)
        assert holder.pid in (procs[0].pid, procs[1].pid)
        enqueue_many(server, 0, 300)
        wait_for(lambda: event_count(db_path) == 300, timeout=15)
        active = next(p for p in procs if p.pid == holder.pid)
        standby = next(p for p in procs if p.pid != holder.pid)
        warning = read_until(standby, "another collector holds")[-1]
        assert f"pid {holder.pid} host " in warning and "serves queries only" in warning
        active.kill()  # the holder dies: the other process takes the lock over
        active.wait(timeout=10)
        new_holder = wait_for(lambda: (h := read_holder(db_path + ".collector.lock")) and h.pid == standby.pid
                              and h, timeout=15)
        assert new_holder.pid == standby.pid
        enqueue_many(server, 300, 500)
        wait_for(lambda: event_count(db_path) == 500, timeout=15)
        assert request_ids(db_path) == [f"r{i:07d}" for i in range(500)]
        assert finish(standby)[0] == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_during_ingestion_leaves_no_half_batch_and_restart_resumes(server, db_path):
    total, batch = 12000, 100
    enqueue_many(server, 0, total)
    # pops of 100 stored in transactions of up to 300: SIGTERM must find the backlog mid-way
    proc = collect(db_path, server.url, "--batch-size", str(batch), "--commit-max", "300")
    try:
        wait_for(lambda: event_count(db_path) > 0, timeout=15, interval=0.02)
        code, _ = finish(proc)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stored, left = event_count(db_path), server.client().llen("usage")
    assert 0 < stored < total
    assert stored + left == total  # every popped item was stored before exit
    assert stored % batch == 0  # whole pops only (a transaction holds whole pops)
    assert status(db_path)["state"] == "stopped"
    again = collect(db_path, server.url, "--batch-size", str(batch))
    try:
        wait_for(lambda: event_count(db_path) == total, timeout=20)
        assert finish(again)[0] == 0
    finally:
        if again.poll() is None:
            again.kill()
    assert request_ids(db_path) == [f"r{i:07d}" for i in range(total)]
    row = status(db_path)
    assert (row["inserted"], row["duplicates"]) == (total, 0)


def test_status_command_prints_each_upstream(server, settings):
    svc = service(settings_for(settings, server.url, collector_mode="resp"))
    try:
        for i in range(3):
            server.enqueue(event(i))
        wait_for(lambda: status(settings.db).get("inserted") == 3)
        result = CliRunner().invoke(cli, ["status", "--db", settings.db])
    finally:
        svc.stop()
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == f"default  {server.url}"
    assert lines[1] == "  state running  transport resp  mode resp"
    assert lines[3] == "  inserted 3  duplicates 0  dead letters 0"
    assert lines[4] == "  usage publishing unknown  queue retention - s"
    assert lines[-1].startswith(f"collector lock {settings.db}.collector.lock: held by pid {os.getpid()} host ")


def test_collect_refuses_a_poll_interval_not_shorter_than_retention(db_path):
    cpa = FakeCPA(KEY, retention_s=1)
    cpa.start()
    try:
        result = CliRunner().invoke(cli, ["collect", "--db", db_path, "--cpa-url", cpa.url,
                                          "--cpa-management-key", KEY, "--poll-interval-ms", "1000"])
    finally:
        cpa.stop()
    assert result.exit_code == 1
    assert "poll interval 1000 ms is not shorter than CPA's queue retention 1 s" in result.output


def test_collect_without_upstream_is_a_clear_error(db_path):
    result = CliRunner().invoke(cli, ["collect", "--db", db_path])
    assert result.exit_code == 1
    assert "no CPA upstream configured (CPA_MONITOR_CPA_URL)" in result.output
