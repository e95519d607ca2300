"""Faults the collector survives (issue 7): CPA down, garbage from CPA, keys, dropped subscriptions,
SIGKILL, a full or read-only database, a long reader.

Every fault is checked where the operator sees it: the status row (`cpa-monitor status`, GET /status)
and the collector-gap annotations from POST /query. Real parts throughout: redis-server, FakeCPA,
SQLite files, a tmpfs mount for the full disk, `cpa-monitor collect` processes for SIGKILL.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from collector_helpers import (FAST, KEY, event, event_count, query, request_ids, scalar, service, settings_for,
                               status, wait_for)
from datasource.app import create_app
from datasource.cli import cli
from datasource.config import Settings
from datasource.fakecpa import FakeCPA
from datasource.upstream import Timing, UpstreamLoop
from redis_server import RedisServer, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}


# --- what the operator sees ------------------------------------------------------------------
def web(db: str):
    return create_app(Settings.from_env({}, db=db, collector="off")).test_client()


def web_status(db: str, client=None) -> dict:
    body = (client or web(db)).get("/status").get_json()
    assert body["ok"] is True
    return {row["instance"]: row for row in body["collectors"]}["default"]


def read_only_summary(db: str) -> int:
    """`summary` from a datasource started now (create_app writes nothing when the schema is current)."""
    return _summary_requests(web(db))


def annotations(db: str) -> list[tuple[str, str, bool]]:
    """(title, text, closed) of every collector-gap annotation POST /query returns."""
    body = {"range": WINDOW, "targets": [{"refId": "G", "target": "annotations",
                                          "payload": {"kind": "collector_gaps"}}]}
    response = web(db).post("/query", json=body)
    assert response.status_code == 200
    [frame] = response.get_json()
    cols = {f["name"]: f["values"] for f in frame["fields"]}
    return [(title, text, end is not None and end >= start) for title, text, start, end in
            zip(cols["title"], cols["text"], cols["time"], cols["timeEnd"])]


def episodes(db: str) -> list[tuple[str, str, bool]]:
    return [(kind, detail, end is not None) for kind, detail, end in
            query(db, "SELECT kind, detail, end_ms FROM collector_episodes ORDER BY id")]


def status_text(db: str) -> str:
    result = CliRunner().invoke(cli, ["status", "--db", db])
    assert result.exit_code == 0, result.output
    return result.output


# --- CPA down ----------------------------------------------------------------------------------
def test_backoff_schedule_is_1s_doubling_to_30s(settings):
    stop = threading.Event()
    stop.set()  # wait() returns at once: only the schedule is observed
    loop = UpstreamLoop(settings_for(settings, "http://127.0.0.1:1"), "default", "http://127.0.0.1:1", stop,
                        timing=Timing())
    seen = []
    for _ in range(8):
        seen.append(loop.backoff_s)
        loop.wait_backoff()
    assert seen == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_cpa_down_at_start_backs_off_then_consumes_when_it_appears(settings):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    svc = service(settings_for(settings, url, collector_mode="resp"))
    try:
        failures: list[int] = []

        def four_failures() -> bool:
            ms = status(settings.db).get("last_error_ms")
            if ms and (not failures or failures[-1] != ms):
                failures.append(ms)
            return len(failures) >= 4

        wait_for(four_failures, timeout=10, interval=0.01)
        row = status(settings.db)
        assert (row["state"], row["last_error_stage"]) == ("error", "connect")
        assert "refused" in row["last_error"].lower()
        gaps = [b - a for a, b in zip(failures, failures[1:])]
        # FAST timing: 0.2 s doubling (0.2, 0.4, 0.8); the machine is shared, so allow late wake-ups
        for got, want in zip(gaps, (200, 400, 800)):
            assert want * 0.9 <= got <= want + 600, (gaps, failures)
        assert episodes(settings.db) == [("error", f"connect: {row['last_error']}", False)]
        assert annotations(settings.db) == [("Collector error: default", f"connect: {row['last_error']}", True)]
        assert web_status(settings.db)["last_error_stage"] == "connect"

        cpa = FakeCPA(KEY, port=port)
        for i in range(5):
            cpa.publish(event(i))  # queued while the collector is still backing off
        cpa.start()
        try:
            wait_for(lambda: event_count(settings.db) == 5, timeout=10)
            assert request_ids(settings.db) == [f"r{i:07d}" for i in range(5)]
            assert wait_for(lambda: status(settings.db).get("state") == "running")
            kinds = [(k, closed) for k, _, closed in episodes(settings.db)]
            assert kinds == [("error", True), ("reconnect", True)]
            titles = [t for t, _, _ in annotations(settings.db)]
            assert titles == ["Collector error: default", "Collector reconnect: default"]
            assert "state running  transport resp" in status_text(settings.db)
        finally:
            cpa.stop()
    finally:
        svc.stop()


def test_cpa_down_mid_stream_and_back_loses_nothing_it_still_held(settings):
    """CPA's port goes away (network or proxy down) while its queue keeps what arrives meanwhile."""
    with RedisServer(KEY) as backend:
        port = free_port()
        front = FakeCPA(KEY, redis_backend=("127.0.0.1", backend.port), port=port)
        front.start()
        svc = service(settings_for(settings, front.url, collector_mode="subscribe"))
        try:
            wait_for(lambda: backend.client().pubsub_numsub("usage")[0][1] == 1)
            for i in range(40):
                assert front.publish(event(i)) == "published"
            wait_for(lambda: event_count(settings.db) == 40)
            front.stop()  # every connection through it is cut
            wait_for(lambda: status(settings.db).get("state") == "error")
            wait_for(lambda: backend.client().pubsub_numsub("usage")[0][1] == 0)
            for i in range(40, 100):  # nobody subscribed: CPA queues them
                assert backend.enqueue(event(i)) is False
            again = FakeCPA(KEY, redis_backend=("127.0.0.1", backend.port), port=port)
            again.start()
            try:
                wait_for(lambda: event_count(settings.db) == 100, timeout=10)
                wait_for(lambda: backend.client().pubsub_numsub("usage")[0][1] == 1)
                for i in range(100, 130):
                    again.publish(event(i))
                wait_for(lambda: event_count(settings.db) == 130)
                svc.stop()  # before CPA goes away again
            finally:
                again.stop()
            assert request_ids(settings.db) == [f"r{i:07d}" for i in range(130)]
            row = status(settings.db)
            assert (row["inserted"], row["duplicates"], row["dead_letters"]) == (130, 0, 0)
            assert backend.client().llen("usage") == 0
            kinds = [(k, closed) for k, _, closed in episodes(settings.db)]
            assert kinds == [("dropped_subscription", True), ("reconnect", True)]
            assert [t for t, _, _ in annotations(settings.db)] == [
                "Collector dropped_subscription: default", "Collector reconnect: default"]
        finally:
            svc.stop()


# --- CPA returning garbage ---------------------------------------------------------------------
class _GarbageResp(threading.Thread):
    """A TCP server that answers every connection with bytes that are not RESP."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            try:
                conn.recv(65536)
                conn.sendall(b"\x00\xffGARBAGE<html>not resp</html>\r\n")
            except OSError:
                pass
            finally:
                conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close()


def test_non_resp_bytes_are_a_reported_error_with_backoff(settings):
    garbage = _GarbageResp()
    garbage.start()
    svc = service(settings_for(settings, f"http://127.0.0.1:{garbage.port}", collector_mode="resp"))
    try:
        row = wait_for(lambda: status(settings.db).get("state") == "error" and status(settings.db))
        wait_for(lambda: garbage.connections >= 3, timeout=5)
        assert row["last_error_stage"] in ("connect", "consume")
        assert row["last_error"]
        time.sleep(0.5)
        assert garbage.connections <= 6  # backing off (0.2, 0.4, 0.8, 1.0 ...), not spinning
        assert svc.loops()[0] and status(settings.db)["state"] == "error"
        assert [k for k, _, closed in episodes(settings.db)] == ["error"]
        assert annotations(settings.db)[0][0] == "Collector error: default"
    finally:
        svc.stop()
        garbage.stop()
    assert event_count(settings.db) == 0


class _GarbageHttp(http.server.ThreadingHTTPServer):
    """Answers the usage queue with the scripted bodies in turn (then `[]`); 404 for the rest."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = list(bodies)
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if not self.path.startswith("/v0/management/usage-queue"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with outer.lock:
                    body = outer.bodies.pop(0) if outer.bodies else b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if body.startswith(b"<") else "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()


def test_http_garbage_becomes_dead_letters_and_the_collector_carries_on(settings):
    html = b"<html><body>502 Bad Gateway</body></html>"
    bodies = [html, b'{"items": []}', b'[1, "not json", true, [2], ' + event(1) + b", " + event(2) + b", null]"]
    server = _GarbageHttp(bodies)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    svc = service(settings_for(settings, url, collector_mode="http"))
    try:
        wait_for(lambda: event_count(settings.db) == 2, timeout=10)
        # the status row is written after the batch that stored the events: wait for its totals
        row = wait_for(lambda: (s := status(settings.db)).get("state") == "running"
                       and s.get("inserted") == 2 and s)
    finally:
        svc.stop()
        server.shutdown()
        server.server_close()
    assert request_ids(settings.db) == ["r0000001", "r0000002"]
    q = "/v0/management/usage-queue?count=100"
    dead = query(settings.db, "SELECT reason, payload FROM dead_letters ORDER BY id")
    assert dead == [
        (f"GET {q}: HTTP 200 reply is not JSON", html),
        (f"GET {q}: reply is a JSON object, not an array", b'{"items": []}'),
        ("payload is a JSON number, not an object", b"1"),
        ("payload is not valid JSON: Expecting value: line 1 column 1 (char 0)", b"not json"),
        ("payload is a JSON boolean, not an object", b"true"),
        ("payload is a JSON array, not an object", b"[2]"),
    ]
    assert (row["inserted"], row["dead_letters"], row["duplicates"]) == (2, 6, 0)
    assert row["last_error_stage"] == "http"
    assert [(k, closed) for k, _, closed in episodes(settings.db)] == [("error", True), ("reconnect", True)]
    assert episodes(settings.db)[0][1] == f"http: GET {q}: HTTP 200 reply is not JSON"
    assert annotations(settings.db)[0][:2] == ("Collector error: default", f"http: GET {q}: HTTP 200 reply is not JSON")


# --- wrong key ---------------------------------------------------------------------------------
def test_wrong_key_then_fixed_is_an_episode_and_an_annotation(settings, tmp_path):
    cpa = FakeCPA(KEY)
    cpa.start()
    key_file = tmp_path / "key"
    key_file.write_text("wrong-key\n")
    svc = service(settings_for(settings, cpa.url, collector_mode="resp", cpa_management_key="",
                               cpa_management_key_file=str(key_file)))
    try:
        wait_for(lambda: status(settings.db).get("last_error_stage") == "auth")
        text = status_text(settings.db)
        assert "last error [auth]" in text and "wrong key or IP banned: invalid management key" in text
        assert "wrong-key" not in text
        assert web_status(settings.db)["state"] == "error"
        key_file.write_text(KEY + "\n")
        wait_for(lambda: status(settings.db).get("state") == "running", timeout=8)
        cpa.publish(event(3))
        wait_for(lambda: event_count(settings.db) == 1)
    finally:
        svc.stop()
        cpa.stop()
    detail = "auth: wrong key or IP banned: invalid management key"
    assert [(k, d, c) for k, d, c in episodes(settings.db)][0] == ("error", detail, True)
    assert [k for k, _, _ in episodes(settings.db)] == ["error", "reconnect"]
    assert annotations(settings.db)[0][:2] == ("Collector error: default", detail)
    assert cpa.bans.failures_total == 1


# --- a subscription CPA drops because its 256-message buffer filled --------------------------
def test_subscription_dropped_for_a_full_buffer_reconnects_drains_and_carries_on(settings):
    cpa = FakeCPA(KEY)  # CPA's real buffer: 256 messages per subscriber
    assert cpa.queue.buffer_size == 256
    cpa.start()
    cfg = settings_for(settings, cpa.url, collector_mode="subscribe", busy_timeout_ms=300)
    svc = service(cfg)
    blocker = None
    try:
        wait_for(lambda: cpa.queue.subscriber_count() == 1)
        cpa.publish(event(0))
        wait_for(lambda: event_count(settings.db) == 1)
        # A writer holds the database: the collector's next batch waits (busy timeout, then it holds the
        # batch and retries) and stops reading the socket, so CPA's buffer for it fills up.
        from datasource.db import connect
        blocker = connect(settings.db)
        blocker.execute("BEGIN IMMEDIATE")
        blocked_at = time.monotonic()
        produced = 1
        while cpa.queue.subscriber_count() and produced < 200_000:
            cpa.publish(event(produced))
            produced += 1
        assert cpa.queue.subscriber_count() == 0, "CPA never dropped the subscriber"
        print(f"\nsubscriber dropped after {produced} events ({time.monotonic() - blocked_at:.1f} s blocked)")
        dropped_at = produced
        for i in range(dropped_at, dropped_at + 50):  # no subscriber now: queued
            assert cpa.publish(event(i)) == "queued"
        blocker.execute("COMMIT")
        blocker.close()
        blocker = None
        wait_for(lambda: cpa.queue.subscriber_count() == 1, timeout=15)
        wait_for(lambda: cpa.queue_len() == 0, timeout=15)
        for i in range(dropped_at + 50, dropped_at + 80):
            assert cpa.publish(event(i)) == "published"
        wait_for(lambda: set(range(dropped_at, dropped_at + 80)) <= _stored_numbers(settings.db), timeout=15)
    finally:
        if blocker is not None:
            blocker.execute("ROLLBACK")
            blocker.close()
        svc.stop()
        cpa.stop()
    stored = _stored_numbers(settings.db)
    assert len(stored) == event_count(settings.db)  # nothing twice
    assert 0 in stored and stored <= set(range(dropped_at + 80))
    row = status(settings.db)
    assert (row["inserted"], row["duplicates"]) == (len(stored), 0)
    kinds = [(k, closed) for k, d, closed in episodes(settings.db) if not d.startswith("store: ")]
    assert kinds == [("dropped_subscription", True), ("reconnect", True)]
    assert [t for t, x, _ in annotations(settings.db) if not x.startswith("store: ")] == [
        "Collector dropped_subscription: default", "Collector reconnect: default"]


def test_a_stalled_store_does_not_stop_the_subscription_being_read(settings):
    """The store stalls (a writer holds the lock, as a TRUNCATE checkpoint waiting for readers does)
    while CPA pushes 4,000 events at ~1,600/s: the subscription is still read (CPA's 256-message
    buffer never fills), the events wait in memory and are stored once the lock is released, all of
    them, once. When the read was on the storing thread, CPA dropped the subscriber and what it had
    pushed was lost."""
    cpa = FakeCPA(KEY)  # CPA's real buffer: 256 messages per subscriber
    cpa.start()
    svc = service(settings_for(settings, cpa.url, collector_mode="subscribe", busy_timeout_ms=1000))
    from datasource.db import connect
    blocker = connect(settings.db)
    try:
        wait_for(lambda: cpa.queue.subscriber_count() == 1)
        cpa.publish(event(0))
        wait_for(lambda: event_count(settings.db) == 1)
        blocker.execute("BEGIN IMMEDIATE")
        for i in range(1, 4001):
            assert cpa.publish(event(i)) == "published", f"dropped after {i - 1} events"
            if i % 40 == 0:
                time.sleep(0.025)  # paced like a busy CPA, not a tight loop
        reader = svc.loops()[0].reader
        assert reader is not None and reader.high_water >= 1000  # held in memory meanwhile
        assert event_count(settings.db) == 1
        blocker.execute("COMMIT")
        wait_for(lambda: event_count(settings.db) == 4001, timeout=30)
        assert cpa.queue.subscriber_count() == 1
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        svc.stop()
        cpa.stop()
    assert request_ids(settings.db) == [f"r{i:07d}" for i in range(4001)]
    assert status(settings.db)["duplicates"] == 0
    # a store episode if the stall outlasted the busy timeout on a slow machine; never a dropped subscription
    assert [kind for kind, detail, _ in episodes(settings.db) if not detail.startswith("store: ")] == []


class _SlowLink(threading.Thread):
    """A TCP hop in front of a real redis-server that hands the server's bytes on in `chunk`-byte
    pieces `pause_s` apart (a slow or congested link): pushes reach the client split mid-message."""

    def __init__(self, backend_port: int, chunk: int = 300, pause_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.backend_port, self.chunk, self.pause_s = backend_port, chunk, pause_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.start()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            backend = socket.create_connection(("127.0.0.1", self.backend_port))
            threading.Thread(target=self._pump, args=(client, backend, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(backend, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(65536):
                pieces = [data[i:i + self.chunk] for i in range(0, len(data), self.chunk)] if slow else [data]
                for piece in pieces:
                    dst.sendall(piece)
                    if slow:
                        time.sleep(self.pause_s)
        except OSError:
            pass
        finally:
            for end in (src, dst):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_push_split_across_segments_is_read_whole_not_a_timeout():
    """redis-py's get_message(timeout=0) raised "Timeout reading from socket" on a push whose first
    bytes had come but not the rest; the subscription ended and the messages read so far were lost."""
    from datasource.sources import RespSubscriber
    with RedisServer(KEY) as server:
        link = _SlowLink(server.port)
        sub = RespSubscriber(link.url, KEY, "usage", timeout_s=3.0).open()
        try:
            producer = server.client()
            payloads = [event(i) for i in range(60)]  # ~1 KB each: 4 pieces per push on this link
            for payload in payloads:
                assert producer.publish("usage", payload) == 1
            got: list[bytes] = []
            while batch := sub.read(1.0, 25):
                assert len(batch) <= 25
                got += [m.payload for m in batch]
            assert got == payloads
        finally:
            sub.close()
            link.close()


def test_messages_read_before_the_subscription_breaks_are_returned_then_the_error():
    """CPA pushes to a subscriber and does not queue: what reached our socket before the connection
    ended exists nowhere else, so read() hands it over and raises on the next call."""
    from datasource.sources import RespSubscriber, SourceError
    with RedisServer(KEY) as server:
        sub = RespSubscriber(server.url, KEY, "usage", timeout_s=3.0).open()
        try:
            producer = server.client()
            for i in range(5):
                producer.publish("usage", event(i))
            time.sleep(0.3)  # in our socket's receive buffer
            server.stop()  # the connection ends after them
            got = sub.read(1.0, 100)
            assert [m.payload for m in got] == [event(i) for i in range(5)]
            with pytest.raises(SourceError) as failure:
                sub.read(1.0, 100)
            assert failure.value.stage == "connect" and "closed" in str(failure.value).lower()
        finally:
            sub.close()


def test_subscribe_mode_over_a_slow_link_stores_every_event_once_without_a_drop(settings):
    with RedisServer(KEY) as server:
        link = _SlowLink(server.port)
        svc = service(settings_for(settings, link.url, collector_mode="subscribe"))
        try:
            wait_for(lambda: server.client().pubsub_numsub("usage")[0][1] == 1)
            producer = server.client()
            for i in range(400):
                assert server.enqueue(event(i), producer) is True  # published, never queued
            wait_for(lambda: event_count(settings.db) == 400, timeout=30)
            time.sleep(0.5)  # nothing more arrives
        finally:
            svc.stop()
            link.close()
    assert request_ids(settings.db) == [f"r{i:07d}" for i in range(400)]
    row = status(settings.db)
    assert (row["inserted"], row["duplicates"], row["last_error"]) == (400, 0, None)
    assert episodes(settings.db) == []


def _stored_numbers(db: str) -> set[int]:
    return {int(r[1:]) for r in request_ids(db)}


# --- SIGKILL during heavy ingestion -------------------------------------------------------------
def _collect(db: str, url: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "datasource", "collect", "--db", db, "--cpa-url", url,
            "--cpa-management-key", KEY, "--collector-mode", "resp", "--pop-side", "left",
            "--poll-interval-ms", "100", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=ROOT))


def _is_spawned_worker(pid: int) -> bool:
    """A multiprocessing `spawn` child (a normalize worker), not the resource tracker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"spawn_main" in fh.read()
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _check_consistent(db: str) -> int:
    """integrity_check ok, no event twice, ledger = events, rollups = aggregates over events."""
    from datasource.db import connect
    from test_rollup import assert_matches_raw

    conn = connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        events, distinct = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM events").fetchone()
        assert events == distinct
        assert conn.execute("SELECT count(*) FROM event_ledger").fetchone()[0] == events
        ledger = {bytes(h).hex() for h, in conn.execute("SELECT hash FROM event_ledger")}
        assert ledger == {bytes(h)[:16].hex() for h, in conn.execute("SELECT event_hash FROM events")}  # 32-byte BLOB
        assert_matches_raw(conn)
        return events
    finally:
        conn.close()


@pytest.mark.parametrize("workers", ["0", "1", "auto"])
def test_sigkill_during_heavy_ingestion_then_restart(db_path, workers):
    """With a normalize worker (the pipelined collector) up to two popped batches are in flight,
    and the worker must not outlive its killed collector. `auto` (the default) runs one for this
    backlog (groups of 600 reach backlog_items(200, 600) = 401) on a machine with two usable CPUs."""
    from datasource.parallel import worker_plan

    total, batch, group, kills = 16_000, 200, 600, 3
    running = worker_plan(workers)[0]  # the collector subprocess sees the same CPUs
    in_flight = group * (2 if running else 1)  # a backlog: pops of 200 stored in transactions of 600
    extra = ("--batch-size", str(batch), "--commit-max", str(group), "--normalize-workers", str(workers))
    with RedisServer(KEY) as server:
        pipe = server.client().pipeline(transaction=False)
        for i in range(total):
            pipe.rpush("usage", event(i))
        pipe.execute()
        lost_per_kill = []
        for k in range(kills):
            before = event_count(db_path)
            proc = _collect(db_path, server.url, *extra)
            try:
                wait_for(lambda: event_count(db_path) >= before + 1500, timeout=30, interval=0.01)
                children = _children(proc.pid)  # the normalize worker and multiprocessing's tracker
                assert len(children) >= running
                assert sum(_is_spawned_worker(c) for c in children) == running  # not only the tracker
                proc.kill()  # SIGKILL: no handler runs, a popped batch may be in flight
                proc.wait(timeout=10)
                wait_for(lambda: not any(os.path.exists(f"/proc/{c}") for c in children), timeout=10)
            finally:
                if proc.poll() is None:
                    proc.kill()
            stored = _check_consistent(db_path)
            left = server.client().llen("usage")
            lost = total - sum(lost_per_kill) - stored - left  # popped, never committed
            assert 0 <= lost <= in_flight, (stored, left, lost)
            lost_per_kill.append(lost)
        proc = _collect(db_path, server.url, *extra)
        try:
            wait_for(lambda: server.client().llen("usage") == 0, timeout=60)
            expected = total - sum(lost_per_kill)
            wait_for(lambda: event_count(db_path) == expected, timeout=30)
            proc.terminate()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert _check_consistent(db_path) == total - sum(lost_per_kill)
    row = status(db_path)
    assert row["duplicates"] == 0
    print(f"\nSIGKILL x{kills} with pops of {batch} in transactions of {group}, {workers} normalize workers: "
          f"popped but uncommitted per kill = {lost_per_kill}")


# --- a full disk, a read-only database -------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs (needs root): the database's disk, which the test can fill up."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path) -> int:
    """Write zeros into `path` until the filesystem is full; returns the bytes written."""
    written, chunk = 0, b"\0" * 65536
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(chunk)
            except OSError:
                break
        for size in (4096, 512, 1):  # the last partial pages too
            while True:
                try:
                    written += fh.write(chunk[:size])
                except OSError:
                    break
    return written


def _summary_requests(client) -> int:
    body = {"range": WINDOW, "targets": [{"refId": "S", "target": "summary"}]}
    response = client.post("/query", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    [frame] = response.get_json()
    return {f["name"]: f["values"] for f in frame["fields"]}["requests"][0]


# with `auto` and groups capped at 300, the 500-event backlog's groups of full pops reach the cap
# (parallel.backlog_items(100, 300) = 201): the worker takes them and the next group is popped ahead
@pytest.mark.parametrize("workers, commit_max", [("0", 4000), ("auto", 300)])
def test_disk_full_holds_the_popped_batch_and_stores_it_once_when_space_returns(settings, small_fs, workers,
                                                                                commit_max, monkeypatch):
    from datasource import parallel

    monkeypatch.setattr(parallel, "usable_cpus", lambda cpu_max=parallel.CGROUP_CPU_MAX: 2.0)  # any CI machine
    db = str(small_fs / "monitor.db")
    with RedisServer(KEY) as server:
        cfg = settings_for(replace_db(settings, db), server.url, collector_mode="resp", pop_side="left",
                           batch_size=100, commit_max=commit_max, normalize_workers=workers)
        svc = service(cfg)
        filler = small_fs / "filler"
        try:
            for i in range(300):
                server.enqueue(event(i))
            wait_for(lambda: event_count(db) == 300)
            client = web(db)  # a datasource started before the disk filled (one started after: see below)
            # an empty WAL first: with room left in the WAL file, batches would still commit after the fill
            from datasource.db import connect
            checkpointer = connect(db)
            assert checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)
            checkpointer.close()
            assert _fill(filler) > 0
            for i in range(300, 800):
                server.enqueue(event(i))
            loop = svc.loops()[0]
            wait_for(lambda: loop.status.last_error_stage == "store" and loop.store_retries >= 3, timeout=15)
            assert loop.status.state == "error"
            held = int(re.search(r"holding (\d+) popped items, retrying", loop.status.last_error).group(1))
            # one group held: a pop, or consecutive full pops and the short one after them (the
            # enqueueing races the pops: 100 + 13 was seen), nothing popped after it
            assert 0 < held <= 500 and "database or disk is full" in loop.status.last_error
            if workers == "0":
                assert server.client().llen("usage") == 500 - held
            else:  # behind its queue, `auto` may have popped the next group ahead of the held one
                assert held <= 300 and 500 - held - 300 <= server.client().llen("usage") <= 500 - held
            assert event_count(db) == 300
            assert _summary_requests(client) == 300  # queries keep answering
            assert read_only_summary(db) == 300  # and a datasource starts on the full disk
            row = web_status(db, client)  # the database refuses the row: it comes from the sidecar file
            assert (row["state"], row["last_error_stage"]) == ("error", "store")
            assert row["last_error"] == loop.status.last_error
            text = status_text(db)
            assert "state error  transport resp" in text and f"holding {held} popped items, retrying" in text
            filler.unlink()
            wait_for(lambda: event_count(db) == 800, timeout=15)
            wait_for(lambda: status(db).get("state") == "running")
            assert (loop.ingestor.normalizer.starts > 0) == (workers == "auto")  # the worker did take groups
        finally:
            svc.stop()
            if filler.exists():
                filler.unlink()
    assert request_ids(db) == [f"r{i:07d}" for i in range(800)]
    row = status(db)
    assert (row["inserted"], row["duplicates"], row["last_error_stage"]) == (800, 0, "store")
    [(kind, detail, closed)] = [e for e in episodes(db) if e[1].startswith("store: ")]
    assert kind == "error" and closed and f"holding {held} popped items" in detail
    assert any(t == "Collector error: default" and x.startswith("store: ") for t, x, _ in annotations(db))
    assert _check_consistent(db) == 800


def replace_db(settings: Settings, db: str) -> Settings:
    from dataclasses import replace
    return replace(settings, db=db)


def test_read_only_database_holds_the_batch_until_writable_again(settings):
    """SQLite refuses every write of the collector's connection with SQLITE_READONLY, as for a file or
    mount it cannot write (simulated with PRAGMA query_only on that connection: a running process
    keeps its open file writable after a chmod, and a mount with open writers cannot be remounted ro)."""
    with RedisServer(KEY) as server:
        svc = service(settings_for(settings, server.url, collector_mode="resp", pop_side="left"))
        try:
            for i in range(50):
                server.enqueue(event(i))
            wait_for(lambda: event_count(settings.db) == 50)
            loop = svc.loops()[0]
            client = web(settings.db)
            loop.conn.pragma("query_only", True)
            for i in range(50, 250):
                server.enqueue(event(i))
            wait_for(lambda: loop.status.last_error_stage == "store" and loop.store_retries >= 2, timeout=10)
            held = int(re.search(r"holding (\d+) popped items", loop.status.last_error).group(1))
            assert loop.status.last_error.startswith("ReadOnlyError: attempt to write a readonly database")
            assert server.client().llen("usage") == 200 - held
            assert _summary_requests(client) == 50
            row = web_status(settings.db, client)
            assert (row["state"], row["last_error_stage"]) == ("error", "store")
            assert f"holding {held} popped items" in status_text(settings.db)
            loop.conn.pragma("query_only", False)
            wait_for(lambda: event_count(settings.db) == 250, timeout=10)
            wait_for(lambda: status(settings.db).get("state") == "running")
        finally:
            svc.stop()
    assert request_ids(settings.db) == [f"r{i:07d}" for i in range(250)]
    row = status(settings.db)
    assert (row["inserted"], row["duplicates"], row["last_error_stage"]) == (250, 0, "store")
    [(kind, detail, closed)] = [e for e in episodes(settings.db) if e[1].startswith("store: ")]
    assert (kind, closed) == ("error", True) and "ReadOnlyError" in detail
    assert _check_consistent(settings.db) == 250


def test_read_only_mount_at_start_pops_nothing_until_writable(settings, small_fs):
    """A real read-only filesystem: the collector cannot open its store, so it pops nothing
    (CPA keeps the events) and retries with backoff; rw again -> drained, nothing lost."""
    from dataclasses import replace

    from datasource.db import open_database
    db = str(small_fs / "monitor.db")
    cfg = settings_for(replace(settings, db=db), "", collector_mode="resp", pop_side="left")
    conn = open_database(db)
    from datasource import store
    from datasource.normalize import normalize
    store.insert_batch(conn, [normalize(event(i), instance="default") for i in range(10)], origin="test")
    conn.close()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)]).returncode == 0
    with RedisServer(KEY) as server:
        for i in range(10, 60):
            server.enqueue(event(i))
        svc = service(replace(cfg, cpa_url=server.url))
        try:
            time.sleep(1.5)  # several open attempts with backoff
            assert not svc.loops() or svc.loops()[0].conn is None
            assert server.client().llen("usage") == 50  # nothing popped
            assert event_count(db) == 10  # readers open it immutable (no -wal on a read-only filesystem)
            assert read_only_summary(db) == 10
            assert subprocess.run(["mount", "-o", "remount,rw", str(small_fs)]).returncode == 0
            wait_for(lambda: event_count(db) == 60, timeout=15)
        finally:
            svc.stop()
    assert request_ids(db) == [f"r{i:07d}" for i in range(60)]
    assert status(db)["duplicates"] == 0


def _remount(mnt, mode: str) -> None:
    done = subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def _store_events(db: str, numbers: range) -> None:
    from datasource import store
    from datasource.db import open_database
    from datasource.normalize import normalize
    conn = open_database(db)
    try:
        store.insert_batch(conn, [normalize(event(i), instance="default") for i in numbers], origin="test")
    finally:
        conn.close()


def test_datasource_starts_and_answers_on_a_read_only_mount(settings, small_fs):
    """The datasource (create_app, with the collector on) starts on a read-only filesystem holding a
    database the store made: start-up reads the schema version and writes nothing, readers open the
    file as immutable (no -wal after a clean close; WAL could not create its -shm), queries answer.
    Writable again, the same datasource's readers reopen normally and see what the collector adds."""
    from dataclasses import replace
    db = str(small_fs / "monitor.db")
    _store_events(db, range(10))
    assert sorted(os.listdir(small_fs)) == ["monitor.db"]  # the last close checkpointed and removed -wal/-shm
    _remount(small_fs, "ro")
    with RedisServer(KEY) as server:
        for i in range(10, 30):
            server.enqueue(event(i))
        cfg = settings_for(replace(settings, db=db), server.url, collector_mode="resp", pop_side="left")
        read_only, app = True, None
        try:
            app = create_app(cfg)
            client = app.test_client()
            assert _summary_requests(client) == 10
            assert client.get("/status").status_code == 200
            time.sleep(1.0)  # the collector keeps trying to open its store
            assert server.client().llen("usage") == 20  # and pops nothing
            assert sorted(os.listdir(small_fs)) == ["monitor.db"]
            _remount(small_fs, "rw")
            read_only = False
            wait_for(lambda: event_count(db) == 30, timeout=20)
            assert _summary_requests(client) == 30  # the immutable reader was replaced
        finally:
            if read_only:
                _remount(small_fs, "rw")
            if app is not None and app.extensions["cpa_monitor"].collector is not None:
                app.extensions["cpa_monitor"].collector.stop()
    assert request_ids(db) == [f"r{i:07d}" for i in range(30)]


def test_read_only_mount_with_a_wal_reads_it_and_refuses_a_writer(settings, small_fs, tmp_path):
    """The files as a running collector leaves them (-wal holding committed transactions, -shm) on a
    filesystem mounted read-only: readers see the WAL's rows too; a write connection is refused with
    a clear error instead of SQLite's silent read-only open. (A -wal without its -shm cannot be read
    there at all: docs/storage.md.)"""
    import shutil

    import apsw
    from dataclasses import replace

    from datasource.db import connect, open_database
    src = str(tmp_path / "live.db")
    _store_events(src, range(8))
    holder = connect(src)  # keeps -wal/-shm in place
    holder.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _store_events(src, range(8, 13))  # these 5 are in the WAL only
    assert os.path.getsize(src + "-wal") > 0
    for suffix in ("", "-wal", "-shm"):
        shutil.copy(src + suffix, str(small_fs / "monitor.db") + suffix)
    holder.close()
    db = str(small_fs / "monitor.db")
    _remount(small_fs, "ro")
    try:
        client = create_app(replace(settings, db=db, collector="off")).test_client()
        assert _summary_requests(client) == 13
        with pytest.raises(apsw.ReadOnlyError, match="can only be opened read-only"):
            open_database(db)
    finally:
        _remount(small_fs, "rw")


def test_writer_locked_out_past_the_busy_timeout_holds_and_retries(settings):
    from datasource.db import connect
    with RedisServer(KEY) as server:
        svc = service(settings_for(settings, server.url, collector_mode="resp", pop_side="left",
                                   busy_timeout_ms=300))
        blocker = None
        try:
            server.enqueue(event(0))
            wait_for(lambda: event_count(settings.db) == 1)
            # Only now: the service has created and migrated the file; opening it while the service
            # was still creating it made this connect's `journal_mode = wal` fail busy (CI, once).
            blocker = connect(settings.db)
            loop = svc.loops()[0]
            blocker.execute("BEGIN IMMEDIATE")  # another writer, for longer than the busy timeout
            for i in range(1, 120):
                server.enqueue(event(i))
            wait_for(lambda: loop.status.last_error_stage == "store", timeout=10)
            assert loop.status.last_error.startswith("BusyError: database is locked")
            time.sleep(1.0)
            blocker.execute("COMMIT")
            wait_for(lambda: event_count(settings.db) == 120, timeout=10)
            wait_for(lambda: status(settings.db).get("state") == "running")
        finally:
            if blocker is not None:
                if blocker.in_transaction:
                    blocker.execute("ROLLBACK")
                blocker.close()
            svc.stop()
    assert request_ids(settings.db) == [f"r{i:07d}" for i in range(120)]
    assert status(settings.db)["duplicates"] == 0


def test_long_reader_does_not_block_ingestion_and_checkpoints_resume(settings):
    """WAL: a read transaction held longer than many batches does not stop the writer (nothing
    waits, nothing is lost); it only pins the WAL, which a checkpoint resets once it ends."""
    from datasource.db import connect
    with RedisServer(KEY) as server:
        svc = service(settings_for(settings, server.url, collector_mode="resp", pop_side="left", batch_size=50))
        server.enqueue(event(0))
        wait_for(lambda: event_count(settings.db) == 1)
        reader = connect(settings.db, readonly=True)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1  # snapshot taken
            pipe = server.client().pipeline(transaction=False)
            for i in range(1, 3001):
                pipe.rpush("usage", event(i))
            pipe.execute()
            wait_for(lambda: event_count(settings.db) == 3001, timeout=30)
            assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1  # still its snapshot
            wal = os.path.getsize(settings.db + "-wal")
            checker = connect(settings.db)
            busy, log, done = checker.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert log > 0 and done < log  # the reader pins the frames after its snapshot
            reader.execute("COMMIT")
            busy, log, done = checker.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            assert (busy, log, done) == (0, 0, 0)
            assert os.path.getsize(settings.db + "-wal") == 0 < wal
            checker.close()
        finally:
            if reader.in_transaction:
                reader.execute("COMMIT")
            reader.close()
            svc.stop()
    assert request_ids(settings.db) == [f"r{i:07d}" for i in range(3001)]
    assert status(settings.db)["last_error"] is None
