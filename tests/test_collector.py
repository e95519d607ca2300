"""The collector end to end, in-process, against a real redis-server and against FakeCPA."""

from __future__ import annotations

import json
import multiprocessing
import time

import apsw
import pytest

from collector_helpers import (FAST, KEY, event, event_count, query, request_ids, scalar, service, settings_for,
                               status, wait_for)
from datasource.collector import CollectorService, validate
from datasource.fakecpa import FakeCPA
from datasource.upstream import ConfigRefused
from redis_server import RedisServer


@pytest.fixture
def server():
    with RedisServer(KEY) as srv:
        yield srv


@pytest.fixture
def cpa():
    fake = FakeCPA(KEY, retention_s=60, auth_files=[
        {"auth_index": "9f2c4e1a7b3d5c60", "name": "alice.json", "label": "alice@example.com",
         "email": "alice@example.com", "provider": "codex", "status": "active", "project_id": "proj-a"}])
    fake.start()
    yield fake
    fake.stop()


@pytest.mark.parametrize("workers", [0, 1])  # 1: half of each batch normalized in a worker process
def test_resp_mode_pops_in_batches_and_reports_status(server, settings, workers):
    for i in range(250):
        server.enqueue(event(i))
    svc = service(settings_for(settings, server.url, collector_mode="resp", pop_side="left",
                               normalize_workers=workers))
    try:
        wait_for(lambda: event_count(settings.db) == 250)
        row = wait_for(lambda: status(settings.db).get("inserted") == 250 and status(settings.db))
        assert svc.holds_lock()
        assert (row["state"], row["transport"], row["mode"]) == ("running", "resp", "resp")
        assert (row["duplicates"], row["dead_letters"]) == (0, 0)
        assert request_ids(settings.db) == [f"r{i:07d}" for i in range(250)]
        assert server.client().llen("usage") == 0
    finally:
        svc.stop()
    assert status(settings.db)["state"] == "stopped"
    assert multiprocessing.active_children() == []  # the normalize worker stopped with the loop


@pytest.mark.parametrize("workers", ["0", "1"])
def test_the_collector_prices_events_with_the_configured_price_file(server, settings, tmp_path, workers):
    """gpt-5.4 at 10 / 20 USD per million tokens (cache reads at 10 % of input by default): an event
    of 100 input and 20 output tokens costs (100 x 10 + 20 x 20) / 1e6 = 0.0014 USD, against
    0.00055 with the built-in table (2.5 / 15). The worker process reads the same file."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"gpt-5.4": {"input": 10, "output": 20}}}))
    for i in range(100):  # a group of 100: the worker takes it whole (MIN_PARALLEL is 64)
        server.enqueue(event(i))
    svc = service(settings_for(settings, server.url, collector_mode="resp", pop_side="left",
                               normalize_workers=workers, prices_file=str(prices)))
    try:
        wait_for(lambda: event_count(settings.db) == 100)
        assert svc.loops()[0].ingestor.normalizer.starts == int(workers)
    finally:
        svc.stop()
    conn = apsw.Connection(settings.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        costs = [r[0] for r in conn.execute("SELECT est_cost_usd FROM events")]
    finally:
        conn.close()
    assert costs == [pytest.approx(0.0014)] * 100


def test_a_price_file_that_cannot_be_read_is_refused(settings, tmp_path):
    bad = tmp_path / "prices.json"
    bad.write_text(json.dumps({"models": {"gpt-5.4": {"input": -1, "output": 20}}}))
    with pytest.raises(ValueError, match="gpt-5.4"):
        validate(settings_for(settings, "http://127.0.0.1:1", prices_file=str(bad)))
    with pytest.raises(ValueError, match="cannot read price file"):
        validate(settings_for(settings, "http://127.0.0.1:1", prices_file=str(tmp_path / "missing.json")))


def test_subscribe_drains_what_was_queued_before_subscribing(server, settings):
    for i in range(120):  # nobody subscribed: queued
        assert server.enqueue(event(i)) is False
    svc = service(settings_for(settings, server.url, collector_mode="subscribe"))
    try:
        wait_for(lambda: event_count(settings.db) == 120)
        wait_for(lambda: server.client().pubsub_numsub("usage")[0][1] == 1)
        for i in range(120, 150):  # subscribed now: pushed live
            assert server.enqueue(event(i)) is True
        wait_for(lambda: event_count(settings.db) == 150)
        assert request_ids(settings.db) == [f"r{i:07d}" for i in range(150)]
        assert status(settings.db)["transport"] == "subscribe"
    finally:
        svc.stop()


def test_keepalive_pings_while_subscribed(server, settings):
    timing = FAST.__class__(**{**FAST.__dict__, "keepalive_s": 0.3})
    svc = service(settings_for(settings, server.url, collector_mode="subscribe"), timing)
    try:
        loop = wait_for(lambda: svc.loops() and svc.loops()[0])
        wait_for(lambda: loop.pings >= 3, timeout=5)
        assert status(settings.db)["state"] == "running"
        assert scalar(settings.db, "SELECT count(*) FROM collector_episodes") == 0
    finally:
        svc.stop()


def test_redis_restart_mid_stream_loses_nothing_and_duplicates_nothing(server, settings):
    svc = service(settings_for(settings, server.url, collector_mode="subscribe"))
    try:
        wait_for(lambda: status(settings.db).get("state") == "running")
        for i in range(50):
            server.enqueue(event(i))
        wait_for(lambda: event_count(settings.db) == 50)
        server.restart()  # CPA restart: connections drop, the queue starts empty
        for i in range(50, 100):  # produced before the collector is back: queued, then drained
            server.enqueue(event(i))
        wait_for(lambda: status(settings.db).get("state") == "running" and event_count(settings.db) == 100)
        for i in range(100, 120):
            server.enqueue(event(i))
        wait_for(lambda: event_count(settings.db) == 120)
        assert request_ids(settings.db) == [f"r{i:07d}" for i in range(120)]
        row = status(settings.db)
        assert (row["inserted"], row["duplicates"]) == (120, 0)
        assert row["last_error_stage"] == "connect"
        kinds = [r[0] for r in query(settings.db, "SELECT kind FROM collector_episodes ORDER BY id")]
        assert kinds == ["dropped_subscription", "reconnect"]
        assert scalar(settings.db, "SELECT count(*) FROM collector_episodes WHERE end_ms IS NULL") == 0
    finally:
        svc.stop()


def test_wrong_key_backs_off_costs_one_login_and_recovers_when_fixed(cpa, settings, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("wrong-key\n")
    cfg = settings_for(settings, cpa.url, cpa_management_key="", cpa_management_key_file=str(key_file))
    svc = service(cfg)  # auto mode: an auth error must not fall back to HTTP (a second failed login)
    try:
        row = wait_for(lambda: status(settings.db).get("state") == "error" and status(settings.db))
        assert row["last_error_stage"] == "auth"
        assert row["last_error"] == "wrong key or IP banned: invalid management key"
        time.sleep(1.0)  # inside the 2 s auth backoff: no further attempt
        assert cpa.bans.failures_total == 1
        key_file.write_text(KEY + "\n")
        wait_for(lambda: status(settings.db).get("state") == "running", timeout=8)
        cpa.publish(event(1))
        wait_for(lambda: event_count(settings.db) == 1)
        assert cpa.bans.failures_total == 1
        assert status(settings.db)["transport"] == "subscribe"
    finally:
        svc.stop()


def test_http_mode_stores_events_and_dead_letters_invalid_items(cpa, settings):
    for i in range(30):
        cpa.publish(event(i))
    cpa.publish("not json")
    svc = service(settings_for(settings, cpa.url, collector_mode="http", batch_size=7))
    try:
        row = wait_for(lambda: status(settings.db).get("dead_letters") == 1 and status(settings.db))
        wait_for(lambda: event_count(settings.db) == 30)
        row = status(settings.db)
        assert (row["transport"], row["inserted"], row["usage_publishing"], row["queue_retention_s"]) == \
            ("http", 30, True, 60)
        assert query(settings.db, "SELECT origin, payload FROM dead_letters") == [("collector", b"not json")]
        accounts = query(settings.db, "SELECT auth_index, name, label, provider, project_id FROM accounts")
        assert accounts == [("9f2c4e1a7b3d5c60", "alice.json", "alice@example.com", "codex", "proj-a")]
        # events name the account from its auth file, not by the masked source (ali***@example.com)
        assert query(settings.db, "SELECT DISTINCT account, auth_file, project_id FROM events") == \
            [("alice@example.com", "alice.json", "proj-a")]
    finally:
        svc.stop()


def test_refresh_message_clears_the_auth_files_cache(cpa, settings):
    svc = service(settings_for(settings, cpa.url, collector_mode="subscribe"))
    try:
        wait_for(lambda: status(settings.db).get("state") == "running")
        cpa.publish(event(1))
        wait_for(lambda: event_count(settings.db) == 1)
        cpa.set_auth_files([{"auth_index": "9f2c4e1a7b3d5c60", "name": "alice.json", "label": "Alice",
                             "provider": "codex", "status": "error", "status_message": "token revoked"}])
        cpa.publish(event(2))  # the 3600 s cache still holds the old list
        wait_for(lambda: event_count(settings.db) == 2)
        assert scalar(settings.db, "SELECT status FROM accounts") == "active"
        assert cpa.refresh() == 1
        cpa.publish(event(3))
        wait_for(lambda: event_count(settings.db) == 3)
        assert query(settings.db, "SELECT label, status, status_message FROM accounts") == \
            [("Alice", "error", "token revoked")]
        assert query(settings.db, "SELECT auth_index, old_status, new_status FROM account_status_changes") == \
            [("9f2c4e1a7b3d5c60", "active", "error")]
    finally:
        svc.stop()


def test_errors_channel_events_become_credential_errors(cpa, settings):
    svc = service(settings_for(settings, cpa.url, collector_mode="subscribe"))
    try:
        wait_for(lambda: status(settings.db).get("state") == "running")
        body = '{"error":{"type":"usage_limit_reached","message":"The usage limit has been reached"}}'
        payload = {"timestamp": "2026-05-06T02:20:00.5Z", "provider": "codex", "model": "gpt-5.4",
                   "auth_id": "alice.json", "auth_index": "4d1e8a2b9c7f3e05", "status_code": 429, "body": body,
                   "code": "usage_limit_reached", "retryable": True,
                   "auth_status": {"status": "error", "unavailable": True,
                                   "next_retry_after": "2026-05-06T04:20:00Z",
                                   "quota": {"exceeded": True, "reason": "quota",
                                             "next_recover_at": "2026-05-06T04:20:00Z"}}}
        wait_for(lambda: cpa.publish_error(json.dumps(payload)) == 1, timeout=5, interval=0.3)
        wait_for(lambda: scalar(settings.db, "SELECT count(*) FROM credential_errors") == 1)
        row = query(settings.db, "SELECT ts_ms, auth_index, account_key, status_code, code, retryable, "
                                 "quota_exceeded, next_retry_after_ms, summary FROM credential_errors")[0]
        assert row == (1778034000500, "4d1e8a2b9c7f3e05", "4d1e8a2b9c7f3e05", 429, "usage_limit_reached", 1, 1,
                       1778041200000, body)
        assert scalar(settings.db, "SELECT body FROM credential_error_private") == body
    finally:
        svc.stop()


class _OldCPA(FakeCPA):
    """A CPA without SUBSCRIBE and without the HTTP usage queue: auto mode must end on RESP pops."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self._serve_http = _not_found

    def _serve_resp(self, conn, ip):  # type: ignore[no-untyped-def]
        from datasource.fakecpa_resp import RespSession, error

        class NoSubscribe(RespSession):
            def dispatch(self, args):  # type: ignore[no-untyped-def]
                if args[0].lower() == b"subscribe" and self.authed:
                    return error("ERR unknown command 'subscribe'")
                return super().dispatch(args)

        NoSubscribe(conn, ip, self.queue, self.check_key, self.banned_message, self.bans.fail).run()


def _not_found(sock, address):  # type: ignore[no-untyped-def]
    sock.recv(65536)
    sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 18\r\nConnection: close\r\n\r\n404 page not found")


def test_auto_mode_fallback_order(settings):
    old = _OldCPA(KEY)
    old.start()
    try:
        for i in range(10):
            old.publish(event(i))
        svc = service(settings_for(settings, old.url, collector_mode="auto"))
        try:
            wait_for(lambda: event_count(settings.db) == 10)
            row = status(settings.db)
            assert (row["mode"], row["transport"], row["state"]) == ("auto", "resp", "running")
            assert old.bans.failures_total == 0
        finally:
            svc.stop()
    finally:
        old.stop()


def test_poll_interval_not_shorter_than_retention_is_refused(settings):
    short = FakeCPA(KEY, retention_s=1)
    short.start()
    try:
        svc = service(settings_for(settings, short.url, collector_mode="resp", poll_interval_ms=1500))
        try:
            row = wait_for(lambda: status(settings.db).get("state") == "error" and status(settings.db))
            assert row["last_error"] == ("poll interval 1500 ms is not shorter than CPA's queue retention 1 s: "
                                         "events would expire before they are read")
            assert row["queue_retention_s"] == 1
        finally:
            svc.stop()
    finally:
        short.stop()
    with pytest.raises(ConfigRefused):
        validate(settings_for(settings, "http://127.0.0.1:1", poll_interval_ms=3_600_000))
    with pytest.raises(ValueError, match="collector mode"):
        validate(settings_for(settings, "http://127.0.0.1:1", collector_mode="pull"))
    with pytest.raises(ValueError, match="normalize workers must be auto or a whole number >= 0, not 'two'"):
        validate(settings_for(settings, "http://127.0.0.1:1", normalize_workers="two"))
    for field in ("batch_size", "commit_max", "poll_interval_ms"):
        with pytest.raises(ValueError, match="must be positive"):
            validate(settings_for(settings, "http://127.0.0.1:1", **{field: 0}))


def test_publishing_off_is_a_warning(settings):
    off = FakeCPA(KEY, usage_statistics_enabled=False)
    off.start()
    try:
        svc = service(settings_for(settings, off.url, collector_mode="resp"))
        try:
            row = wait_for(lambda: status(settings.db).get("state") == "running" and status(settings.db))
            assert row["usage_publishing"] is False
            assert row["warnings"] == ["CPA usage publishing is off (usage-statistics-enabled: false): "
                                       "no events arrive"]
        finally:
            svc.stop()
    finally:
        off.stop()


def test_second_service_on_same_database_stands_by_and_takes_over(server, settings):
    cfg = settings_for(settings, server.url, collector_mode="resp")
    first, second = service(cfg), CollectorService(cfg, timing=FAST)
    try:
        wait_for(first.holds_lock)
        second.start()
        second.start()  # idempotent
        time.sleep(0.8)
        assert not second.holds_lock()
        server.enqueue(event(1))
        wait_for(lambda: event_count(settings.db) == 1)
        first.stop()
        wait_for(second.holds_lock, timeout=5)
        server.enqueue(event(2))
        wait_for(lambda: event_count(settings.db) == 2)
        assert request_ids(settings.db) == ["r0000001", "r0000002"]
    finally:
        first.stop()
        second.stop()


def test_standby_row_says_who_holds_the_lock(server, settings, tmp_path):
    from datasource.lock import CollectorLock
    holder = CollectorLock(settings.db)
    assert holder.try_acquire()
    svc = service(settings_for(settings, server.url, collector_mode="resp"))
    try:
        row = wait_for(lambda: status(settings.db).get("state") == "standby" and status(settings.db))
        assert len(row["warnings"]) == 1
        assert row["warnings"][0].startswith(f"another collector holds {settings.db}.collector.lock: pid ")
        assert not svc.holds_lock()
    finally:
        svc.stop()
        holder.release()


def test_stop_is_prompt(server, settings):
    svc = service(settings_for(settings, server.url, collector_mode="subscribe"))
    wait_for(lambda: status(settings.db).get("state") == "running")
    started = time.monotonic()
    svc.stop()
    svc.stop()
    assert time.monotonic() - started < 2.0
    assert not svc.holds_lock()


def test_outage_longer_than_retention_is_recorded_as_a_gap(settings):
    from redis_server import free_port
    port = free_port()
    first = FakeCPA(KEY, retention_s=1, port=port)
    first.start()
    svc = service(settings_for(settings, first.url, collector_mode="resp"))
    try:
        wait_for(lambda: status(settings.db).get("state") == "running")
        first.stop()
        wait_for(lambda: status(settings.db).get("state") == "error")
        time.sleep(1.2)
        second = FakeCPA(KEY, retention_s=1, port=port)
        second.start()
        try:
            wait_for(lambda: status(settings.db).get("state") == "running", timeout=8)
            second.publish(event(7))
            wait_for(lambda: event_count(settings.db) == 1)
        finally:
            second.stop()
        episodes = query(settings.db, "SELECT kind, start_ms <= end_ms, end_ms - start_ms >= 1000 "
                                      "FROM collector_episodes ORDER BY id")
        assert episodes == [("error", 1, 1), ("reconnect", 1, 0), ("gap", 1, 1)]
    finally:
        svc.stop()
