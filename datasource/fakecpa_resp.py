"""The RESP side of the CPA stand-in: wire codec and one session per connection.

Answers exactly the way CPA's internal/api/redis_queue_protocol.go does: NOAUTH before AUTH
(HELLO included), AUTH <key> / AUTH <user> <key>, LPOP/RPOP usage [n] (both oldest first),
SUBSCRIBE usage/errors, and PING/UNSUBSCRIBE/QUIT only while subscribed.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from typing import BinaryIO, Callable, Protocol

from datasource.fakecpa_queue import Subscriber, UsageQueue

logger = logging.getLogger(__name__)

MAX_BULK = 64 * 1024 * 1024
_INT = re.compile(rb"^[+-]?[0-9]+$")


class RespProtocolError(ValueError):
    """The client sent bytes that are not a RESP command array."""


class KeyChecker(Protocol):
    def __call__(self, provided: str, ip: str) -> str | None: ...


# --- codec --------------------------------------------------------------------


def bulk(value: bytes | str | None) -> bytes:
    if value is None:
        return b"$-1\r\n"
    data = value.encode() if isinstance(value, str) else value
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(items: list[bytes]) -> bytes:
    """An array whose items are already encoded."""
    return b"*%d\r\n" % len(items) + b"".join(items)


def error(message: str) -> bytes:
    return b"-" + message.encode() + b"\r\n"


def read_command(rfile: BinaryIO) -> list[bytes] | None:
    """One command (an array of bulk strings); None at a clean EOF."""
    line = rfile.readline(65536)
    if not line:
        return None
    if not line.startswith(b"*") or not line.endswith(b"\r\n"):
        raise RespProtocolError("expected '*'")
    count = _length(line[1:-2])
    args = []
    for _ in range(count):
        header = rfile.readline(65536)
        if not header.startswith(b"$") or not header.endswith(b"\r\n"):
            raise RespProtocolError("expected '$'")
        size = _length(header[1:-2])
        data = rfile.read(size + 2)
        if len(data) != size + 2 or not data.endswith(b"\r\n"):
            raise RespProtocolError("short bulk string")
        args.append(data[:-2])
    return args


def _length(raw: bytes) -> int:
    if not _INT.match(raw) or not 0 <= int(raw) <= MAX_BULK:
        raise RespProtocolError("invalid length")
    return int(raw)


# --- session --------------------------------------------------------------------


class RespSession:
    """One RESP connection against the built-in queue."""

    def __init__(self, sock: socket.socket, ip: str, usage: UsageQueue, check_key: KeyChecker,
                 is_banned: Callable[[str], str | None], note_failure: Callable[[str], None]) -> None:
        self.sock = sock
        self.ip = ip
        self.usage = usage
        self.check_key = check_key
        self.is_banned = is_banned
        self.note_failure = note_failure
        self.authed = False
        self.subs: list[Subscriber] = []
        self._wlock = threading.Lock()
        self._closing = False

    def run(self) -> None:
        rfile = self.sock.makefile("rb")
        try:
            while not self._closing:
                try:
                    args = read_command(rfile)
                except RespProtocolError as exc:
                    self.send(error(f"ERR Protocol error: {exc}"))
                    return
                if args is None or not args:
                    return
                self.send(self.dispatch(args))
        except OSError:
            return
        finally:
            for sub in list(self.subs):
                self.usage.unsubscribe(sub)
            rfile.close()

    def send(self, data: bytes) -> None:
        if data:
            with self._wlock:
                self.sock.sendall(data)

    def dispatch(self, args: list[bytes]) -> bytes:
        name = args[0].decode("utf-8", "replace").lower()
        banned = self.is_banned(self.ip)
        if banned:
            return error(f"ERR {banned}")
        if name == "auth":
            return self._auth(args[1:])
        if not self.authed:
            self.note_failure(self.ip)
            return error("NOAUTH Authentication required.")
        if self.subs:
            return self._subscribed(name, args[1:])
        if name in ("lpop", "rpop"):
            return self._pop(name, args[1:])
        if name == "subscribe":
            return self._subscribe(args[1:])
        if name == "quit":
            self._closing = True
            return b"+OK\r\n"
        return error(f"ERR unknown command '{name}'")

    def _auth(self, params: list[bytes]) -> bytes:
        if len(params) not in (1, 2):
            return error("ERR wrong number of arguments for 'auth' command")
        problem = self.check_key(params[-1].decode("utf-8", "replace"), self.ip)
        if problem:
            return error(f"ERR {problem}")
        self.authed = True
        return b"+OK\r\n"

    def _pop(self, name: str, params: list[bytes]) -> bytes:
        if len(params) not in (1, 2):
            return error(f"ERR wrong number of arguments for '{name}' command")
        key = params[0].decode("utf-8", "replace")
        if key.strip().lower() != "usage":
            return error(f"ERR unsupported channel '{key}'")
        if len(params) == 1:
            items = self.usage.pop_oldest(1)
            return bulk(items[0] if items else None)
        raw = params[1]
        if not _INT.match(raw) or int(raw) <= 0:
            return error("ERR value is not an integer or out of range")
        return array([bulk(item) for item in self.usage.pop_oldest(int(raw))])

    def _subscribe(self, params: list[bytes]) -> bytes:
        if not params:
            return error("ERR wrong number of arguments for 'subscribe' command")
        channels = [p.decode("utf-8", "replace") for p in params]
        for channel in channels:
            if channel.strip().lower() not in ("usage", "errors"):
                return error(f"ERR unsupported channel '{channel}'")
        replies, new = [], []
        for channel in channels:
            sub = self.usage.subscribe(channel.strip().lower(), on_drop=self._drop_connection)
            self.subs.append(sub)
            new.append(sub)
            replies.append(array([bulk("subscribe"), bulk(channel), b":%d\r\n" % len(self.subs)]))
        self.send(b"".join(replies))
        for sub in new:
            threading.Thread(target=self._pump, args=(sub,), name="fakecpa-sub", daemon=True).start()
        return b""

    def _subscribed(self, name: str, params: list[bytes]) -> bytes:
        if name == "ping":
            return array([bulk("pong"), bulk(params[0] if params else None)])
        if name == "subscribe":
            return self._subscribe(params)
        if name in ("unsubscribe", "quit"):
            self._closing = True
            subs, self.subs = list(self.subs), []
            for sub in subs:
                self.usage.unsubscribe(sub)
            if name == "quit":
                return b"+OK\r\n"
            left = len(subs)
            out = []
            for sub in subs:
                left -= 1
                out.append(array([bulk("unsubscribe"), bulk(sub.channel), b":%d\r\n" % left]))
            return b"".join(out)
        return error(f"ERR unknown command '{name}'")

    def _pump(self, sub: Subscriber) -> None:
        """Writer for one subscription: buffer -> `message` pushes on the socket."""
        channel = bulk(sub.channel)
        while True:
            payload = sub.buffer.get()
            if payload is None:
                return
            try:
                self.send(array([bulk("message"), channel, bulk(payload)]))
            except OSError:
                return

    def _drop_connection(self) -> None:
        """CPA closes a subscriber that fell a full buffer behind."""
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
