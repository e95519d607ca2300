"""Footprint: database bytes per event (per table and index) and the service's RSS.

    python3 -m benchmarks.bench_footprint --db /tmp/bench-1m.db

Bytes come from SQLite's dbstat table (pages in use, after a WAL checkpoint). RSS is
read from /proc for the gunicorn `cpa-monitor serve` process tree, idle and after
one refresh of every dashboard at 30 d (benchmarks.bench_query's requests).
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

from benchmarks import bench_query


def table_bytes(db: str) -> tuple[int, list[tuple[str, int]]]:
    conn = apsw.Connection(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        sizes = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
    finally:
        conn.close()
    return events, [(name, size) for name, size in sizes]


def rss_kb(pid: int) -> int:
    """VmRSS of pid and all its descendants, in KiB."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        pids.extend(int(c) for c in children)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    events, sizes = table_bytes(args.db)
    file_bytes = os.path.getsize(args.db)
    print(f"{args.db}: {events} events, file {file_bytes / 1e6:.1f} MB = {file_bytes / max(events, 1):.0f} bytes/event")
    for name, size in sizes:
        if size >= file_bytes * 0.005:
            print(f"  {name:<32}{size / 1e6:9.1f} MB {size / max(events, 1):8.1f} bytes/event")
    rollups = sum(size for name, size in sizes if name.startswith("rollup_"))
    print(f"  {'(all rollup tables)':<32}{rollups / 1e6:9.1f} MB {rollups / max(events, 1):8.1f} bytes/event")
    last, account, model = bench_query.busiest(args.db)
    port = bench_query.free_port()
    server = bench_query.start_server(args.db, port)
    try:
        idle = rss_kb(server.pid)
        with ThreadPoolExecutor(bench_query.CONCURRENCY) as pool:
            for path in sorted(glob.glob(str(bench_query.ROOT / "dashboards" / "*.json"))):
                dash = json.loads(Path(path).read_text())
                for acc, mod in ((None, None), (account, model)):
                    bodies = bench_query.panel_bodies(dash, last + 1 - bench_query.RANGES["30d"], last + 1, acc, mod)
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
