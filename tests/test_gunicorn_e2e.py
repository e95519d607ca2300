"""`cpa-monitor serve` as a real gunicorn subprocess: readiness poll, real HTTP, auth, shutdown."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from datasource.cli import cli
from datasource.cmd_serve import is_loopback
from tests.test_web import DAY, EVENTS, ingest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "e2e-Token-0001"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command() -> list[str]:
    exe = shutil.which("cpa-monitor")
    return [exe] if exe else [sys.executable, "-m", "datasource"]


def call(url: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_ready(base: str, proc: subprocess.Popen, log_path) -> None:
    """Poll GET / until serve answers 200; fail with its log if it exits or takes over 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if call(base + "/", token=None)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("serve did not become ready:\n" + open(log_path).read())
        time.sleep(0.1)


@pytest.fixture
def server(tmp_path):
    db = str(tmp_path / "monitor.db")
    assert ingest(db, EVENTS) == 5
    port = free_port()
    args = command() + ["serve", "--db", db, "--bind", f"127.0.0.1:{port}", "--api-token", TOKEN,
                        "--collector", "off", "--threads", "4"]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, tmp_path / "serve.log")
    yield base, log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    log.close()


def test_served_by_gunicorn_with_token(server):
    base, log = server
    assert call(base + "/healthz", token=None) == (200, {"ok": True, "version": "0.1.0", "collectors": []})
    status, body = call(base + "/query", {"targets": []}, token=None)
    assert (status, body["error"]["code"]) == (403, "AUTH_REQUIRED")
    status, body = call(base + "/query", {"targets": []}, token="guess-Token-9999")
    assert (status, body["error"]["code"]) == (403, "AUTH_FAILED")
    query = {"range": {"from": "2026-11-28T00:00:00.000Z", "to": "2026-11-28T06:00:00.000Z"},
             "intervalMs": 3600000, "maxDataPoints": 6,
             "targets": [{"refId": "A", "target": "summary", "payload": "{\"provider\": [\"codex\"]}"},
                         {"refId": "B", "target": "timeseries", "payload": {"measure": "requests"}},
                         {"refId": "C", "target": "requests", "hide": True}]}
    status, frames = call(base + "/query", query)
    assert status == 200 and [f["refId"] for f in frames] == ["A", "B"]
    summary = {f["name"]: f["values"] for f in frames[0]["fields"]}
    assert (summary["requests"], summary["failures"]) == ([3], [1])  # r1, r2 (429), r5
    series = {f["name"]: f["values"] for f in frames[1]["fields"]}
    assert series["time"] == [DAY + h * 3600000 for h in range(6)]
    assert series["requests"] == [4, 0, 0, 0, 0, 1]
    status, body = call(base + "/query", {"range": {"from": 2, "to": 1}})
    assert (status, body["error"]["code"]) == (400, "BAD_RANGE")
    log.seek(0)
    text = log.read()
    assert "Booting worker" in text and TOKEN not in text and "guess-Token" not in text


def test_serve_refuses_a_public_bind_without_credentials(db_path):
    result = CliRunner().invoke(cli, ["serve", "--db", db_path, "--bind", "0.0.0.0:8080", "--collector", "off"])
    assert result.exit_code == 1
    assert "refusing to listen on 0.0.0.0:8080 without credentials" in result.output


@pytest.mark.parametrize(("bind", "loopback"), [
    ("127.0.0.1:8080", True), ("127.0.0.2:80", True), ("localhost:8080", True), ("[::1]:8080", True),
    ("unix:/tmp/s.sock", True), ("0.0.0.0:8080", False), ("[::]:8080", False), ("192.168.1.5:8080", False),
    ("grafana.example:8080", False),
])
def test_is_loopback(bind, loopback):
    assert is_loopback(bind) is loopback


def test_debug_log_of_a_served_collector_holds_no_key_or_token(tmp_path):
    """gunicorn + app + collector logging at DEBUG: the management key (from a file, and inside two
    upstream URLs of a CPA that is down), the API token and the tokens clients guess stay out."""
    from redis_server import RedisServer

    key = "MGMT-e2eLEAK-key-0021"
    key_file = tmp_path / "management.key"
    key_file.write_text(key + "\n")
    db = str(tmp_path / "monitor.db")
    closed, port = free_port(), free_port()
    with RedisServer(key) as cpa:
        urls = (f"ok=http://127.0.0.1:{cpa.port},userinfo=http://admin:{key}@127.0.0.1:{closed},"
                f"query=http://127.0.0.1:{closed}/?key={key}")
        args = command() + ["serve", "--db", db, "--bind", f"127.0.0.1:{port}", "--api-token", TOKEN,
                            "--cpa-url", urls, "--cpa-management-key-file", str(key_file), "--log-level", "DEBUG",
                            "--threads", "2"]
        log_path = tmp_path / "serve.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, log_path)
            for guess in ("e2eLEAK-guess-0022", "e2eLEAK-bare-0023"):
                assert call(base + "/status", token=guess)[0] == 403
            request = urllib.request.Request(base + "/status", headers={"Authorization": "e2eLEAK-bare-0024"})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(request, timeout=10)
            deadline = time.monotonic() + 20
            while True:  # wait until every upstream has reported once
                status, body = call(base + "/status")
                states = {row["instance"]: row["state"] for row in body["collectors"]}
                if states.get("ok") == "running" and states.get("userinfo") == states.get("query") == "error":
                    break
                assert time.monotonic() < deadline, states
                time.sleep(0.2)
            assert key not in json.dumps(body) and TOKEN not in json.dumps(body)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
    text = log_path.read_text()
    assert "DEBUG" in text and "auth failed: wrong credentials (scheme other)" in text
    for secret in (key, TOKEN, "e2eLEAK-guess", "e2eLEAK-bare"):
        assert secret not in text, secret


def test_status_series_panels_posted_together_answer_as_alone(tmp_path):
    """Four Monitoring-style series grouped by status dims, 1-minute buckets (raw events: they
    share one read while it runs), posted at once and one by one: hand-counted answers both ways.
    Runs this checkout's code (python -m datasource from the repository root)."""
    from concurrent.futures import ThreadPoolExecutor

    db = str(tmp_path / "monitor.db")
    assert ingest(db, EVENTS) == 5
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "datasource", "serve", "--db", db, "--bind", f"127.0.0.1:{port}",
                             "--api-token", TOKEN, "--collector", "off", "--threads", "8"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, tmp_path / "serve.log")
        payloads = [{"measure": "requests", "split_by": "status_class"}, {"measure": "success_rate"},
                    {"measure": "failures", "split_by": "failure_type"},
                    {"measure": "failures", "split_by": "status_code"}]
        bodies = [{"range": {"from": "2026-11-28T00:00:00.000Z", "to": "2026-11-28T06:00:00.000Z"},
                   "intervalMs": 60000, "maxDataPoints": 1000,
                   "targets": [{"refId": "A", "target": "timeseries", "payload": p}]} for p in payloads]

        def series(body):
            status, frames = call(base + "/query", body)
            assert status == 200
            return {f["name"]: f["values"] for f in frames[0]["fields"]}

        alone = [series(b) for b in bodies]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                assert list(pool.map(series, bodies)) == alone
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log.close()

    def at(values):  # minute -> value where the value is not 0 / None
        return {i: v for i, v in enumerate(values) if v}

    by_class, rate, by_type, by_code = alone
    assert by_class["time"] == [DAY + m * 60000 for m in range(360)]
    assert (at(by_class["success"]), at(by_class["failed"])) == ({10: 1, 30: 1, 300: 1}, {20: 1, 40: 1})
    assert {i: v for i, v in enumerate(rate["success_rate"]) if v is not None} == {
        10: 1.0, 20: 0.0, 30: 1.0, 40: 0.0, 300: 1.0}
    assert list(by_type)[1:] == ["rate_limit", "upstream", "none"]  # r2 429, r4 500; by failures, then requests
    assert (at(by_type["rate_limit"]), at(by_type["upstream"]), at(by_type["none"])) == ({20: 1}, {40: 1}, {})
    assert list(by_code)[1:] == ["429", "500", "200"]
    assert (at(by_code["429"]), at(by_code["500"]), at(by_code["200"])) == ({20: 1}, {40: 1}, {})


def _arenas_applied(arenas: int, env_value: str | None) -> str:
    code = f"from datasource.cmd_serve import limit_malloc_arenas; print(limit_malloc_arenas({arenas}))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "MALLOC_ARENA_MAX"}
    if env_value is not None:
        env["MALLOC_ARENA_MAX"] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(__import__("os"), "confstr"),
                    reason="glibc only")
def test_serve_caps_malloc_arenas_unless_the_environment_or_the_setting_says_otherwise():
    import os

    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    if not glibc:
        pytest.skip("not glibc")
    assert _arenas_applied(2, None) == "True"  # mallopt(M_ARENA_MAX, 2) accepted
    assert _arenas_applied(2, "4") == "False"  # the operator's MALLOC_ARENA_MAX wins
    assert _arenas_applied(0, None) == "False"  # 0: glibc's default, nothing called
