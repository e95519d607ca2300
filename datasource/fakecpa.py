"""FakeCPA: a CPA (CLIProxyAPI) stand-in that speaks CPA's protocol on one TCP port.

The first byte of each connection decides: `* $ + - :` -> RESP, anything else -> HTTP, like
CPA's protocol multiplexer. RESP is served by the built-in queue (fakecpa_resp) or, in proxy
mode, forwarded byte for byte to a real Redis server; HTTP serves the management routes
(fakecpa_http) in both modes. Stdlib threads and sockets only.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from typing import Any

from datasource.fakecpa_http import make_handler
from datasource.fakecpa_queue import REFRESH, BanList, UsageQueue, clamp_retention
from datasource.fakecpa_resp import RespSession, array, bulk

logger = logging.getLogger(__name__)

RESP_FIRST_BYTES = b"*$+-:"
SNIFF_TIMEOUT_S = 10.0

# CPA's Enqueue against a real Redis, atomically: PUBLISH when a usage subscriber exists, else RPUSH.
_ENQUEUE_LUA = """
if redis.call('PUBSUB', 'NUMSUB', KEYS[1])[2] > 0 then
  redis.call('PUBLISH', KEYS[1], ARGV[1])
  return 1
end
redis.call('RPUSH', KEYS[1], ARGV[1])
return 0
"""


class FakeCPA:
    """CPA's usage queue and management API on a loopback port."""

    def __init__(self, management_key: str, *, retention_s: int = 60,
                 auth_files: list[dict[str, Any]] | None = None,
                 usage_statistics_enabled: bool = True,
                 redis_backend: tuple[str, int] | None = None,
                 ban_after: int = 5, ban_seconds: float = 1800,
                 host: str = "127.0.0.1", port: int = 0, subscriber_buffer: int = 256) -> None:
        self.management_key = management_key
        self.retention_s = clamp_retention(retention_s)
        self.usage_statistics_enabled = usage_statistics_enabled
        self.redis_backend = redis_backend
        self.queue = UsageQueue(self.retention_s, buffer_size=subscriber_buffer)
        self.bans = BanList(ban_after, ban_seconds)
        self._auth_files = [dict(f) for f in auth_files or []]
        self._host, self._port = host, port
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._serve_http = make_handler(self)
        self._backend_lock = threading.Lock()
        self._backend: _BackendClient | None = None

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> int:
        if self._listener is not None:
            return self.port
        listener = socket.create_server((self._host, self._port), reuse_port=False)
        listener.settimeout(0.5)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="fakecpa-accept", daemon=True)
        self._accept_thread.start()
        logger.info("fakecpa listening on %s (%s)", self.url, "proxy" if self.redis_backend else "built-in queue")
        return self._port

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            _close(conn)
        with self._backend_lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
        self._listener = None
        self._accept_thread = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    # --- CPA behaviour --------------------------------------------------------
    def publish(self, payload: bytes | str) -> str:
        """CPA's Enqueue: to usage subscribers if any, else into the queue. Returns what happened."""
        data = payload.encode() if isinstance(payload, str) else payload
        if not self.usage_statistics_enabled:
            return "disabled"
        if self.redis_backend is None:
            return self.queue.enqueue(data)
        published = self._redis("EVAL", _ENQUEUE_LUA, "1", "usage", data)
        return "published" if published else "queued"

    def publish_error(self, payload: bytes | str) -> int:
        """A credential error event on the subscribe-only `errors` channel."""
        data = payload.encode() if isinstance(payload, str) else payload
        if self.redis_backend is None:
            return self.queue.publish_error(data)
        return int(self._redis("PUBLISH", "errors", data))

    def refresh(self) -> int:
        """`{"refresh":true}` to usage subscribers (CPA's auth-file watcher saw a change)."""
        if self.redis_backend is None:
            return self.queue.refresh()
        return int(self._redis("PUBLISH", "usage", REFRESH))

    def queue_len(self) -> int:
        if self.redis_backend is None:
            return len(self.queue)
        return int(self._redis("LLEN", "usage"))

    def pop_oldest(self, count: int) -> list[bytes]:
        if self.redis_backend is None:
            return self.queue.pop_oldest(count)
        items = self._redis("LPOP", "usage", str(count))
        return list(items or [])

    def set_auth_files(self, files: list[dict[str, Any]]) -> None:
        with self._lock:
            self._auth_files = [dict(f) for f in files]

    def auth_files(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(f) for f in self._auth_files]

    def check_key(self, provided: str, ip: str) -> str | None:
        """CPA's management-key check; every miss counts towards the IP ban."""
        if not provided:
            self.bans.fail(ip)
            return "missing management key"
        if not hmac.compare_digest(provided.encode(), self.management_key.encode()):
            self.bans.fail(ip)
            return "invalid management key"
        self.bans.succeed(ip)
        return None

    def banned_message(self, ip: str) -> str | None:
        return self.bans.banned_message(ip)

    # --- connections ------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, address), name="fakecpa-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, address: tuple[str, int]) -> None:
        try:
            conn.settimeout(SNIFF_TIMEOUT_S)
            first = conn.recv(1, socket.MSG_PEEK)
            conn.settimeout(None)
            if not first:
                return
            if first in RESP_FIRST_BYTES:
                self._serve_resp(conn, address[0])
            else:
                self._serve_http(conn, address)
        except OSError as exc:
            logger.debug("fakecpa connection from %s ended: %s", address[0], exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close(conn)

    def _serve_resp(self, conn: socket.socket, ip: str) -> None:
        if not self.management_key:
            return  # management disabled: CPA closes the connection at once
        if self.redis_backend is not None:
            _proxy(conn, self.redis_backend)
            return
        RespSession(conn, ip, self.queue, self.check_key, self.banned_message, self.bans.fail).run()

    def _redis(self, *args: str | bytes) -> Any:
        """One command on the shared backend connection (proxy mode)."""
        assert self.redis_backend is not None
        with self._backend_lock:
            if self._backend is None:
                self._backend = _BackendClient(self.redis_backend, self.management_key)
            try:
                return self._backend.command(*args)
            except OSError:
                self._backend.close()
                self._backend = None
                raise


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def _proxy(client: socket.socket, backend: tuple[str, int]) -> None:
    """Forward bytes both ways until either side closes."""
    upstream = socket.create_connection(backend, timeout=10)
    upstream.settimeout(None)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    back = threading.Thread(target=pump, args=(upstream, client), name="fakecpa-proxy", daemon=True)
    back.start()
    pump(client, upstream)
    back.join(timeout=5)
    upstream.close()


class BackendError(RuntimeError):
    """The real Redis behind a proxy-mode FakeCPA answered with an error."""


class _BackendClient:
    """A minimal RESP2 client for the proxy backend (publish/queue bookkeeping)."""

    def __init__(self, address: tuple[str, int], password: str) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.rfile = self.sock.makefile("rb")
        if password:
            self.command("AUTH", password)

    def command(self, *args: str | bytes) -> Any:
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        self.sock.sendall(array([bulk(p) for p in parts]))
        return self._reply()

    def _reply(self) -> Any:
        line = self.rfile.readline()
        if not line:
            raise ConnectionError("redis backend closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise BackendError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.rfile.read(size + 2)[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise ConnectionError(f"unexpected reply from redis backend: {line[:40]!r}")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

