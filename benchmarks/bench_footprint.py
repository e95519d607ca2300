"""Footprint: database bytes per event (per table and index) and the service's RSS.

    python3 -m benchmarks.bench_footprint --db /tmp/bench-1m.db
    python3 -m benchmarks.bench_footprint --db /tmp/bench-10m.db --columns 100000 --no-rss

Bytes come from SQLite's dbstat table (pages in use, after a WAL checkpoint). RSS is
read from /proc for the gunicorn `cpa-monitor serve` process tree, idle and after
one refresh of every dashboard at 30 d (benchmarks.bench_query's requests). `--columns N`
adds what each events column stores (in event_rows since schema step 12: labels as ids), in
bytes per row, over N consecutive rows from the middle of the file (integers at SQLite's record sizes, 0 and 1 free; text and BLOBs at their length; NULL
free), plus the record header (a type byte per column).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apsw

from benchmarks import bench_memory, bench_query
from datasource import interned


def table_bytes(db: str) -> tuple[int, list[tuple[str, int]], int]:
    """(events, [(table or index, bytes in its pages)] largest first, bytes of free pages)."""
    conn = apsw.Connection(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        sizes = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
        free = conn.execute("PRAGMA freelist_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    return events, [(name, size) for name, size in sizes], free


def _int_bytes(value: int) -> int:
    """Bytes SQLite's record format spends on an integer value (0 and 1 have their own types)."""
    if value in (0, 1):
        return 0
    magnitude = value if value >= 0 else -value - 1
    for limit, size in ((1 << 7, 1), (1 << 15, 2), (1 << 23, 3), (1 << 31, 4), (1 << 47, 6)):
        if magnitude < limit:
            return size
    return 8


def column_bytes(db: str, rows: int) -> tuple[int, float, list[tuple[str, float]]]:
    """(rows read, record header bytes per row, [(column, stored bytes per row)]) over `rows`
    events from the middle of the file."""
    conn = apsw.Connection(f"file:{db}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        table = interned.rows_table(conn)  # event_rows since schema step 12 (labels as ids)
        names = [row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (table,))]
        first = conn.execute(f"SELECT coalesce(max(id), 0) / 2 FROM {table}").fetchone()[0]
        totals = [0] * len(names)
        header = 0  # a type varint per column (two bytes for text or BLOBs of 57 bytes and more)
        seen = 0
        for seen, row in enumerate(conn.execute(f"SELECT * FROM {table} WHERE id > ? ORDER BY id LIMIT ?",
                                                (first, rows)), 1):
            for i, value in enumerate(row):
                header += 2 if isinstance(value, (str, bytes)) and len(value) >= 57 else 1
                if value is None:
                    continue
                if isinstance(value, int):
                    totals[i] += _int_bytes(value)
                elif isinstance(value, float):
                    totals[i] += 8
                elif isinstance(value, str):
                    totals[i] += len(value.encode())
                else:
                    totals[i] += len(value)
    finally:
        conn.close()
    columns = sorted(((name, total / max(seen, 1)) for name, total in zip(names, totals)), key=lambda item: -item[1])
    return seen, header / max(seen, 1) + 1, columns


def rss_kb(pid: int) -> int:
    """VmRSS of pid and all its descendants, in KiB."""
    return sum(bench_memory.status_kb(p) for p in (pid, *bench_memory.descendants(pid)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--columns", type=int, default=0, metavar="N",
                        help="also print the stored bytes per events column over N rows")
    parser.add_argument("--no-rss", action="store_true", help="skip starting the service")
    args = parser.parse_args(argv)
    events, sizes, free = table_bytes(args.db)
    file_bytes = os.path.getsize(args.db)
    used = sum(size for _, size in sizes)
    print(f"{args.db}: {events} events, file {file_bytes / 1e6:.1f} MB = {file_bytes / max(events, 1):.0f} bytes/event")
    print(f"  pages in use {used / 1e6:.1f} MB = {used / max(events, 1):.1f} bytes/event; "
          f"free pages {free / 1e6:.1f} MB (VACUUM returns them to the filesystem)")
    for name, size in sizes:
        if size >= file_bytes * 0.005:
            print(f"  {name:<32}{size / 1e6:9.1f} MB {size / max(events, 1):8.1f} bytes/event")
    rollups = sum(size for name, size in sizes if name.startswith("rollup_"))
    print(f"  {'(all rollup tables)':<32}{rollups / 1e6:9.1f} MB {rollups / max(events, 1):8.1f} bytes/event")
    if args.columns:
        read, header, columns = column_bytes(args.db, args.columns)
        body = sum(size for _, size in columns)
        print(f"events columns over {read} rows: {body:.1f} bytes of values per row "
              f"(the rowid among them) + {header:.1f} bytes of record header")
        for name, size in columns:
            if size >= 0.05:
                print(f"  {name:<32}{size:8.1f}")
    if args.no_rss:
        return 0
    last, account, model, trace = bench_query.busiest(args.db)
    port = bench_query.free_port()
    server = bench_query.start_server(args.db, port)
    try:
        idle = rss_kb(server.pid)
        with ThreadPoolExecutor(bench_query.CONCURRENCY) as pool:
            for path in sorted(glob.glob(str(bench_query.ROOT / "dashboards" / "*.json"))):
                dash = json.loads(Path(path).read_text())
                for _, values in bench_query.filter_states(dash, account, model, trace):
                    bodies = bench_query.panel_bodies(dash, last + 1 - bench_query.RANGES["30d"], last + 1, values)
                    bench_query.refresh(port, bodies, pool)
        busy = rss_kb(server.pid)
    finally:
        server.terminate()
        server.wait(15)
    print(f"service RSS (gunicorn master + worker): idle {idle / 1024:.0f} MB, "
          f"after 30 d refreshes {busy / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
