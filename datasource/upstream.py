"""The collector loop for one CPA upstream: pick a transport, consume, store, report, back off.

Modes: `subscribe` (SUBSCRIBE usage, then drain the queue with pops on a second connection, PING
keep-alive, periodic re-drain), `http` (GET usage-queue), `resp` (RPOP/LPOP usage N) and `auto`:
subscribe; if CPA refuses the subscription, HTTP; if HTTP is unsupported, RESP pops. A transport
that has worked is kept. Connection errors back off 1 s doubling to 30 s; an authentication error
(wrong key or banned IP) backs off for minutes and never falls back, so it costs one failed login
per try. Every state change is written to collector_status; outages become collector_episodes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from datasource import store, store_status
from datasource.accounts import AccountDirectory
from datasource.config import Settings
from datasource.db import open_database
from datasource.ingest import Ingestor
from datasource.model import InsertResult, Rejected
from datasource.parallel import Pending, backlog_items
from datasource.sources import (ERRORS, USAGE, AuthError, BadReply, HttpManagement, Message, RespConnection,
                                RespSubscriber, SourceError, Unsupported)
from datasource.store_status import StatusRow

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 60
MAX_RETENTION_S = 3600


@dataclass(frozen=True)
class Timing:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    auth_backoff_s: float = 300.0
    keepalive_s: float = 30.0
    read_timeout_s: float = 1.0
    drain_interval_s: float = 5.0
    lock_retry_s: float = 3.0
    connect_timeout_s: float = 10.0


# Messages the subscription reader may hold in memory ahead of the store (~1-2 KB each). Past it,
# the reader stops reading and CPA drops the subscription once its own 256-message buffer is full.
SUBSCRIPTION_BACKLOG = 20_000


class SubscriptionReader(threading.Thread):
    """Reads a `usage` subscription on its own thread, so the socket keeps being read while the
    store is slow (a TRUNCATE checkpoint waiting for readers, a busy or full database).

    CPA drops a subscriber 256 messages behind, and what it had pushed to that subscriber is lost.
    Reading from the same thread that stores let a 3 s writer stall at 500 events/s cost a drop.
    The reader also sends the keep-alive PINGs, so only this thread touches the connection.
    `take()` hands messages over in arrival order; once the connection fails, it raises that error
    after every message read before it has been taken.
    """

    def __init__(self, sub: RespSubscriber, timing: "Timing", batch_size: int, limit: int | None = None) -> None:
        super().__init__(name="datasource-collector-subscription", daemon=True)
        self.sub, self.timing, self.batch_size = sub, timing, batch_size
        self.limit = limit or SUBSCRIPTION_BACKLOG
        self.pings = 0
        self.high_water = 0
        self._items: collections.deque[Message] = collections.deque()
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._error: SourceError | None = None

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                with self._cond:
                    full = len(self._items) >= self.limit
                if full:  # the store is far behind: stop reading (CPA will drop us) rather than grow
                    self._halt.wait(self.timing.read_timeout_s)
                else:
                    messages = self.sub.read(self.timing.read_timeout_s, self.batch_size)
                    if messages:
                        with self._cond:
                            self._items.extend(messages)
                            self.high_water = max(self.high_water, len(self._items))
                            self._cond.notify_all()
                if time.monotonic() - self.sub.last_ping >= self.timing.keepalive_s:
                    self.sub.ping()
                    self.pings += 1
        except SourceError as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        except Exception as exc:  # never leave take() waiting on a dead thread
            with self._cond:
                self._error = SourceError("consume", f"{exc.__class__.__name__}: {exc}")
                self._cond.notify_all()

    def take(self, timeout_s: float, max_items: int) -> list[Message]:
        """Up to `max_items` messages, waiting up to `timeout_s` for the first; raises the
        connection's error once nothing read before it is left."""
        with self._cond:
            if not self._items and self._error is None:
                self._cond.wait(timeout_s)
            if self._items:
                count = min(max_items, len(self._items))
                return [self._items.popleft() for _ in range(count)]
            if self._error is not None:
                raise self._error
            return []

    def halt(self) -> list[Message]:
        """Stop reading; the messages read and not yet taken."""
        self._halt.set()
        self.join(self.timing.read_timeout_s + self.timing.connect_timeout_s)
        with self._cond:
            rest, self._items = list(self._items), collections.deque()
        return rest


class ConfigRefused(Exception):
    """The configuration cannot work against this CPA (poll interval >= queue retention)."""


def retention_from_config(config: dict) -> int:
    """CPA's rule: missing or <= 0 -> 60 s; at most 3600 s."""
    value = config.get("redis-usage-queue-retention-seconds")
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        return DEFAULT_RETENTION_S
    return DEFAULT_RETENTION_S if seconds <= 0 else min(seconds, MAX_RETENTION_S)


def check_poll_interval(poll_interval_ms: int, retention_s: int) -> None:
    if poll_interval_ms >= retention_s * 1000:
        raise ConfigRefused(f"poll interval {poll_interval_ms} ms is not shorter than CPA's queue retention "
                            f"{retention_s} s: events would expire before they are read")


class UpstreamLoop:
    """Runs in its own thread until `stop` is set; owns its write connection."""

    def __init__(self, settings: Settings, name: str, url: str, stop: threading.Event, *,
                 timing: Timing = Timing(), now: Callable[[], float] = time.time, holder: str = "",
                 sidecar: store_status.StatusSidecar | None = None) -> None:
        self.settings, self.name, self.url, self.stop, self.timing, self._now = settings, name, url, stop, timing, now
        self.status = StatusRow(instance=name, url=url, mode=settings.collector_mode, holder=holder)
        self.transport = "subscribe" if settings.collector_mode in ("auto", "subscribe") else settings.collector_mode
        self.established = False
        self.backoff_s = timing.backoff_initial_s
        self.down_since_ms: int | None = None
        self.error_episode: int | None = None
        self.conn = None
        self.ingestor: Ingestor | None = None
        self.pings = 0
        self.reader: SubscriptionReader | None = None  # the current subscription's reader thread
        self.store_down_since_ms: int | None = None
        self.store_episode: int | None = None
        self.store_retries = 0
        self.live = False
        self.sidecar = sidecar

    # --- plumbing -------------------------------------------------------------
    def now_ms(self) -> int:
        return int(self._now() * 1000)

    def key(self) -> str:
        return self.settings.management_key()

    def http(self, timeout_s: float = 30.0) -> HttpManagement:
        return HttpManagement(self.url, self.key(), timeout_s=timeout_s)

    def best_effort(self, write: Callable[..., Any], *args: Any) -> Any:
        """A status/episode write that a full or read-only database must not turn into a crash."""
        try:
            return write(*args)
        except store.StoreError as exc:
            logger.warning("%s: cannot record %s (%s)", self.name, write.__name__, exc)
            return None

    def save(self, **changes: object) -> None:
        for field_name, value in changes.items():
            setattr(self.status, field_name, value)
        self.status.updated_ms = self.now_ms()
        try:  # a full or read-only database must not stop the loop: the row goes to the sidecar file
            store_status.write_status(self.conn, self.status)
        except store.StoreError as exc:
            kept = self.sidecar is not None and self.sidecar.put(self.status)
            logger.warning("%s: cannot write the collector status (%s)%s; state %s, last error %s", self.name,
                           exc, f", kept in {self.sidecar.path}" if kept and self.sidecar else "",
                           self.status.state, self.status.last_error)
            return
        if self.sidecar is not None:
            self.sidecar.clear(self.name)

    # --- thread body ------------------------------------------------------------
    def open_store(self) -> bool:
        """The loop's write connection; a busy database (a concurrent migrate or prune) is retried."""
        while not self.stop.is_set():
            try:
                self.conn = open_database(self.settings.db, busy_timeout_ms=self.settings.busy_timeout_ms,
                                          optimize=False)  # the supervisor refreshes statistics
                return True
            except Exception as exc:
                logger.warning("%s: cannot open the database yet (%s); retrying", self.name, exc)
                self.wait_backoff()
        return False

    def run(self) -> None:
        if not self.open_store():
            return
        directory = AccountDirectory(lambda: self.http(5.0).auth_files(), self.settings.auth_files_ttl_s,
                                     mask_emails=self.settings.mask_emails, now=self._now)
        self.ingestor = Ingestor(self.conn, self.name, directory, now=self._now,
                                 normalize_workers=self.settings.normalize_workers,
                                 behind_items=backlog_items(self.settings.batch_size, self.settings.commit_max),
                                 prices_file=self.settings.prices_file)
        totals = store_status.read_totals(self.conn, self.name)
        self.status.inserted, self.status.duplicates, self.status.dead_letters = totals
        self.save(state="starting", started_ms=self.now_ms())
        try:
            while not self.stop.is_set():
                if not self.attempt():
                    break
        finally:
            self.save(state="stopped" if self.stop.is_set() else self.status.state)
            self.ingestor.close()
            self.conn.close()

    def attempt(self) -> bool:
        """One session on the current transport; False when this upstream must stop for good."""
        try:
            {"subscribe": self.subscribe_session, "http": self.http_session, "resp": self.resp_session}[self.transport]()
            return True
        except ConfigRefused as exc:
            logger.error("%s: %s", self.name, exc)
            self.failed("connect", str(exc))
            return False
        except AuthError as exc:
            self.failed("auth", str(exc))
            self.stop.wait(self.timing.auth_backoff_s)
        except SourceError as exc:
            if self.fall_back(exc):
                return True
            self.failed(exc.stage, str(exc))
            self.wait_backoff()
        except Exception as exc:  # the loop never dies: a store or parse bug is reported and retried
            logger.exception("%s: collector error", self.name)
            self.failed("consume", f"{exc.__class__.__name__}: {exc}")
            self.wait_backoff()
        return True

    def fall_back(self, exc: SourceError) -> bool:
        if self.settings.collector_mode != "auto" or self.established:
            return False
        if self.transport == "subscribe" and (isinstance(exc, Unsupported) or exc.stage == "subscribe"):
            self.transport = "http"
        elif self.transport == "http" and isinstance(exc, Unsupported):
            self.transport = "resp"
        else:
            return False
        logger.info("%s: %s; auto mode falls back to %s", self.name, exc, self.transport)
        return True

    def wait_backoff(self) -> None:
        self.stop.wait(self.backoff_s)
        self.backoff_s = min(self.backoff_s * 2, self.timing.backoff_max_s)

    # --- state reports ---------------------------------------------------------
    def failed(self, stage: str, message: str) -> None:
        now = self.now_ms()
        was_up, self.live = self.live, False  # a session was consuming (even while the store refused a batch)
        if self.down_since_ms is None:
            self.down_since_ms = now
        kind = "dropped_subscription" if was_up and self.transport == "subscribe" else "error"
        if self.error_episode is None:
            self.error_episode = self.best_effort(store_status.open_episode, self.conn, self.name, kind, now,
                                                  f"{stage}: {message}")
        logger.warning("%s: %s error: %s", self.name, stage, message)
        self.save(state="error", last_error=message, last_error_stage=stage, last_error_ms=now)

    def connected(self) -> None:
        now = self.now_ms()
        self.established = True
        self.live = True
        self.backoff_s = self.timing.backoff_initial_s
        if self.error_episode is not None:
            self.best_effort(store_status.close_episode, self.conn, self.error_episode, now)
            self.error_episode = None
        if self.down_since_ms is not None:
            down_s = (now - self.down_since_ms) / 1000
            self.best_effort(store_status.add_episode, self.conn, self.name, "reconnect", now, now,
                             f"{self.transport} after {down_s:.1f} s")
            retention = self.status.queue_retention_s or DEFAULT_RETENTION_S
            if down_s >= retention:
                self.best_effort(store_status.add_episode, self.conn, self.name, "gap", self.down_since_ms, now,
                                 f"no connection for {down_s:.0f} s; CPA keeps events {retention} s")
            self.down_since_ms = None
        self.read_config()
        self.save(state="running", transport=self.transport)
        logger.info("%s: consuming via %s", self.name, self.transport)

    def read_config(self) -> None:
        """CPA's config when the management API allows it: publishing flag and queue retention."""
        warnings = [w for w in self.status.warnings if not w.startswith("CPA usage publishing")]
        try:
            config = self.http(5.0).config()
        except SourceError as exc:
            logger.info("%s: CPA config not readable (%s); publishing state unknown", self.name, exc)
            self.status.warnings = warnings
            return
        retention = retention_from_config(config)
        self.status.queue_retention_s = retention
        publishing = config.get("usage-statistics-enabled")
        self.status.usage_publishing = None if publishing is None else bool(publishing)
        if publishing is False:
            warnings.append("CPA usage publishing is off (usage-statistics-enabled: false): no events arrive")
        self.status.warnings = warnings
        check_poll_interval(self.settings.poll_interval_ms, retention)

    def record(self, result: InsertResult, consumed: int) -> None:
        now = self.now_ms()
        if consumed:
            self.status.last_consumed_ms = now
        if result.inserted + result.duplicates + result.dead_letters:
            self.status.last_inserted_ms = now
            self.status.inserted += result.inserted
            self.status.duplicates += result.duplicates
            self.status.dead_letters += result.dead_letters
        if consumed:
            self.save()

    def consume(self, raws: list[bytes]) -> int:
        ingestor = self.ingestor
        assert ingestor is not None
        self.record(self.store_held(lambda: ingestor.usage(raws), len(raws)), len(raws))
        return len(raws)

    def pump(self, pop: Callable[[], list[bytes]], *, drain: bool) -> int:
        """Pop and store groups until an empty pop (drain: a short one) or stop; returns the items.

        A group is one pop, or under a backlog several consecutive full pops stored together in
        one transaction of up to CPA_MONITOR_COMMIT_MAX items (`take`): bigger transactions fold
        more events into each rollup row, which is where a backlog's time goes.
        With a normalize worker (CPA_MONITOR_NORMALIZE_WORKERS >= 1, or `auto`) the loop is
        pipelined: group N+1 is popped and handed to the worker before group N is stored, so the
        worker normalizes while this thread writes, and up to two popped groups are in memory
        (docs/collector.md). With `auto` only a group that shows a backlog (`backlog_items`: full pops
        up to the transaction cap) goes to the worker and has the next group popped ahead of its
        store; a smaller one is normalized and stored here before the next pop, as with no worker.
        The worker starts with the first such group and stops after AUTO_IDLE_S without one.
        Each group is still stored whole, in pop order, in one transaction; the group in hand is
        stored before returning, whatever ends the loop (stop, an empty pop, a pop that raised).
        """
        ingestor = self.ingestor
        assert ingestor is not None
        ingestor.release_idle_worker()
        total = 0
        pending: tuple[Pending, int] | None = None
        workers = ingestor.normalizer.workers > 0
        try:
            while not self.stop.is_set():
                raws, last, error = self.take(pop)
                if not workers:
                    self.consume(raws)
                else:
                    ahead = (ingestor.prepare(raws), len(raws)) if raws else None  # the worker starts on it now
                    current, pending = pending, ahead  # a store that raises leaves only `ahead` to the finally
                    if current is not None:
                        self.store_pending(*current)
                    if pending is not None and not ingestor.pops_ahead(len(raws)):  # `auto`, not behind:
                        current, pending = pending, None  # stored now, nothing is popped ahead of it
                        self.store_pending(*current)
                total += len(raws)
                if error is not None:
                    raise error
                if last == 0 or (drain and last < self.settings.batch_size):
                    break
        finally:
            if pending is not None:
                self.store_pending(*pending)
        return total

    def take(self, pop: Callable[[], list[bytes]]) -> tuple[list[bytes], int, Exception | None]:
        """One store group: pops until one comes back short (the queue is drained), the next would
        pass CPA_MONITOR_COMMIT_MAX items, or stop. Returns (items, length of the last pop, the
        error a later pop raised): items already popped are returned, to be stored, not dropped."""
        batch, limit = self.settings.batch_size, self.settings.commit_max
        group: list[bytes] = []
        while True:
            try:
                got = pop()
            except Exception as exc:
                if not group:
                    raise
                return group, 0, exc
            group.extend(got)
            if len(got) < batch or len(group) + batch > limit or self.stop.is_set():
                return group, len(got), None

    def store_pending(self, prepared: Pending, popped: int) -> None:
        ingestor = self.ingestor
        assert ingestor is not None
        self.record(self.store_held(lambda: ingestor.usage_prepared(prepared), popped), popped)

    def store_held(self, write: Callable[[], InsertResult], held: int) -> InsertResult:
        """Run `write` (one batch transaction) until it commits. CPA's pops are destructive, so
        a popped batch that the store refuses (disk full, read-only, locked past the busy
        timeout) stays in memory and is retried with backoff; the transaction rolled back, so
        a retry cannot store anything twice. Only stopping gives up, after one last try."""
        last_try = False
        while True:
            try:
                result = write()
            except store.StoreError as exc:
                if last_try:
                    logger.error("%s: stopping with %d popped items not stored: %s", self.name, held, exc)
                    raise
                self.store_failed(exc, held)
                self.wait_backoff()
                last_try = self.stop.is_set()
                continue
            if self.store_down_since_ms is not None:
                self.store_recovered(held)
            return result

    def store_failed(self, exc: Exception, held: int) -> None:
        now = self.now_ms()
        self.store_retries += 1
        message = f"{exc.__class__.__name__}: {exc}; holding {held} popped items, retrying"
        if self.store_down_since_ms is None:
            self.store_down_since_ms = now
            # None when even this write fails: the episode is then written whole once the store is back
            self.store_episode = self.best_effort(store_status.open_episode, self.conn, self.name, "error", now,
                                                  f"store: {message}")
        logger.warning("%s: store error: %s", self.name, message)
        self.save(state="error", last_error=message, last_error_stage="store", last_error_ms=now)

    def store_recovered(self, held: int) -> None:
        now, since = self.now_ms(), self.store_down_since_ms or self.now_ms()
        if self.store_episode is not None:
            self.best_effort(store_status.close_episode, self.conn, self.store_episode, now)
        else:
            self.best_effort(store_status.add_episode, self.conn, self.name, "error", since, now,
                             f"store: {self.status.last_error or 'store refused writes'}")
        self.store_down_since_ms, self.store_episode = None, None
        self.backoff_s = self.timing.backoff_initial_s
        logger.info("%s: store writable again after %.1f s; %d held items stored", self.name,
                    (now - since) / 1000, held)
        self.save(state="running")

    def http_pop(self, client: HttpManagement) -> list[bytes]:
        """One usage-queue pop; a reply that is not a JSON array is kept as a dead letter, then raised."""
        try:
            return client.usage_queue(self.settings.batch_size)
        except BadReply as exc:
            bad = [Rejected(exc.reason, exc.body)]
            self.record(self.store_held(lambda: store.insert_batch(self.conn, bad, origin="collector",
                                                                   instance=self.name), 1), 1)
            raise

    # --- transports ------------------------------------------------------------
    def resp_session(self) -> None:
        popper = RespConnection(self.url, self.key(), timeout_s=self.timing.connect_timeout_s).open()
        try:
            self.connected()
            while not self.stop.is_set():
                self.pump(lambda: popper.pop(self.settings.batch_size, self.settings.pop_side), drain=False)
                self.stop.wait(self.settings.poll_interval_ms / 1000)  # the queue was empty
        finally:
            popper.close()

    def http_session(self) -> None:
        client = self.http()
        first = self.http_pop(client)
        self.connected()
        self.consume(first)
        while not self.stop.is_set():
            self.pump(lambda: self.http_pop(client), drain=False)
            self.stop.wait(self.settings.poll_interval_ms / 1000)  # the queue was empty

    def drain(self, popper: RespConnection) -> int:
        return self.pump(lambda: popper.pop(self.settings.batch_size, self.settings.pop_side), drain=True)

    def subscribe_session(self) -> None:
        t = self.timing
        sub = RespSubscriber(self.url, self.key(), USAGE, timeout_s=t.connect_timeout_s).open()
        popper = errsub = None
        try:
            popper = RespConnection(self.url, self.key(), timeout_s=t.connect_timeout_s).open()
            errsub = self.open_errors()
            self.connected()
            self.drain(popper)
            self.subscribed(sub, popper, errsub)
        finally:
            for conn in (sub, popper, errsub):
                if conn is not None:
                    conn.close()

    def open_errors(self) -> RespSubscriber | None:
        try:
            return RespSubscriber(self.url, self.key(), ERRORS, timeout_s=self.timing.connect_timeout_s).open()
        except AuthError:
            raise
        except SourceError as exc:
            logger.warning("%s: no errors-channel subscription (%s)", self.name, exc)
            return None

    def subscribed(self, sub: RespSubscriber, popper: RespConnection, errsub: RespSubscriber | None) -> None:
        t = self.timing
        last_drain = time.monotonic()
        reader = SubscriptionReader(sub, t, self.settings.batch_size)
        self.reader = reader
        reader.start()
        pings = 0
        try:
            while not self.stop.is_set():
                # what piled up while the last group was stored goes in one transaction (as pump's groups)
                messages = reader.take(t.read_timeout_s, max(self.settings.batch_size, self.settings.commit_max))
                if messages:
                    self.consume([m.payload for m in messages])
                if errsub is not None:
                    errors = errsub.read(0.0, self.settings.batch_size)
                    if errors and self.ingestor is not None:
                        self.ingestor.errors([m.payload for m in errors])
                    if time.monotonic() - errsub.last_ping >= t.keepalive_s:
                        errsub.ping()
                if reader.pings != pings:
                    self.pings += reader.pings - pings
                    pings = reader.pings
                if time.monotonic() - last_drain >= t.drain_interval_s:
                    self.drain(popper)  # items a dropped or racing subscriber left in the queue
                    last_drain = time.monotonic()
        finally:
            rest = reader.halt()
            if rest:  # pushed to us only: CPA holds no other copy
                try:
                    self.consume([m.payload for m in rest])
                except Exception:  # already ending with an error; do not hide it
                    logger.exception("%s: %d subscription messages read but not stored", self.name, len(rest))
