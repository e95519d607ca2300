"""Dataset generator: N CPA payloads over D days, as JSONL and/or a ready SQLite database.

    python3 -m benchmarks.generate --events 100000 --db /tmp/bench-100k.db --jsonl /tmp/bench-100k.jsonl
    python3 -m benchmarks.generate --events 1000000 --db /tmp/bench-1m.db
    python3 -m benchmarks.generate --events 10000000 --db /tmp/bench-10m.db --workers 2 \
        --rollup-every 50000 --batch 2000 --cache-mib 1024     # optional: ~30-50 min on 2 cores

The database is written through the real store path (normalize -> store.insert_batch,
which maintains the rollups), one transaction per batch; with --rollup-every the same
rollup.apply runs once per that many events instead of once per batch. Prints events/s
and the time spent per stage (JSON decode + normalize, raw insert + ledger, rollup.apply;
wall time, so with worker processes "normalize" is the wait for them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import Pool
from typing import Iterable, Iterator

from benchmarks.shape import payloads
from datasource import rollup, store, txn
from datasource.db import connect, open_database
from datasource.model import Control, Normalized, Rejected
from datasource.normalize import normalize

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
DEFAULT_END_MS = 1_777_593_600_000  # 2026-05-01T00:00:00Z: fixed, so datasets are reproducible


@dataclass
class StageTimes:
    """Seconds spent per stage of the insert path."""

    normalize_s: float = 0.0
    insert_s: float = 0.0  # store.insert_batch minus rollup.apply
    rollup_s: float = 0.0
    events: int = 0
    inserted: int = 0
    rollup_rows: int = 0
    wall_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def report(self, label: str) -> str:
        per = (lambda s: f"{s / self.events * 1e6:7.1f} us/event") if self.events else (lambda s: "-")
        lines = [
            f"{label}: {self.events} events ({self.inserted} inserted) in {self.wall_s:.2f} s "
            f"= {self.events / self.wall_s:,.0f} events/s" if self.wall_s else f"{label}: no time",
            f"  normalize (decode+normalize) {self.normalize_s:8.2f} s  {per(self.normalize_s)}",
            f"  insert (events+ledger+tx)    {self.insert_s:8.2f} s  {per(self.insert_s)}",
            f"  rollup.apply                 {self.rollup_s:8.2f} s  {per(self.rollup_s)}"
            f"  ({self.rollup_rows} rollup upserts)",
        ]
        lines += [f"  {k:<28} {v:8.2f} s  {per(v)}" for k, v in self.extra.items()]
        return "\n".join(lines)


class RollupTimer:
    """Wraps rollup.apply (which store.insert_batch calls) to time it; a context manager."""

    def __init__(self, times: StageTimes) -> None:
        self.times = times
        self._orig = rollup.apply

    def __enter__(self) -> "RollupTimer":
        def timed(conn, rows):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            n = self._orig(conn, rows)
            self.times.rollup_s += time.perf_counter() - t
            self.times.rollup_rows += n
            return n

        rollup.apply = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        rollup.apply = self._orig  # type: ignore[assignment]


def _normalize_chunk(raws: list[bytes]) -> list[Normalized | Rejected]:
    out = []
    for raw in raws:
        item = normalize(raw)
        if not isinstance(item, Control):
            out.append(item)
    return out


def _chunks(it: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    iterator = iter(it)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _apply_rollups(conn, rows: list) -> None:  # type: ignore[no-untyped-def]
    with txn.write(conn):
        rollup.apply(conn, rows)
    rows.clear()


def load(db_path: str, raws: Iterable[bytes], *, batch: int = 500, workers: int = 0,
         progress_every: int = 0, rollup_every: int = 0, cache_mib: int = 0) -> StageTimes:
    """Normalize and store `raws` through store.insert_batch; returns the stage times.

    With workers >= 1, normalization runs in a pool of that many processes, ahead of the
    inserts (dataset building; this process generates payloads and stores); with 0 it runs
    here, one stage after the other (bench_ingest --stages times the stages that way). With rollup_every > 0 the
    rollups are applied once per that many stored events (in their own transaction)
    instead of once per batch: the same rollup.apply on the same rows, so the same
    rollup rows, with far fewer upserts and sketch merges. cache_mib > 0 sets the
    connection's page cache (random b-tree inserts into a multi-GB file).
    """
    times = StageTimes()
    conn = open_database(db_path)
    if cache_mib > 0:
        conn.execute(f"PRAGMA cache_size = {-1024 * int(cache_mib)}")
    pool = Pool(workers) if workers >= 1 else None
    pending: list | None = [] if rollup_every > 0 else None
    start = time.perf_counter()
    try:
        with RollupTimer(times):
            chunks = _chunks(raws, batch)
            normalized: Iterator[list[Normalized | Rejected]]
            if pool is not None:
                normalized = pool.imap(_normalize_chunk, chunks, chunksize=4)
            else:
                normalized = map(_normalize_chunk, chunks)
            while True:
                t0 = time.perf_counter()
                items = next(normalized, None)
                t1 = time.perf_counter()
                if items is None:
                    break
                times.normalize_s += t1 - t0
                before = times.rollup_s
                result = store.insert_batch(conn, items, origin="benchmark", rollup_rows=pending)
                if pending is not None and len(pending) >= rollup_every:
                    _apply_rollups(conn, pending)
                times.insert_s += time.perf_counter() - t1 - (times.rollup_s - before)
                times.events += len(items)
                times.inserted += result.inserted
                if progress_every and times.events % progress_every < batch:
                    logger.info("%d events, %.0f/s", times.events, times.events / (time.perf_counter() - start))
            if pending:
                _apply_rollups(conn, pending)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    times.wall_s = time.perf_counter() - start
    return times


def analyze(db_path: str) -> int:
    """Give the file the planner statistics a file grown in service has: connect() runs `PRAGMA
    optimize=0x10002` at open, as every read-write open but the collector's does. A file built in
    one go has none, and the collector on a copy of it would spend its first minutes analyzing
    (docs/performance.md, "Planner statistics"). Returns the number of tables with statistics."""
    conn = connect(db_path)
    try:
        return conn.execute("SELECT count(DISTINCT tbl) FROM sqlite_stat1").fetchone()[0]
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--end-ms", type=int, default=DEFAULT_END_MS)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--db", help="SQLite database to create (must not exist)")
    parser.add_argument("--jsonl", help="JSON Lines file of raw CPA payloads to write")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1,
                        help="normalize in N processes ahead of the inserts (0: in this process)")
    parser.add_argument("--rollup-every", type=int, default=0,
                        help="apply rollups once per N stored events instead of per batch (same rollup rows)")
    parser.add_argument("--cache-mib", type=int, default=0, help="page cache of the building connection")
    parser.add_argument("--own-shape", action="store_true", help="benchmarks.shape even if datasource.traffic exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.db and not args.jsonl:
        parser.error("give --db and/or --jsonl")
    if args.db and os.path.exists(args.db):
        parser.error(f"{args.db} exists; remove it first")
    start_ms = args.end_ms - int(args.days * DAY_MS)

    def source() -> Iterator[bytes]:
        return payloads(args.events, start_ms, args.end_ms, seed=args.seed, own_shape=args.own_shape)

    if args.jsonl:
        t = time.perf_counter()
        with open(args.jsonl, "wb") as out:
            for raw in source():
                out.write(raw + b"\n")
        print(f"wrote {args.events} payloads to {args.jsonl} ({os.path.getsize(args.jsonl) / 1e6:.1f} MB) "
              f"in {time.perf_counter() - t:.1f} s")
    if args.db:
        if args.jsonl:
            def raws() -> Iterator[bytes]:
                with open(args.jsonl, "rb") as f:
                    yield from (line.rstrip(b"\n") for line in f)
            times = load(args.db, raws(), batch=args.batch, workers=args.workers, progress_every=100_000,
                         rollup_every=args.rollup_every, cache_mib=args.cache_mib)
        else:
            times = load(args.db, source(), batch=args.batch, workers=args.workers, progress_every=100_000,
                         rollup_every=args.rollup_every, cache_mib=args.cache_mib)
        t = time.perf_counter()
        analyzed = analyze(args.db)
        print(f"planner statistics: {analyzed} tables analyzed in {time.perf_counter() - t:.1f} s")
        size = os.path.getsize(args.db)
        print(times.report(f"store path into {args.db}"))
        print(f"database {size / 1e6:.1f} MB = {size / max(times.inserted, 1):.0f} bytes/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
