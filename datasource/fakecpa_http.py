"""The HTTP side of the CPA stand-in: the management routes CPA Monitor reads.

GET /v0/management/usage-queue?count=N, GET /v0/management/config,
GET|PUT /v0/management/usage-statistics-enabled and GET /v0/management/auth-files, with CPA's
management-key rules (Bearer, a bare Authorization value, X-Management-Key) and its headers.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Protocol
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

CPA_HEADERS = {
    "X-CPA-VERSION": "6.9.99-fakecpa",
    "X-CPA-COMMIT": "fakecpa",
    "X-CPA-BUILD-DATE": "2026-08-22T00:00:00Z",
    "X-CPA-SUPPORT-PLUGIN": "true",
}
_COUNT = re.compile(r"^[+-]?[0-9]+$")


class ManagementBackend(Protocol):
    """What the HTTP routes need from FakeCPA."""

    management_key: str
    usage_statistics_enabled: bool
    retention_s: int

    def check_key(self, provided: str, ip: str) -> str | None: ...
    def banned_message(self, ip: str) -> str | None: ...
    def pop_oldest(self, count: int) -> list[bytes]: ...
    def auth_files(self) -> list[dict[str, Any]]: ...


def is_json(item: bytes) -> bool:
    """Go's json.Valid: strict JSON (no NaN/Infinity), any value type."""
    def _reject(name: str) -> Any:
        raise ValueError(name)

    try:
        json.loads(item, parse_constant=_reject)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def queue_body(items: list[bytes]) -> bytes:
    """CPA's usage-queue body: valid JSON items embedded raw, the others as JSON strings."""
    parts = [item if is_json(item) else json.dumps(item.decode("utf-8", "replace")).encode()
             for item in items]
    return b"[" + b",".join(parts) + b"]"


def parse_count(query: str) -> int | None:
    values = parse_qs(query, keep_blank_values=True).get("count")
    if values is None:
        return 1
    raw = values[0]
    if not _COUNT.match(raw) or int(raw) <= 0:
        return None
    return int(raw)


def provided_key(headers: Any) -> str:
    auth = (headers.get("Authorization") or "").strip()
    if auth:
        return auth[7:].strip() if auth.lower().startswith("bearer ") else auth
    return (headers.get("X-Management-Key") or "").strip()


def make_handler(backend: ManagementBackend) -> Callable[[socket.socket, tuple[str, int]], None]:
    """A function serving one HTTP connection (keep-alive) against `backend`."""

    class Handler(_ManagementHandler):
        cpa = backend

    def serve(sock: socket.socket, address: tuple[str, int]) -> None:
        Handler(sock, address, None)

    return serve


class _ManagementHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakecpa"
    cpa: ManagementBackend

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("fakecpa http %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        routes = {
            ("GET", "/v0/management/usage-queue"): lambda: self._usage_queue(url.query),
            ("GET", "/v0/management/config"): self._config,
            ("GET", "/v0/management/usage-statistics-enabled"): self._get_enabled,
            ("PUT", "/v0/management/usage-statistics-enabled"): self._put_enabled,
            ("GET", "/v0/management/auth-files"): lambda: (200, {"files": self.cpa.auth_files()}),
        }
        route = routes.get((method, url.path.rstrip("/") or "/"))
        body = self._read_body()
        if route is None or not self.cpa.management_key:
            self._send(404, b"404 page not found", "text/plain")
            return
        denied = self._authorize()
        if denied is not None:
            self._send_json(*denied)
            return
        self._body = body
        self._send_json(*route())

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _authorize(self) -> tuple[int, dict[str, Any]] | None:
        ip = self.client_address[0]
        banned = self.cpa.banned_message(ip)
        if banned:
            return 403, {"error": banned}
        problem = self.cpa.check_key(provided_key(self.headers), ip)
        return (401, {"error": problem}) if problem else None

    def _usage_queue(self, query: str) -> tuple[int, Any]:
        count = parse_count(query)
        if count is None:
            return 400, {"error": "count must be a positive integer"}
        return 200, queue_body(self.cpa.pop_oldest(count))

    def _config(self) -> tuple[int, Any]:
        return 200, {
            "debug": False,
            "proxy-url": "",
            "usage-statistics-enabled": self.cpa.usage_statistics_enabled,
            "redis-usage-queue-retention-seconds": self.cpa.retention_s,
            "remote-management": {"allow-remote": False},
        }

    def _get_enabled(self) -> tuple[int, Any]:
        return 200, {"usage-statistics-enabled": self.cpa.usage_statistics_enabled}

    def _put_enabled(self) -> tuple[int, Any]:
        try:
            value = json.loads(self._body or b"null")
        except ValueError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("value"), bool):
            return 400, {"error": "invalid body"}
        self.cpa.usage_statistics_enabled = value["value"]
        return 200, {"status": "ok"}

    def _send_json(self, status: int, payload: Any) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        for name, value in CPA_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
