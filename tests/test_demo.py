"""`cpa-monitor demo`: the stack on its own, and the command as a subprocess on a fresh database."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import apsw
import pytest

from datasource.config import Settings
from datasource.demo import DemoStack, free_port

ROOT = Path(__file__).resolve().parent.parent


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _count(db: str, sql: str) -> int:
    if not os.path.exists(db):
        return 0
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(conn.execute(sql).fetchall()[0][0])
    except apsw.SQLError:  # schema not created yet
        return 0
    finally:
        conn.close()


def test_stack_publishes_through_the_proxy_and_serves_the_management_api(tmp_path):
    stack = DemoStack(Settings.from_env({}, db=str(tmp_path / "m.db"), demo_rate=50.0), seed=3, backfill_s=60)
    served = stack.start()
    try:
        assert served.cpa_url == stack.cpa.url and served.cpa_management_key == stack.key
        assert served.collector == "on"
        assert stack.cpa.queue_len() >= 3000  # 60 s x 50/s queued before any collector
        time.sleep(0.5)
        assert stack.publisher.published > 3000
        req = urllib.request.Request(stack.cpa.url + "/v0/management/auth-files",
                                     headers={"Authorization": f"Bearer {stack.key}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            files = json.loads(resp.read())["files"]
        assert [f["name"] for f in files][:3] == ["alice.json", "bob.json", "carol.json"]
        redis_port = stack.redis.port
    finally:
        stack.stop()
    assert _refused(redis_port) and _refused(int(served.cpa_url.rsplit(":", 1)[1]))
    stack.stop()  # idempotent


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_command_fills_a_fresh_database_and_stops_cleanly(tmp_path, signum):
    db = str(tmp_path / "fresh" / "monitor.db")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPA_MONITOR_")}
    env.update(XDG_DATA_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "datasource", "demo", "--db", db, "--bind", f"127.0.0.1:{port}",
         "--demo-rate", "20", "--backfill-minutes", "1", "--seed", "5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and _count(db, "SELECT count(*) FROM events") < 1200:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        events = _count(db, "SELECT count(*) FROM events")
        assert events >= 1200  # the minute of backfill (20/s) went through the real collector
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            health = json.loads(resp.read())
        assert health["collectors"][0]["state"] == "running"
    finally:
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    cpa_port = int(re.search(r"demo CPA \(stand-in\)\s+http://127\.0\.0\.1:(\d+)", out).group(1))
    redis_port = int(re.search(r"queue \(embedded Redis\) 127\.0\.0\.1:(\d+)", out).group(1))
    assert f"http://127.0.0.1:{port}" in out and str(tmp_path / "fresh") in out
    assert _refused(port) and _refused(cpa_port) and _refused(redis_port)
    assert "Traceback" not in err
