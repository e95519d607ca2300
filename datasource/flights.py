"""Single flight: a computation several threads ask for at the same moment runs once.

The first caller of a key computes; callers arriving while it runs wait for its result (or its
exception) instead of computing again. Nothing is kept once the computation ends, so a later
call computes afresh: this shares work, it is not a cache. A waiter that gives up (`wait_s`)
computes for itself.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Flight:
    """One running computation: its waiters block on `event`."""

    __slots__ = ("done", "event", "result", "error")

    def __init__(self) -> None:
        self.done = False
        self.event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Flights:
    def __init__(self) -> None:
        self.running: dict[Any, Flight] = {}
        self.flight: Callable[[], Flight] = Flight  # the record of a computation (tests count waiters)
        self._lock = threading.Lock()

    def run(self, key: Any, compute: Callable[[], T], wait_s: float) -> T:
        """compute(), or the result of the same key's computation already running in another thread."""
        with self._lock:
            flight = self.running.get(key)
            leader = flight is None
            if leader:
                flight = self.running[key] = self.flight()
        if not leader:
            flight.event.wait(wait_s)
            if flight.done:
                if flight.error is not None:
                    raise flight.error
                return flight.result
            return compute()
        try:
            flight.result = compute()
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self.running.pop(key, None)
            flight.done = True
            flight.event.set()
