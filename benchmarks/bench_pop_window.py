"""The popped-but-uncommitted window: what a SIGKILL of the collector can lose.

    python3 -m benchmarks.bench_pop_window --events 20000 --batches 1,10,100,500

CPA's pops (LPOP/RPOP usage N, GET usage-queue, a subscription push) remove items for good; there
is no acknowledgement, so the collector cannot commit first and acknowledge after. Between the
pop reply and the COMMIT of the batch transaction the items exist only in the process. This
script measures that window with the collector's own code path: a real redis-server queue
(CPA's pop surface), the UpstreamLoop's Ingestor (normalize, accounts, store.insert_batch) into
a fresh SQLite file, batch after batch from a full queue (the heaviest case: a backlog).

Printed per batch size: items at risk per batch, median/p95/max of pop-reply-to-commit time,
and the share of the loop's wall time during which a popped batch is uncommitted (the chance
that a SIGKILL at a random moment under a backlog loses a batch).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from benchmarks.bench_ingest import PASSWORD, start_queue
from benchmarks.generate import DAY_MS, DEFAULT_END_MS
from benchmarks.shape import payloads
from datasource.db import open_database
from datasource.ingest import Ingestor
from datasource.sources import RespConnection


def run(events: int, batch: int, workdir: str) -> dict[str, float]:
    server, port, client = start_queue(workdir)
    try:
        pipe = client.pipeline(transaction=False)
        for raw in payloads(events, DEFAULT_END_MS - DAY_MS, DEFAULT_END_MS):
            pipe.rpush("usage", raw)
        pipe.execute()
        conn = open_database(f"{workdir}/window-{batch}.db")
        ingestor = Ingestor(conn, "default")
        popper = RespConnection(f"http://127.0.0.1:{port}", PASSWORD).open()
        windows: list[float] = []
        started = time.perf_counter()
        while True:
            items = popper.pop(batch, "left")
            popped = time.perf_counter()
            if not items:
                break
            ingestor.usage(items)
            windows.append(time.perf_counter() - popped)
        wall = time.perf_counter() - started
        popper.close()
        conn.close()
    finally:
        server.kill()
        server.wait()
    ordered = sorted(windows)
    return {"batches": len(windows), "median_ms": statistics.median(ordered) * 1000,
            "p95_ms": ordered[int(0.95 * (len(ordered) - 1))] * 1000, "max_ms": ordered[-1] * 1000,
            "share": sum(windows) / wall, "events_s": events / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batches", default="1,10,100,500")
    args = parser.parse_args()
    print(f"{args.events} events per run from a full redis-server queue; window = pop reply -> COMMIT")
    print(f"{'batch':>6} {'at risk':>8} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'in window':>10} {'events/s':>9}")
    with tempfile.TemporaryDirectory(prefix="cpa-window-") as workdir:
        for batch in (int(b) for b in args.batches.split(",")):
            r = run(args.events, batch, workdir)
            print(f"{batch:>6} {batch:>8} {r['median_ms']:>10.2f} {r['p95_ms']:>8.2f} {r['max_ms']:>8.2f} "
                  f"{r['share'] * 100:>9.1f}% {r['events_s']:>9.0f}")


if __name__ == "__main__":
    main()
