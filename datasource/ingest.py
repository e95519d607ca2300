"""One upstream's batches into the store: control payloads, account refresh, normalize, insert.

`Ingestor.usage(raws)` handles one popped/subscribed batch in one store transaction and
returns the InsertResult; `Ingestor.errors(raws)` stores `errors` channel events. Nothing here
talks to CPA except through the AccountDirectory's fetch callable.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from datasource import store, store_status
from datasource.store import Connection
from datasource.accounts import AccountDirectory, parse_credential_error
from datasource.model import Control, InsertResult, Normalized, Rejected
from datasource.parallel import AUTO_IDLE_S, NormalizePool, Pending, worker_plan

logger = logging.getLogger(__name__)


class Ingestor:
    def __init__(self, conn: Connection, instance: str, directory: AccountDirectory | None = None,
                 *, now: Callable[[], float] = time.time, normalize_workers: int | str = 0,
                 behind_items: int = 0, prices_file: str = "") -> None:
        """`normalize_workers` is CPA_MONITOR_NORMALIZE_WORKERS; with `auto`, the worker takes only
        batches of at least `behind_items` (parallel.backlog_items: the collector is behind its queue).
        `prices_file` is CPA_MONITOR_PRICES_FILE: the table events are priced with (empty: built in)."""
        self.conn = conn
        self.instance = instance
        self.directory = directory
        self._now = now
        workers, self.on_demand = worker_plan(normalize_workers)
        self.normalizer = NormalizePool(workers, instance, min_items=behind_items if self.on_demand else 0,
                                        prices_file=prices_file)
        store.raise_gc_threshold()
        self.refreshes = 0
        self.controls = 0

    def _now_ms(self) -> int:
        return int(self._now() * 1000)

    def pops_ahead(self, count: int) -> bool:
        """Whether the pipelined loop pops the next group before storing one of `count` items: always
        with a fixed number of workers, and with `auto` only for a group the worker takes."""
        return self.normalizer.workers > 0 and (not self.on_demand or self.normalizer.uses_worker(count))

    def release_idle_worker(self) -> None:
        """With `auto`, stop the worker once no group has needed it for AUTO_IDLE_S."""
        if self.on_demand and self.normalizer.release_idle(AUTO_IDLE_S):
            logger.info("%s: normalize worker stopped (no backlog for %.0f s)", self.instance, AUTO_IDLE_S)

    def usage(self, raws: Sequence[bytes]) -> InsertResult:
        """Normalize and store one batch (control payloads act, blank items are skipped)."""
        return self._store(self.normalizer.normalize_all(self._items(raws)))

    def prepare(self, raws: Sequence[bytes]) -> Pending:
        """Hand one popped batch to the normalize worker (if any) and return at once; store it
        with `usage_prepared` (the pipelined collector stores the previous batch meanwhile)."""
        return self.normalizer.submit(self._items(raws))

    def _items(self, raws: Sequence[bytes]) -> list[bytes]:
        """The batch without its blank items; with `auto`, says when the batch is about to start
        the worker (the collector is behind)."""
        items = [raw for raw in raws if raw and raw.strip()]
        if self.on_demand and not self.normalizer.running and self.normalizer.uses_worker(len(items)):
            logger.info("%s: starting a normalize worker: a group of %d items, the collector is behind its queue",
                        self.instance, len(items))
        return items

    def usage_prepared(self, pending: Pending) -> InsertResult:
        """Store a prepared batch, as `usage` would (the normalized items are kept for a retry)."""
        return self._store(pending.result())

    def _store(self, outcomes: Sequence[Normalized | Control | Rejected]) -> InsertResult:
        items: list[Normalized | Rejected] = []
        for out in outcomes:
            if isinstance(out, Control):
                self._control(out)
            else:
                items.append(out)
        if not items:
            return InsertResult()
        self._refresh_accounts()
        return store.insert_batch(self.conn, items, origin="collector", instance=self.instance)

    def close(self) -> None:
        """Stop the normalize worker, if any."""
        self.normalizer.close()

    def _control(self, control: Control) -> None:
        self.controls += 1
        if control.kind == "refresh":
            self.refreshes += 1
            if self.directory is not None:
                self.directory.invalidate()
            logger.info("%s: CPA credentials changed; auth-files cache cleared", self.instance)

    def _refresh_accounts(self) -> None:
        if self.directory is None or not self.directory.due():
            return
        rows = self.directory.fetch()
        if rows is not None:
            changes = store_status.upsert_accounts(self.conn, self.instance, rows, self._now_ms())
            logger.debug("%s: %d accounts stored, %d status changes", self.instance, len(rows), changes)

    def errors(self, raws: Sequence[bytes]) -> int:
        """Store credential error events; returns how many were stored."""
        stored = 0
        for raw in raws:
            parsed = parse_credential_error(raw, self.instance, self._now_ms())
            if parsed is None:
                logger.warning("%s: skipping an errors-channel payload that is not a JSON object", self.instance)
                continue
            row, body = parsed
            store_status.insert_credential_error(self.conn, row, body)
            stored += 1
        return stored
