"""FakeCPA follows CPA's protocol on the wire: raw sockets, redis-py (RESP2) and HTTP."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import redis

from datasource.fakecpa import FakeCPA
from datasource.fakecpa_queue import UsageQueue, go_duration
from tests.redis_server import RedisServer

KEY = "mgmt-secret"
SUBSCRIBED = b"*3\r\n$9\r\nsubscribe\r\n$5\r\nusage\r\n:1\r\n"
SUPPORT_REFRESH_PUSH = b"*3\r\n$7\r\nmessage\r\n$5\r\nusage\r\n$24\r\n{\"support_refresh\":true}\r\n"


@pytest.fixture
def cpa():
    fake = FakeCPA(KEY, ban_seconds=1.0)
    fake.start()
    yield fake
    fake.stop()


def _reply_end(data: bytes, pos: int = 0) -> int | None:
    """Index just past the RESP value starting at `pos`, or None if incomplete."""
    eol = data.find(b"\r\n", pos)
    if eol < 0:
        return None
    kind, value = data[pos:pos + 1], data[pos + 1:eol]
    if kind in (b"+", b"-", b":"):
        return eol + 2
    if kind == b"$":
        size = int(value)
        end = eol + 2 + size + 2
        return eol + 2 if size < 0 else (end if len(data) >= end else None)
    if kind == b"*":
        pos = eol + 2
        for _ in range(max(int(value), 0)):
            nxt = _reply_end(data, pos)
            if nxt is None:
                return None
            pos = nxt
        return pos
    raise AssertionError(f"not RESP: {data!r}")


def cmd(*args: str | bytes) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Wire:
    """A raw client socket: send commands, read exact reply bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def call(self, *args: str | bytes, expect: int | None = None) -> bytes:
        self.sock.sendall(cmd(*args))
        return self.read(expect)

    def read(self, expect: int | None = None) -> bytes:
        """Read `expect` bytes, or exactly one complete RESP reply."""
        data = b""
        while (len(data) < expect) if expect is not None else _reply_end(data) is None:
            chunk = self.sock.recv(65536 if expect is None else expect - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def closed(self) -> bool:
        self.sock.settimeout(2)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire(cpa):
    client = Wire(cpa.port)
    yield client
    client.close()


def authed(cpa: FakeCPA) -> Wire:
    client = Wire(cpa.port)
    assert client.call("AUTH", KEY) == b"+OK\r\n"
    return client


# --- authentication and the ban -------------------------------------------------


def test_every_command_before_auth_is_noauth_and_counts_as_a_failure(cpa, wire):
    for args in (("HELLO", "3", "AUTH", "default", KEY), ("PING",), ("LPOP", "usage")):
        assert wire.call(*args) == b"-NOAUTH Authentication required.\r\n"
    assert cpa.bans.failures_total == 3


def test_auth_forms_and_errors(cpa, wire):
    assert wire.call("AUTH", "wrong") == b"-ERR invalid management key\r\n"
    assert wire.call("AUTH", "") == b"-ERR missing management key\r\n"
    assert wire.call("AUTH") == b"-ERR wrong number of arguments for 'auth' command\r\n"
    assert wire.call("AUTH", "default", KEY) == b"+OK\r\n"
    assert wire.call("AUTH", KEY) == b"+OK\r\n"
    assert cpa.bans.failures_total == 2


def test_five_failures_ban_the_ip_for_resp_and_http_until_it_expires(cpa, wire):
    for _ in range(5):
        assert wire.call("AUTH", "nope") == b"-ERR invalid management key\r\n"
    banned = wire.call("AUTH", KEY)
    assert banned.startswith(b"-ERR IP banned due to too many failed attempts. Try again in ")
    assert wire.call("LPOP", "usage").startswith(b"-ERR IP banned due to too many failed attempts")
    status, _, body = http(cpa, "/v0/management/config", {"Authorization": f"Bearer {KEY}"})
    assert status == 403 and json.loads(body)["error"].startswith("IP banned due to too many failed attempts")
    time.sleep(1.1)
    assert wire.call("AUTH", KEY) == b"+OK\r\n"


def test_a_successful_auth_resets_the_failure_count(cpa, wire):
    for _ in range(4):
        wire.call("AUTH", "nope")
    assert wire.call("AUTH", KEY) == b"+OK\r\n"
    for _ in range(4):
        wire.call("AUTH", "nope")
    assert wire.call("AUTH", KEY) == b"+OK\r\n"


def test_go_duration_rendering():
    assert [go_duration(s) for s in (1800, 1799.6, 3600, 5, 0.2)] == ["30m0s", "30m0s", "1h0m0s", "5s", "0s"]


# --- pops ---------------------------------------------------------------------------


def test_pops_are_oldest_first_for_both_sides(cpa):
    client = authed(cpa)
    for n in range(5):
        cpa.publish(f'{{"n":{n}}}')
    assert client.call("RPOP", "usage") == b'$7\r\n{"n":0}\r\n'
    assert client.call("LPOP", "usage", "2") == b'*2\r\n$7\r\n{"n":1}\r\n$7\r\n{"n":2}\r\n'
    assert client.call("RPOP", " USAGE ", "10") == b'*2\r\n$7\r\n{"n":3}\r\n$7\r\n{"n":4}\r\n'
    assert client.call("LPOP", "usage") == b"$-1\r\n"
    assert client.call("RPOP", "usage", "3") == b"*0\r\n"
    client.close()


@pytest.mark.parametrize("count", ["0", "-1", "abc", "1.5", " 2"])
def test_bad_pop_count(cpa, count):
    client = authed(cpa)
    assert client.call("LPOP", "usage", count) == b"-ERR value is not an integer or out of range\r\n"
    client.close()


def test_unsupported_key_unknown_commands_and_ping_outside_subscribe(cpa):
    client = authed(cpa)
    assert client.call("RPOP", "queue") == b"-ERR unsupported channel 'queue'\r\n"
    assert client.call("SUBSCRIBE", "other") == b"-ERR unsupported channel 'other'\r\n"
    assert client.call("PING") == b"-ERR unknown command 'ping'\r\n"
    assert client.call("CLIENT", "SETINFO", "LIB-NAME", "x") == b"-ERR unknown command 'client'\r\n"
    assert client.call("LPOP") == b"-ERR wrong number of arguments for 'lpop' command\r\n"
    assert client.call("QUIT") == b"+OK\r\n"
    assert client.closed()


def test_retention_is_pruned_lazily():
    now = [100.0]
    q = UsageQueue(10, clock=lambda: now[0])
    q.enqueue(b"a")
    now[0] = 105.0
    q.enqueue(b"b")
    now[0] = 110.5
    assert q.pop_oldest(5) == [b"b"]
    assert UsageQueue(0).retention_s == 60 and UsageQueue(99999).retention_s == 3600


def test_items_expire_after_the_retention(cpa):
    fake = FakeCPA(KEY, retention_s=1)
    fake.start()
    try:
        fake.publish(b"{}")
        assert fake.queue_len() == 1
        time.sleep(1.1)
        assert fake.queue_len() == 0
    finally:
        fake.stop()


# --- subscribe ------------------------------------------------------------------------


def test_subscribe_wire_format_ping_and_unsubscribe(cpa):
    client = authed(cpa)
    assert client.call("SUBSCRIBE", "usage", expect=len(SUBSCRIBED + SUPPORT_REFRESH_PUSH)) == (
        SUBSCRIBED + SUPPORT_REFRESH_PUSH)
    assert client.call("PING") == b"*2\r\n$4\r\npong\r\n$-1\r\n"
    assert client.call("PING", "hi") == b"*2\r\n$4\r\npong\r\n$2\r\nhi\r\n"
    assert client.call("UNSUBSCRIBE") == b"*3\r\n$11\r\nunsubscribe\r\n$5\r\nusage\r\n:0\r\n"
    assert client.closed()
    assert cpa.queue.subscriber_count() == 0


def test_quit_in_subscribe_mode(cpa):
    client = authed(cpa)
    client.call("SUBSCRIBE", "usage", expect=len(SUBSCRIBED + SUPPORT_REFRESH_PUSH))
    assert client.call("QUIT") == b"+OK\r\n"
    assert client.closed()


def test_enqueue_publishes_only_while_a_usage_subscriber_exists(cpa):
    client = authed(cpa)
    assert cpa.publish(b'{"q":1}') == "queued"
    client.call("SUBSCRIBE", "usage", expect=len(SUBSCRIBED + SUPPORT_REFRESH_PUSH))
    assert cpa.publish(b'{"p":2}') == "published"
    assert client.read() == b'*3\r\n$7\r\nmessage\r\n$5\r\nusage\r\n$7\r\n{"p":2}\r\n'
    assert cpa.refresh() == 1
    assert client.read() == b'*3\r\n$7\r\nmessage\r\n$5\r\nusage\r\n$16\r\n{"refresh":true}\r\n'
    assert cpa.queue_len() == 1
    client.call("UNSUBSCRIBE")
    deadline = time.monotonic() + 2
    while cpa.queue.subscriber_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cpa.publish(b'{"q":3}') == "queued"
    assert cpa.pop_oldest(10) == [b'{"q":1}', b'{"q":3}']


def test_errors_channel_is_subscribe_only(cpa):
    client = authed(cpa)
    assert client.call("SUBSCRIBE", "errors") == b"*3\r\n$9\r\nsubscribe\r\n$6\r\nerrors\r\n:1\r\n"
    assert cpa.publish_error(b'{"status_code":401}') == 1
    assert client.read() == b'*3\r\n$7\r\nmessage\r\n$6\r\nerrors\r\n$19\r\n{"status_code":401}\r\n'
    assert cpa.publish(b"{}") == "queued"  # an errors subscriber does not stop queueing
    assert cpa.publish_error(b"x") == 1 and cpa.queue_len() == 1


def test_a_subscriber_whose_buffer_fills_is_dropped():
    fake = FakeCPA(KEY, subscriber_buffer=4)
    fake.start()
    try:
        client = Wire(fake.port)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.call("AUTH", KEY)
        client.call("SUBSCRIBE", "usage", expect=len(SUBSCRIBED))
        big = b'"' + b"x" * 1_000_000 + b'"'
        for _ in range(200):
            fake.publish(big)
            if fake.queue.subscriber_count() == 0:
                break
        assert fake.queue.subscriber_count() == 0
        client.sock.settimeout(5)
        try:
            while client.sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass  # the server closed with unread data: also a closed connection
        assert client.sock.recv(1) == b""
    finally:
        fake.stop()


def test_first_byte_sniff_sends_other_resp_types_to_resp(cpa, wire):
    wire.sock.sendall(b"$4\r\nPING\r\n")
    assert wire.read().startswith(b"-ERR Protocol error")


def test_management_disabled_closes_resp_and_404s_http():
    fake = FakeCPA("")
    fake.start()
    try:
        client = Wire(fake.port)
        client.sock.sendall(cmd("AUTH", "x"))
        assert client.closed()
        assert http(fake, "/v0/management/config", {"Authorization": "Bearer x"})[0] == 404
    finally:
        fake.stop()


# --- redis-py ---------------------------------------------------------------------------


def test_redis_py_resp2_pops_and_subscribes(cpa):
    r = redis.Redis(port=cpa.port, password=KEY, protocol=2, health_check_interval=0)
    cpa.publish(b'{"a":1}')
    cpa.publish(b"not json")
    assert r.lpop("usage", 5) == [b'{"a":1}', b"not json"]
    assert r.rpop("usage", 5) is None or r.rpop("usage", 5) == []
    sub = r.pubsub()
    sub.subscribe("usage")
    assert sub.get_message(timeout=2)["data"] == 1
    assert sub.get_message(timeout=2)["data"] == b'{"support_refresh":true}'
    cpa.publish(b'{"b":2}')
    assert sub.get_message(timeout=2)["data"] == b'{"b":2}'
    sub.ping("hi")
    assert sub.get_message(timeout=2) == {"type": "pong", "pattern": None, "channel": None, "data": b"hi"}
    sub.close()
    r.close()


def test_redis_py_default_resp3_fails_with_an_auth_error():
    fake = FakeCPA(KEY, ban_after=100)
    fake.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=fake.port, password=KEY).lpop("usage")
    finally:
        fake.stop()


def test_redis_py_default_retries_burn_the_ban_in_one_call(cpa):
    with pytest.raises(redis.ResponseError, match="IP banned due to too many failed attempts"):
        redis.Redis(port=cpa.port, password=KEY).lpop("usage")
    assert cpa.bans.failures_total == 5


# --- HTTP ---------------------------------------------------------------------------------


def http(cpa: FakeCPA, path: str, headers: dict[str, str] | None = None,
         method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(cpa.url + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEY}"}, {"Authorization": KEY}, {"X-Management-Key": KEY}])
def test_usage_queue_key_forms_and_body(cpa, headers):
    for item in (b'{"a":1}', b"not json", b"[1,2]", b"NaN"):
        cpa.publish(item)
    status, hdrs, body = http(cpa, "/v0/management/usage-queue?count=10", headers)
    assert status == 200
    assert body == b'[{"a":1},"not json",[1,2],"NaN"]'
    assert hdrs["X-CPA-VERSION"] and hdrs["X-CPA-COMMIT"] and hdrs["X-CPA-BUILD-DATE"]
    assert hdrs["X-CPA-SUPPORT-PLUGIN"] == "true"
    assert http(cpa, "/v0/management/usage-queue?count=10", headers)[2] == b"[]"


def test_usage_queue_count_defaults_to_one_and_rejects_bad_counts(cpa):
    auth = {"Authorization": f"Bearer {KEY}"}
    cpa.publish(b"{}")
    cpa.publish(b"{}")
    assert http(cpa, "/v0/management/usage-queue", auth)[2] == b"[{}]"
    for bad in ("0", "-3", "x", ""):
        status, _, body = http(cpa, f"/v0/management/usage-queue?count={bad}", auth)
        assert (status, json.loads(body)) == (400, {"error": "count must be a positive integer"})
    assert cpa.queue_len() == 1


def test_http_401_for_missing_and_invalid_keys(cpa):
    status, hdrs, body = http(cpa, "/v0/management/usage-queue")
    assert (status, json.loads(body)) == (401, {"error": "missing management key"})
    assert "X-CPA-VERSION" in hdrs
    status, _, body = http(cpa, "/v0/management/auth-files", {"Authorization": "Bearer nope"})
    assert (status, json.loads(body)) == (401, {"error": "invalid management key"})


def test_config_and_usage_statistics_toggle(cpa):
    auth = {"Authorization": f"Bearer {KEY}"}
    config = json.loads(http(cpa, "/v0/management/config", auth)[2])
    assert config["usage-statistics-enabled"] is True
    assert config["redis-usage-queue-retention-seconds"] == 60
    status, _, body = http(cpa, "/v0/management/usage-statistics-enabled", auth, "PUT", b'{"value":false}')
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert cpa.publish(b"{}") == "disabled" and cpa.queue_len() == 0
    assert json.loads(http(cpa, "/v0/management/config", auth)[2])["usage-statistics-enabled"] is False
    assert http(cpa, "/v0/management/usage-statistics-enabled", auth, "PUT", b'{"value":"yes"}')[0] == 400
    assert http(cpa, "/v0/management/nothing", auth)[0] == 404


def test_auth_files_listing(cpa):
    files = [{"id": "alice.json", "auth_index": "9f2c4e1a7b3d5c60", "name": "alice.json", "type": "codex",
              "provider": "codex", "label": "alice", "status": "active", "status_message": "",
              "disabled": False, "unavailable": False, "email": "alice@example.com"}]
    cpa.set_auth_files(files)
    status, _, body = http(cpa, "/v0/management/auth-files", {"X-Management-Key": KEY})
    assert (status, json.loads(body)) == (200, {"files": files})


# --- proxy mode -----------------------------------------------------------------------------


@pytest.fixture
def proxied():
    server = RedisServer(KEY).start()
    fake = FakeCPA(KEY, redis_backend=("127.0.0.1", server.port))
    fake.start()
    yield fake, server
    fake.stop()
    server.stop()


def test_proxy_mode_forwards_resp_to_real_redis(proxied):
    fake, server = proxied
    assert fake.publish(b'{"n":1}') == "queued" and fake.publish(b'{"n":2}') == "queued"
    assert server.client().llen("usage") == 2 and fake.queue_len() == 2
    r = redis.Redis(port=fake.port, password=KEY)  # real Redis accepts RESP3 HELLO
    assert r.lpop("usage") == b'{"n":1}'
    sub = r.pubsub()
    sub.subscribe("usage", "errors")
    assert [sub.get_message(timeout=2)["type"] for _ in range(2)] == ["subscribe", "subscribe"]
    assert fake.publish(b'{"n":3}') == "published"
    assert fake.refresh() == 1 and fake.publish_error(b'{"e":1}') == 1
    got = [sub.get_message(timeout=2) for _ in range(3)]
    assert [(m["channel"], m["data"]) for m in got] == [
        (b"usage", b'{"n":3}'), (b"usage", b'{"refresh":true}'), (b"errors", b'{"e":1}')]
    sub.close()
    status, _, body = http(fake, "/v0/management/usage-queue?count=5", {"Authorization": f"Bearer {KEY}"})
    assert (status, body) == (200, b'[{"n":2}]')
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=fake.port, password="wrong", protocol=2).lpop("usage")
