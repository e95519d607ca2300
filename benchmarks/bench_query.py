"""Dashboard refresh times over HTTP against a gunicorn `cpa-monitor serve` on a dataset.

    python3 -m benchmarks.generate --events 100000 --db /tmp/bench-100k.db
    python3 -m benchmarks.bench_query --db /tmp/bench-100k.db --runs 7

For every dashboards/*.json, every range (1h, 24h, 7d, 30d ending at the dataset's last
event) and each filter state (all; one account + one model, the busiest pair; and on the
dashboards with a trace id box, the request id of an event half an hour before the end), the
panels' /query bodies are built the way Grafana sends them (tests/grafana_sim.py) and
posted concurrently (6 connections, like a browser). A refresh is the wall time until
every panel has answered. Prints median and p95 refresh per case and the slowest panel.

With --alone, each case also times every panel on its own (one request at a time, --runs
times, median), which is the per-panel figure without the other five requests competing for the
same two cores, and prints the three slowest.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apsw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import grafana_sim  # noqa: E402

RANGES = {"1h": 3_600_000, "24h": 86_400_000, "7d": 7 * 86_400_000, "30d": 30 * 86_400_000}
CONCURRENCY = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db: str, port: int, threads: int = 8) -> subprocess.Popen[bytes]:
    """`python -m datasource serve` (gunicorn, collector off); returns once GET / answers."""
    env = dict(os.environ, CPA_MONITOR_DB=db, CPA_MONITOR_BIND=f"127.0.0.1:{port}", CPA_MONITOR_COLLECTOR="off",
               CPA_MONITOR_THREADS=str(threads), CPA_MONITOR_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "datasource", "serve"], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("cpa-monitor serve did not answer within 30 s")


def post(port: int, route: str, body: dict[str, Any]) -> tuple[float, int]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=data,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return time.perf_counter() - start, status


def busiest(db: str) -> tuple[int, str, str, str]:
    """(last event ms, busiest account_key, its busiest model, a request id 30 min before the end)."""
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        last = conn.execute("SELECT max(ts_ms) FROM events").fetchone()[0]
        account, model = conn.execute(
            "SELECT account_key, analytics_model FROM rollup_account_day "
            "GROUP BY 1, 2 ORDER BY sum(requests) DESC LIMIT 1").fetchone()
        trace = conn.execute("SELECT request_id FROM events WHERE ts_ms <= ? AND request_id IS NOT NULL "
                             "ORDER BY ts_ms DESC LIMIT 1", (last - 30 * 60_000,)).fetchone()[0]
    finally:
        conn.close()
    return last, account, model, trace


def filter_states(dash: dict[str, Any], account: str, model: str, trace: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, variable values) per filter state; the trace state where the dashboard has the box."""
    states = [("all", {}), ("acct+mdl", {"account": [account], "model": [model]})]
    names = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    if "trace_id" in names:
        states.append(("trace", {"trace_id": trace}))
    return states


def panel_bodies(dash: dict[str, Any], from_ms: int, to_ms: int,
                 values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    state = grafana_sim.state_from_dashboard(dash, from_ms, to_ms)
    for name, value in values.items():
        if name in state.variables:
            state.variables[name].value = value
    out = []
    for panel in dash.get("panels", []):
        if panel.get("targets"):
            out.append((panel.get("title", str(panel["id"])), grafana_sim.query_body(dash, panel, state)))
    return out


def refresh(port: int, bodies: list[tuple[str, dict[str, Any]]],
            pool: ThreadPoolExecutor) -> tuple[float, list[tuple[float, str, int]]]:
    start = time.perf_counter()
    results = list(pool.map(lambda tb: (*post(port, "/query", tb[1]), tb[0]), bodies))
    wall = time.perf_counter() - start
    return wall, [(t, title, status) for t, status, title in results]


def panels_alone(port: int, bodies: list[tuple[str, dict[str, Any]]], runs: int) -> list[tuple[float, str, int]]:
    """(median ms, title, worst status) per panel posted on its own, slowest first."""
    out = []
    for title, body in bodies:
        times, worst = [], 200
        for _ in range(runs):
            seconds, status = post(port, "/query", body)
            times.append(seconds)
            worst = status if status != 200 else worst
        out.append((statistics.median(times) * 1e3, title, worst))
    return sorted(out, key=lambda item: -item[0])


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dashboards", default=str(ROOT / "dashboards" / "*.json"))
    parser.add_argument("--alone", action="store_true", help="also time each panel alone (median of --runs)")
    parser.add_argument("--ranges", default=",".join(RANGES), help="comma-separated subset of " + ",".join(RANGES))
    args = parser.parse_args(argv)
    unknown = [label for label in args.ranges.split(",") if label not in RANGES]
    if unknown:
        parser.error(f"--ranges: unknown {', '.join(unknown)} (choose from {', '.join(RANGES)})")
    ranges = {label: RANGES[label] for label in args.ranges.split(",")}
    dashboards = sorted(glob.glob(args.dashboards))
    if not dashboards:
        parser.error(f"--dashboards: no file matches {args.dashboards}")
    last, account, model, trace = busiest(args.db)
    port = free_port()
    server = start_server(args.db, port)
    errors = 0
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            print(f"dataset {args.db}: filter account={account} model={model}, trace id {trace}; "
                  f"{args.runs} runs per case")
            print(f"{'dashboard':<28}{'range':>6} {'filter':<9}{'median ms':>10}{'p95 ms':>9}  slowest panel")
            for path in dashboards:
                dash = json.loads(Path(path).read_text())
                for label, span in ranges.items():
                    for filt, values in filter_states(dash, account, model, trace):
                        bodies = panel_bodies(dash, last + 1 - span, last + 1, values)
                        refresh(port, bodies, pool)  # warm-up: page cache and statement cache
                        walls, slowest = [], (0.0, "", 0)
                        for _ in range(args.runs):
                            wall, panels = refresh(port, bodies, pool)
                            walls.append(wall)
                            errors += sum(1 for _, _, status in panels if status != 200)
                            slowest = max([slowest] + panels)
                        print(f"{dash['uid']:<28}{label:>6} {filt:<9}{statistics.median(walls) * 1e3:10.0f}"
                              f"{p95(walls) * 1e3:9.0f}  {slowest[1]} {slowest[0] * 1e3:.0f} ms")
                        if args.alone:
                            alone = panels_alone(port, bodies, args.runs)
                            errors += sum(1 for _, _, status in alone if status != 200)
                            top = ", ".join(f"{title} {ms:.0f}" for ms, title, _ in alone[:3])
                            print(f"{'':<28}{'':>6} {'':<9}{'alone, ms:':>19}  {top}")
    finally:
        server.terminate()
        server.wait(15)
    if errors:
        print(f"{errors} panel requests did not answer 200")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
