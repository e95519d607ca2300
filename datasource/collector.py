"""CollectorService: exactly one collector per database, one loop per configured CPA upstream.

`start()` launches the daemon thread `datasource-collector`. It tries a non-blocking flock on
`<db>.collector.lock` every few seconds; while it holds the lock it runs one UpstreamLoop thread per
upstream and the daily retention prune; otherwise the process serves queries only (state
`standby`, with who holds the lock) and takes over when the holder dies. `stop()` lets every loop
finish its current batch, joins them and releases the lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

import apsw

from datasource import db, store, store_status
from datasource.config import Settings
from datasource.db import open_database
from datasource.lock import CollectorLock
from datasource.parallel import worker_plan
from datasource.pricing import Pricer
from datasource.upstream import MAX_RETENTION_S, ConfigRefused, Timing, UpstreamLoop, check_poll_interval

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
# SQLite's automatic checkpoint is PASSIVE: with readers overlapping all the time (dashboards
# refreshing) it never gets to reset the WAL, which then grows without bound (measured: 88 MB of
# WAL for a 17 MB database with two busy readers). Past this size the supervisor runs a TRUNCATE
# checkpoint, which waits (busy timeout) for the readers of old snapshots and resets the file.
WAL_TRUNCATE_BYTES = 16 * 1024 * 1024
# A supervisor error that repeats every tick (a read-only or full disk) is logged with its
# traceback once, then as one line at most this often, and once more when it clears.
REPEAT_LOG_S = 300.0
# Retention deletes this long per supervisor tick (then the tick's wait), until it has caught up:
# 5,000-event transactions of ~0.33 s on the 10 M file, so a first prune of millions of events
# leaves the WAL bound and a stop answered within a transaction.
PRUNE_TICK_S = 1.0
# Planner statistics: the collector's connections skip `PRAGMA optimize` at open, which ANALYZEs
# every stale table in one statement holding the write lock (21 s on a 10 M-event file without
# statistics: the store waited, then its busy timeout expired and it retried). The supervisor asks
# what optimize would refresh when it starts and every STATS_CHECK_S after, and ANALYZEs it one
# index at a time, at most STATS_TICK_S of them per tick (that file: 41 indexes and tables in
# 15.0 s, the longest 2.2 s).
STATS_CHECK_S = 6 * 3600.0
STATS_TICK_S = 0.5
STATS_LATER = (apsw.BusyError, apsw.FullError, apsw.ReadOnlyError)
MODES = ("auto", "subscribe", "http", "resp")


def validate(settings: Settings) -> None:
    """Refuse settings that cannot work whatever CPA says (raises ValueError / ConfigRefused)."""
    if settings.collector_mode not in MODES:
        raise ValueError(f"collector mode must be one of {', '.join(MODES)}, not {settings.collector_mode!r}")
    if settings.pop_side.lower() not in ("right", "left", "rpop", "lpop"):
        raise ValueError(f"pop side must be right or left, not {settings.pop_side!r}")
    worker_plan(settings.normalize_workers)
    if settings.prices_file:
        Pricer.from_file(settings.prices_file)  # PriceError (a ValueError) names the file and the entry
    if settings.batch_size <= 0 or settings.commit_max <= 0 or settings.poll_interval_ms <= 0:
        raise ValueError("batch size, commit max and poll interval must be positive")
    check_poll_interval(settings.poll_interval_ms, MAX_RETENTION_S)
    if not settings.upstreams():
        raise ValueError("no CPA upstream configured (CPA_MONITOR_CPA_URL)")


class CollectorService:
    def __init__(self, settings: Settings, *, now: Callable[[], float] = time.time,
                 timing: Timing = Timing()) -> None:
        self.settings = settings
        self.timing = timing
        self._now = now
        self._lock = CollectorLock(settings.db)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loops: list[tuple[UpstreamLoop, threading.Thread]] = []
        self._standby_logged = False
        self._last_error: str | None = None
        self._last_error_logged = 0.0
        self._next_prune_ms = 0
        self._prune_cutoff_ms: int | None = None  # set while a retention prune is under way
        self._pruned = 0
        self.wal_checkpoints = 0
        self._sidecar: store_status.StatusSidecar | None = None
        self._state_lock = threading.Lock()
        self._stale: list[str] | None = None  # indexes left to ANALYZE, while a refresh is under way
        self._next_stats_check = 0.0  # time.monotonic()
        self._analyzed = 0
        self.stats_refreshes = 0

    def start(self) -> None:
        """Non-blocking and idempotent; raises ValueError/ConfigRefused for unusable settings."""
        with self._state_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            validate(self.settings)
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="datasource-collector", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._state_lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            if thread is None:
                return
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("collector thread still running %.1f s after stop", timeout)

    def holds_lock(self) -> bool:
        return self._lock.held

    def loops(self) -> list[UpstreamLoop]:
        return [loop for loop, _ in self._loops]

    # --- thread body ------------------------------------------------------------
    def _run(self) -> None:
        conn = None
        try:
            while not self._stop.is_set():
                try:
                    conn = conn or open_database(self.settings.db, busy_timeout_ms=self.settings.busy_timeout_ms,
                                                 optimize=False)  # _statistics() instead
                    self._tick(conn)
                    self._error_cleared()
                except Exception as exc:  # never let the supervising thread die (a busy or missing database)
                    self._report_error(exc)
                self._stop.wait(self.timing.lock_retry_s)
        finally:
            self._stop_loops()
            self._lock.release()
            if conn is not None:
                conn.close()

    def _report_error(self, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if text != self._last_error:
            logger.exception("collector supervisor error")
        elif now - self._last_error_logged >= REPEAT_LOG_S:
            logger.warning("collector supervisor error persists: %s", text)
        else:
            return
        self._last_error, self._last_error_logged = text, now

    def _error_cleared(self) -> None:
        if self._last_error is not None:
            logger.info("collector supervisor recovered from: %s", self._last_error)
            self._last_error = None

    def _tick(self, conn: object) -> None:
        if not self._lock.held and self._lock.try_acquire():
            self._standby_logged = False
            self._start_loops()
        if not self._lock.held:
            self._standby(conn)
            return
        self._bound_wal(conn)
        now_ms = int(self._now() * 1000)
        if now_ms >= self._next_prune_ms:
            self._prune(conn, now_ms)
        self._statistics(conn)

    def _statistics(self, conn: apsw.Connection) -> None:
        """Stale planner statistics refreshed a few indexes per tick (see STATS_CHECK_S)."""
        now = time.monotonic()
        if self._stale is None:
            if now < self._next_stats_check:
                return
            try:
                self._stale, self._analyzed = db.stale_statistics(conn), 0  # its debugging mode locks too
            except STATS_LATER:
                return
            self._next_stats_check = now + STATS_CHECK_S
        deadline = now + STATS_TICK_S
        while self._stale and not self._stop.is_set():  # at least one index a tick
            try:
                db.analyze(conn, self._stale[0])
            except STATS_LATER:
                return  # the store kept the write lock past the busy timeout (or the disk is full or
                # read-only, which the store reports): the same index next tick
            except apsw.SQLError as exc:  # dropped since it was listed (a migration): nothing to analyze
                logger.debug("statistics: %s skipped: %s", self._stale[0], exc)
            self._stale.pop(0)
            self._analyzed += 1
            if time.monotonic() >= deadline:
                break
        if not self._stale:
            if self._analyzed:
                try:
                    db.mark_statistics(conn, int(self._now() * 1000))  # readers reopen (db.Readers)
                except STATS_LATER:
                    return  # marked at the next tick
                self.stats_refreshes += 1
                logger.info("statistics: %d stale indexes analyzed", self._analyzed)
            self._stale = None

    def _prune(self, conn: object, now_ms: int) -> None:
        """The daily retention job, PRUNE_TICK_S of it per tick until it has caught up."""
        if self._prune_cutoff_ms is None:
            self._prune_cutoff_ms, self._pruned = now_ms - self.settings.retention_days * DAY_MS, 0
        deleted, done = store.prune_step(conn, self._prune_cutoff_ms, budget_s=PRUNE_TICK_S, stop=self._stop.is_set)
        self._pruned += deleted
        if done:
            logger.info("retention: pruned %d events older than %d days", self._pruned, self.settings.retention_days)
            self._next_prune_ms, self._prune_cutoff_ms = now_ms + DAY_MS, None

    def _bound_wal(self, conn: object) -> None:
        try:
            size = os.path.getsize(self.settings.db + "-wal")
        except OSError:
            return
        if size < WAL_TRUNCATE_BYTES:
            return
        busy, log, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()  # type: ignore[attr-defined]
        self.wal_checkpoints += 1
        if busy:
            logger.warning("WAL checkpoint: %d MB of WAL, %d of %d frames copied; readers kept it busy",
                           size >> 20, done, log)
        else:
            logger.info("WAL checkpoint: %d MB of WAL copied and truncated", size >> 20)

    def _holder_text(self) -> str:
        return f"pid {os.getpid()} host {socket.gethostname()}"

    def _start_loops(self) -> None:
        self._sidecar = store_status.StatusSidecar(self.settings.db)
        for name, url in self.settings.upstreams():
            loop = UpstreamLoop(self.settings, name, url, self._stop, timing=self.timing, now=self._now,
                                holder=self._holder_text(), sidecar=self._sidecar)
            thread = threading.Thread(target=loop.run, name=f"datasource-collector-{name}", daemon=True)
            thread.start()
            self._loops.append((loop, thread))

    def _stop_loops(self) -> None:
        for loop, thread in self._loops:
            thread.join(self.timing.read_timeout_s + 30)
            if thread.is_alive():
                logger.warning("collector loop %s did not stop", loop.name)
        self._loops = []

    def _standby(self, conn: object) -> None:
        holder = self._lock.holder()
        who = holder.describe() if holder else "an unknown process"
        warning = f"another collector holds {self._lock.path}: {who}"
        if not self._standby_logged:
            logger.warning("%s; this process serves queries only and takes over if it stops", warning)
            self._standby_logged = True
        for name, url in self.settings.upstreams():
            store_status.write_standby(conn, name, url, warning, int(self._now() * 1000))


__all__ = ["CollectorService", "ConfigRefused", "Timing", "validate"]
