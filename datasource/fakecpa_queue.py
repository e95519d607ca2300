"""The state a CPA stand-in keeps: the usage queue, its subscribers and the login-failure ban.

Pure stdlib and thread-safe. Follows CPA's internal/redisqueue semantics: with a `usage`
subscriber attached an event is pushed to subscribers only, otherwise it is queued with a
retention (pruned lazily on enqueue and on pop); a subscriber whose buffer is full is dropped.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 60
MAX_RETENTION_S = 3600
SUBSCRIBER_BUFFER = 256
SUPPORT_REFRESH = b'{"support_refresh":true}'
REFRESH = b'{"refresh":true}'
CHANNELS = ("usage", "errors")


def clamp_retention(seconds: int) -> int:
    """CPA's rule: values <= 0 become 60, the maximum is 3600."""
    if seconds <= 0:
        return DEFAULT_RETENTION_S
    return min(seconds, MAX_RETENTION_S)


@dataclass(eq=False)
class Subscriber:
    """One subscribed connection: a bounded buffer drained by the connection's writer."""

    channel: str
    buffer: "queue.Queue[bytes | None]" = field(default_factory=lambda: queue.Queue(SUBSCRIBER_BUFFER))
    on_drop: Callable[[], None] | None = None
    dropped: bool = False


class UsageQueue:
    """CPA's in-memory FIFO plus the usage/errors subscriber sets."""

    def __init__(self, retention_s: int = DEFAULT_RETENTION_S, *,
                 buffer_size: int = SUBSCRIBER_BUFFER, clock: Callable[[], float] = time.monotonic) -> None:
        self.retention_s = clamp_retention(retention_s)
        self.buffer_size = buffer_size
        self._clock = clock
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[float, bytes]] = collections.deque()
        self._subs: dict[str, list[Subscriber]] = {name: [] for name in CHANNELS}

    # --- subscribers --------------------------------------------------------
    def subscribe(self, channel: str, on_drop: Callable[[], None] | None = None) -> Subscriber:
        sub = Subscriber(channel, queue.Queue(self.buffer_size), on_drop)
        if channel == "usage":
            sub.buffer.put_nowait(SUPPORT_REFRESH)
        with self._lock:
            self._subs[channel].append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if sub in self._subs[sub.channel]:
                self._subs[sub.channel].remove(sub)
        try:
            sub.buffer.put_nowait(None)  # wakes the connection's writer so it can finish
        except queue.Full:
            pass

    def subscriber_count(self, channel: str = "usage") -> int:
        with self._lock:
            return len(self._subs[channel])

    def _push(self, channel: str, payload: bytes) -> int:
        """Deliver to every subscriber of `channel`; drop the ones whose buffer is full."""
        with self._lock:
            subs = list(self._subs[channel])
        delivered = 0
        for sub in subs:
            try:
                sub.buffer.put_nowait(payload)
                delivered += 1
            except queue.Full:
                self._drop(sub)
        return delivered

    def _drop(self, sub: Subscriber) -> None:
        with self._lock:
            if sub in self._subs[sub.channel]:
                self._subs[sub.channel].remove(sub)
        sub.dropped = True
        logger.warning("fakecpa: dropping a %s subscriber whose buffer is full", sub.channel)
        if sub.on_drop is not None:
            sub.on_drop()

    # --- enqueue / pop ------------------------------------------------------
    def enqueue(self, payload: bytes) -> str:
        """CPA's Enqueue: 'published' to subscribers when one exists, else 'queued'."""
        if self.subscriber_count("usage") > 0:
            self._push("usage", payload)
            return "published"
        now = self._clock()
        with self._lock:
            self._prune(now)
            self._items.append((now, payload))
        return "queued"

    def publish_error(self, payload: bytes) -> int:
        """The errors channel is subscribe-only: nothing is queued."""
        return self._push("errors", payload)

    def refresh(self) -> int:
        """`{"refresh":true}` goes to usage subscribers only, never into the queue."""
        return self._push("usage", REFRESH)

    def pop_oldest(self, count: int) -> list[bytes]:
        now = self._clock()
        with self._lock:
            self._prune(now)
            out = []
            while self._items and len(out) < count:
                out.append(self._items.popleft()[1])
            return out

    def __len__(self) -> int:
        with self._lock:
            self._prune(self._clock())
            return len(self._items)

    def _prune(self, now: float) -> None:
        cutoff = now - self.retention_s
        while self._items and self._items[0][0] < cutoff:
            self._items.popleft()


class BanList:
    """CPA's management login guard: N failures from one IP ban it for a while."""

    def __init__(self, ban_after: int = 5, ban_seconds: float = 1800,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ban_after = ban_after
        self.ban_seconds = ban_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}
        self.failures_total = 0

    def banned_message(self, ip: str) -> str | None:
        """The error text when `ip` is banned now, else None."""
        with self._lock:
            until = self._banned_until.get(ip)
            if until is None:
                return None
            remaining = until - self._clock()
            if remaining <= 0:
                del self._banned_until[ip]
                self._failures.pop(ip, None)
                return None
        return f"IP banned due to too many failed attempts. Try again in {go_duration(remaining)}"

    def fail(self, ip: str) -> None:
        with self._lock:
            self.failures_total += 1
            count = self._failures.get(ip, 0) + 1
            self._failures[ip] = count
            if count >= self.ban_after:
                self._banned_until[ip] = self._clock() + self.ban_seconds
                self._failures[ip] = 0

    def succeed(self, ip: str) -> None:
        with self._lock:
            self._failures.pop(ip, None)


def go_duration(seconds: float) -> str:
    """Render like Go's time.Duration.Round(time.Second).String(): 29m59s, 1h0m0s, 5s."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
