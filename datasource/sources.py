"""Clients for CPA's usage stream: RESP (redis-py) pop and subscribe, and the HTTP management API.

CPA counts every command sent before a good AUTH, and every wrong key, as a failed management
login and bans the IP after 5 of them. So every RESP connection speaks RESP2 (`protocol=2`: redis-py
then sends `AUTH <key>` first instead of `HELLO 3`), never retries on its own, and sends no health-check
PING outside a subscription. Errors come out as `SourceError` with the stage they belong to;
`AuthError` (wrong key or banned IP) and `Unsupported` (endpoint or command missing) are distinct
so the collector can back off for minutes or fall back to another transport.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import redis
import redis.backoff
import redis.exceptions
import redis.retry

logger = logging.getLogger(__name__)

USAGE = "usage"
ERRORS = "errors"
_UNSUPPORTED_STATUS = (404, 405, 501)


class SourceError(Exception):
    """A transport failure; `stage` is connect, auth, subscribe, http or consume."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class AuthError(SourceError):
    """CPA refused the management key (wrong key, remote management off, or IP banned)."""

    def __init__(self, message: str) -> None:
        super().__init__("auth", f"wrong key or IP banned: {message}")


class Unsupported(SourceError):
    """The upstream does not offer this transport (HTTP 404/405/501, unknown command)."""


class BadReply(SourceError):
    """HTTP 200 from the usage queue whose body is not a JSON array: kept as a dead letter.

    CPA's pops are destructive, so the body may be the only copy of what was popped; the
    collector stores it (first 64 KiB) with `reason` before it backs off.
    """

    MAX_BODY = 64 * 1024

    def __init__(self, reason: str, body: bytes) -> None:
        super().__init__("http", reason)
        self.reason = reason
        self.body = body[:self.MAX_BODY]


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_endpoint(base_url: str) -> Endpoint:
    """`http(s)://host[:port]` (a bare host gets http://) -> host, port (default 80/443), TLS."""
    url = base_url if "://" in base_url else "http://" + base_url
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "https"
    return Endpoint(parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80), tls)


@dataclass(frozen=True, slots=True)
class Message:
    channel: str
    payload: bytes


def _is_auth_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, redis.exceptions.AuthenticationError) or any(
        marker in text for marker in ("noauth", "invalid management key", "missing management key",
                                      "ip banned", "invalid password", "wrongpass",
                                      "remote management disabled", "invalid username-password")
    )


def _translate(exc: Exception, stage: str) -> SourceError:
    if isinstance(exc, SourceError):
        return exc
    if _is_auth_failure(exc):
        return AuthError(str(exc))
    text = str(exc).lower()
    if "unknown command" in text or "unsupported" in text:
        return Unsupported(stage, str(exc))
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)):
        return SourceError("connect", str(exc) or exc.__class__.__name__)
    return SourceError(stage, str(exc) or exc.__class__.__name__)


def make_client(base_url: str, key: str, timeout_s: float, *, single: bool) -> redis.Redis:
    """redis-py set up for CPA: RESP2 + AUTH first, no retries, no health-check PINGs."""
    ep = parse_endpoint(base_url)
    return redis.Redis(
        host=ep.host, port=ep.port, password=key or None, ssl=ep.tls,
        protocol=2, health_check_interval=0, single_connection_client=single,
        socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
    )


class RespConnection:
    """One authenticated RESP connection to CPA's port (pop commands or a subscription)."""

    def __init__(self, base_url: str, key: str, *, timeout_s: float = 10.0) -> None:
        self._base_url, self._key, self._timeout_s = base_url, key, timeout_s
        self._client: redis.Redis | None = None

    def open(self) -> "RespConnection":
        """Dial and AUTH now (redis-py does both when the first command needs the connection)."""
        try:  # a single-connection client dials and AUTHs in its constructor
            self._client = make_client(self._base_url, self._key, self._timeout_s, single=True)
        except Exception as exc:
            self.close()
            raise _translate(exc, "connect") from exc
        return self

    def pop(self, count: int, side: str = "right") -> list[bytes]:
        """`RPOP usage <count>` (or LPOP): up to `count` items, oldest first on CPA."""
        command = "LPOP" if side.lower() in ("left", "lpop") else "RPOP"
        if self._client is None:
            raise SourceError("consume", "RESP connection is not open")
        try:
            reply = self._client.execute_command(command, USAGE, count)
        except Exception as exc:
            raise _translate(exc, "consume") from exc
        if reply is None:
            return []
        if isinstance(reply, (bytes, str)):
            reply = [reply]
        return [item if isinstance(item, bytes) else str(item).encode() for item in reply]

    def close(self) -> None:
        client, self._client = self._client, None
        try:
            if client is not None:
                client.close()
        except Exception:  # closing a broken socket must never raise into the loop
            logger.debug("closing RESP connection failed", exc_info=True)


class RespSubscriber:
    """`SUBSCRIBE <channel>` on its own connection; `read()` yields payloads, `ping()` keeps alive."""

    def __init__(self, base_url: str, key: str, channel: str = USAGE, *, timeout_s: float = 10.0) -> None:
        self.channel = channel
        self._client = make_client(base_url, key, timeout_s, single=False)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        self._timeout_s = timeout_s
        self._failed: SourceError | None = None
        self.last_ping = time.monotonic()
        self.pongs = 0

    def open(self) -> "RespSubscriber":
        try:
            self._pubsub.subscribe(self.channel)
            reply = self._pubsub.get_message(timeout=10.0)
        except Exception as exc:
            self.close()
            raise _translate(exc, "subscribe") from exc
        if not reply or reply.get("type") != "subscribe":
            self.close()
            raise SourceError("subscribe", f"unexpected reply to SUBSCRIBE {self.channel}: {reply!r}")
        self.last_ping = time.monotonic()
        return self

    def read(self, timeout_s: float, max_items: int) -> list[Message]:
        """Messages that arrive within `timeout_s` (returns early once one has come and the line is idle).

        A connection error after some messages were read returns those messages first (they were
        pushed to us only: CPA does not queue what it publishes) and raises on the next call.
        """
        if self._failed is not None:
            exc, self._failed = self._failed, None
            raise exc
        out: list[Message] = []
        wait = timeout_s
        while len(out) < max_items:
            try:
                msg = self._next(wait)
            except Exception as exc:
                error = _translate(exc, "consume")
                if not out:
                    raise error from exc
                self._failed = error
                break
            if msg is None:
                break
            wait = 0.0 if out else wait
            kind = msg.get("type")
            if kind == "pong":
                self.pongs += 1
                continue
            if kind == "message" and msg.get("data"):
                out.append(Message(self.channel, msg["data"]))
                wait = 0.0
        return out

    def _next(self, wait_s: float) -> dict | None:
        """The next push, or None when no byte of one arrives within `wait_s`.

        redis-py's get_message(timeout=t) reads the rest of a push that has begun arriving with
        the same t as its deadline: with t = 0 a push split across TCP segments raised
        "Timeout reading from socket" mid-message, which ended a healthy subscription and lost
        every message its buffers held. So wait for the first byte here, then read the whole
        push with the connection's own timeout.
        """
        conn = self._pubsub.connection
        if conn is None:
            raise SourceError("consume", f"subscription to {self.channel} is not open")
        if not conn.can_read(timeout=wait_s):
            return None
        return self._pubsub.get_message(timeout=self._timeout_s)

    def ping(self) -> None:
        try:
            self._pubsub.ping()
        except Exception as exc:
            raise _translate(exc, "consume") from exc
        self.last_ping = time.monotonic()

    def close(self) -> None:
        try:
            self._pubsub.close()
        except Exception:
            logger.debug("closing subscription failed", exc_info=True)
        self._client.close()


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    body: bytes


class HttpManagement:
    """CPA's management API over HTTP (stdlib urllib), `Authorization: Bearer <key>`."""

    def __init__(self, base_url: str, key: str, *, timeout_s: float = 30.0) -> None:
        self.base = (base_url if "://" in base_url else "http://" + base_url).rstrip("/")
        self._key = key
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: bytes | None = None,
                 timeout_s: float | None = None) -> HttpReply:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self._key}")
        req.add_header("Accept", "application/json")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                return HttpReply(resp.status, resp.read())
        except urllib.error.HTTPError as exc:
            reply = HttpReply(exc.code, exc.read()[:1024])
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError("connect", f"{method} {path}: {reason}") from exc
        raise self._status_error(method, path, reply)

    @staticmethod
    def _status_error(method: str, path: str, reply: HttpReply) -> SourceError:
        text = reply.body.decode("utf-8", "replace").strip()
        try:
            text = str(json.loads(text).get("error", text))
        except (ValueError, AttributeError):
            pass
        message = f"{method} {path}: HTTP {reply.status} {text}".strip()
        if reply.status in (401, 403):
            return AuthError(message)
        if reply.status in _UNSUPPORTED_STATUS:
            return Unsupported("http", message)
        return SourceError("http", message)

    def _json(self, path: str, timeout_s: float | None = None) -> Any:
        reply = self._request("GET", path, timeout_s=timeout_s)
        try:
            return json.loads(reply.body)
        except ValueError as exc:
            raise SourceError("http", f"GET {path}: response is not JSON") from exc

    def usage_queue(self, count: int) -> list[bytes]:
        """GET /v0/management/usage-queue?count=N -> raw items (JSON-string items unwrapped).

        A body that is not JSON, or JSON that is not an array, raises BadReply with the body.
        Elements that are neither objects nor strings come back as their JSON text, so the
        normalizer dead-letters them one by one instead of failing the whole popped batch.
        """
        path = f"/v0/management/usage-queue?count={int(count)}"
        reply = self._request("GET", path)
        try:
            data = json.loads(reply.body)
        except ValueError:
            raise BadReply(f"GET {path}: HTTP {reply.status} reply is not JSON", reply.body) from None
        if not isinstance(data, list):
            raise BadReply(f"GET {path}: reply is a JSON {_json_kind(data)}, not an array", reply.body)
        return [item for item in (_queue_item(v) for v in data) if item]

    def config(self) -> dict[str, Any]:
        data = self._json("/v0/management/config", timeout_s=5.0)
        if not isinstance(data, dict):
            raise SourceError("http", "config did not return a JSON object")
        return data

    def auth_files(self) -> list[dict[str, Any]]:
        data = self._json("/v0/management/auth-files", timeout_s=5.0)
        files = data.get("files") if isinstance(data, dict) else data
        if not isinstance(files, list):
            raise SourceError("http", "auth-files did not return a file list")
        return [f for f in files if isinstance(f, dict)]

    def usage_statistics_enabled(self) -> bool:
        data = self._json("/v0/management/usage-statistics-enabled", timeout_s=5.0)
        value = data.get("usage-statistics-enabled", data.get("value")) if isinstance(data, dict) else data
        return bool(value)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", str: "string", list: "array"}.get(type(value), "null")


def _queue_item(value: Any) -> bytes | None:
    """An element of the usage-queue array: objects stay raw JSON, strings are unwrapped."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8") if value.strip() else None
    # objects stay objects; numbers, booleans and arrays become dead letters in the normalizer
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
