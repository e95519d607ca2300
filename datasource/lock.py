"""One collector per database: a non-blocking flock on `<db>.collector.lock`.

The holder writes who it is (pid, host, start time, command) into the lock file so a process
that does not get the lock can say who has it. The OS drops the lock when the holder dies, so
another process takes over on its next try.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def lock_path(db_path: str) -> str:
    return db_path + ".collector.lock"


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    host: str
    started_ms: int
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} host {self.host} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_ms / 1000))}"


class CollectorLock:
    """`try_acquire()` never blocks; `release()` is idempotent; `holder()` reads the file."""

    def __init__(self, db_path: str) -> None:
        self.path = lock_path(db_path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        self._write_holder(fd)
        logger.info("collector lock acquired: %s", self.path)
        return True

    def _write_holder(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started_ms": int(time.time() * 1000), "command": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8") + b"\n", 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        logger.info("collector lock released: %s", self.path)

    def holder(self) -> Holder | None:
        """Who holds (or last held) the lock, from the file; None when unknown."""
        return read_holder(self.path)


def read_holder(path: str) -> Holder | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data: Any = json.loads(fh.read() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        return Holder(int(data["pid"]), str(data["host"]), int(data["started_ms"]), str(data.get("command", "")))
    except (KeyError, TypeError, ValueError):
        return None


def is_locked(path: str) -> bool:
    """True when some process holds the lock right now (probes without keeping it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
