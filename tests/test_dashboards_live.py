"""Every dashboard, panel, annotation and variable queried "as Grafana would" against a real service.

The service is datasource.app.create_app on a temp SQLite file filled through the real ingest
path (TrafficGenerator events -> Ingestor -> normalize -> store), posted through Flask's test
client; one slow run goes over HTTP to a real `cpa-monitor demo` (gunicorn, embedded CPA stand-in,
real collector).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

import grafana_sim as sim
from datasource.app import create_app
from datasource.config import Settings
from datasource.db import open_database
from datasource.ingest import Ingestor
from datasource.traffic import TrafficGenerator
from test_dashboards import all_links, by_uid, dashboards, panels

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "dash-test-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
# Panels and variables that are empty for a reason with demo data in a collector-less app.
EMPTY_WITHOUT_COLLECTOR = {"Collector state per upstream", "Inserted", "Duplicates", "Dead letters",
                           "Max lag", "Collector gaps"}
EMPTY_VARIABLES = {"project"}  # the demo's auth files carry no project ids on most accounts
Post = Callable[[str, dict[str, Any]], tuple[int, Any]]


@pytest.fixture(scope="module")
def window() -> tuple[int, int]:
    now = int(time.time() * 1000)
    return now - 3_600_000, now


@pytest.fixture(scope="module")
def post(tmp_path_factory, window) -> Post:
    db = str(tmp_path_factory.mktemp("dash") / "monitor.db")
    conn = open_database(db)
    events = list(TrafficGenerator(seed=7).events(3000, window[0], window[1] - 1000))
    ingestor = Ingestor(conn, "default")
    for i in range(0, len(events), 500):
        ingestor.usage(events[i:i + 500])
    conn.close()
    client = create_app(Settings.from_env({}, db=db, collector="off", api_token=TOKEN)).test_client()

    def _post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        resp = client.post(path, json=body, headers=HEADERS)
        return resp.status_code, resp.get_json()

    return _post


def field_names_needed(panel: dict[str, Any]) -> set[str]:
    """Names the panel's transformations, byName overrides and data links rely on."""
    names: set[str] = set()
    for tr in panel.get("transformations", []):
        names |= set(tr.get("options", {}).get("include", {}).get("names", []))
    for ov in panel.get("fieldConfig", {}).get("overrides", []):
        if ov["matcher"]["id"] == "byName":
            names.add(ov["matcher"]["options"])
    for _, url, _ in all_links_of(panel):
        names |= set(re.findall(r"__data\.fields\.(\w+)", url))
    return names


def all_links_of(panel: dict[str, Any]) -> list[tuple[dict[str, Any], str, str | None]]:
    return [item for item in all_links({"panels": [panel]})]


def regex_matchers(panel: dict[str, Any]) -> list[re.Pattern[str]]:
    out = []
    for ov in panel.get("fieldConfig", {}).get("overrides", []):
        if ov["matcher"]["id"] == "byRegexp":
            m = re.fullmatch(r"/(.*)/([a-z]*)", ov["matcher"]["options"])
            out.append(re.compile(m.group(1), re.I if "i" in m.group(2) else 0))
    return out


def check_panel(dash: dict[str, Any], panel: dict[str, Any], state: sim.State, post: Post,
                allow_empty: set[str]) -> list[dict[str, Any]]:
    errors: list[str] = []
    status, body = post("/query", sim.query_body(dash, panel, state, errors))
    where = f"{dash['uid']} / {panel['title']}"
    assert errors == [] and status == 200, (where, errors, body)
    frames = sim.to_frames(body)
    assert {f["refId"] for f in frames} == {t["refId"] for t in panel["targets"]}, where
    columns = set().union(*(f["columns"] for f in frames))
    missing = field_names_needed(panel) - columns
    assert not missing, (where, missing)
    nonempty = [f for f in frames if sim.rows(f)]
    if panel["title"] not in allow_empty:
        assert len(nonempty) == len(frames), (where, "empty frame")
    if panel["type"] == "timeseries":
        for f in frames:
            assert "time" in [k for k, t in f["types"].items() if t == "time"], where
            assert any(t == "number" for t in f["types"].values()), where
    if panel["type"] == "stat" and panel["title"] not in allow_empty:
        assert all(len(sim.rows(f)) >= 1 for f in frames), where
    for pattern in regex_matchers(panel) if panel["title"] not in allow_empty else []:
        if pattern.pattern == "^unusual$":
            continue  # the demo traffic has no unusual status
        assert any(pattern.search(c) for c in columns), (where, pattern.pattern, sorted(columns))
    return frames


def check_dashboard(dash: dict[str, Any], state: sim.State, post: Post, allow_empty: set[str]) -> None:
    for panel in panels(dash):
        if panel["type"] != "text":
            check_panel(dash, panel, state, post, allow_empty)
    for anno in dash["annotations"]["list"]:
        status, body = post("/query", sim.annotation_body(dash, anno, state))
        assert status == 200, (dash["uid"], anno["name"], body)
        frame = sim.to_frames(body)[0]
        assert {"time", "timeEnd", "title", "text", "tags"} <= set(frame["columns"])
        assert frame["types"]["time"] == "time" and frame["types"]["text"] == "string"
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        status, body = post("/variable", sim.variable_body(var, state))
        assert status == 200, (var["name"], body)
        options = sim.variable_options(body) if body else []
        if var["name"] not in EMPTY_VARIABLES:
            assert options, var["name"]
        state.variables[var["name"]].options = [(t, v) for t, v in options]


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_panel_annotation_and_variable_answers_as_grafana_expects(name, post, window):
    dash = dashboards()[name]
    check_dashboard(dash, sim.state_from_dashboard(dash, *window), post, EMPTY_WITHOUT_COLLECTOR)


def _options(dash: dict[str, Any], state: sim.State, post: Post, var: str) -> list[tuple[str, str]]:
    definition = next(v for v in dash["templating"]["list"] if v["name"] == var)
    return sim.variable_options(post("/variable", sim.variable_body(definition, state))[1])


def _panel(dash: dict[str, Any], title: str) -> dict[str, Any]:
    return next(p for p in panels(dash) if p["title"] == title)


def _rows(dash, title, state, post) -> list[dict[str, Any]]:
    frames = check_panel(dash, _panel(dash, title), state, post, {title})
    return sim.rows(frames[0])


def test_selected_variables_and_adhoc_filters_narrow_every_panel(post, window):
    dash = by_uid()["cpa-monitoring"]
    state = sim.state_from_dashboard(dash, *window)
    account_key = _options(dash, state, post, "account")[0][1]
    providers = [v for _, v in _options(dash, state, post, "provider")[:2]]
    state.variables["account"].value = [account_key]
    state.variables["provider"].value = providers
    state.filters = [{"key": "status", "operator": "=", "value": "failed"}]
    rows = _rows(dash, "Realtime Requests", state, post)
    assert rows and all(r["account_key"] == account_key and r["status_class"] == "failed" for r in rows)
    assert all(r["provider"] in providers for r in rows)
    summary = check_panel(dash, _panel(dash, "Failures"), state, post, set())[0]["columns"]
    assert summary["failures"] == [len(rows)] and summary["requests"] == [len(rows)]
    check_dashboard(dash, state, post, {p["title"] for p in panels(dash)})


def _follow(row: dict[str, Any], panel: dict[str, Any], matcher: str, index: int, state: sim.State,
            window: tuple[int, int]) -> tuple[dict[str, Any], sim.State]:
    url = [u for _, u, m in all_links_of(panel) if m == matcher][index]
    uid, values, time_range = sim.follow_link(sim.link_url(url, state, row))
    assert time_range == state.raw
    target = by_uid()[uid]
    new_state = sim.state_from_dashboard(target, *window)
    sim.apply_url_values(new_state, values)
    return target, new_state


def test_drill_down_links_lead_to_the_filtered_next_step(post, window):
    mon = by_uid()["cpa-monitoring"]
    state = sim.state_from_dashboard(mon, *window)
    accounts = _rows(mon, "Account Overview", state, post)
    worst = accounts[0]
    assert worst["failures"] == max(a["failures"] for a in accounts)  # worst first
    target, st = _follow(worst, _panel(mon, "Account Overview"), "account", 0, state, window)
    assert target["uid"] == "cpa-monitoring"
    requests = _rows(target, "Realtime Requests", st, post)
    assert requests and {r["account_key"] for r in requests} == {worst["account_key"]}
    actions, st = _follow(worst, _panel(mon, "Account Overview"), "account", 1, state, window)
    queue = _rows(actions, "Accounts needing action", st, post)
    assert {r["account_key"] for r in queue} <= {worst["account_key"]}

    key = _rows(mon, "API Key Summary", state, post)[0]
    usage, st = _follow(key, _panel(mon, "API Key Summary"), "api_key", 0, state, window)
    assert usage["uid"] == "cpa-usage-analytics"
    spenders = _rows(usage, "Top spenders (API keys)", st, post)
    assert [r["key"] for r in spenders] == [key["api_key_hash"]]
    assert spenders[0]["requests"] == key["requests"]

    request = next(r for r in _rows(mon, "Realtime Requests", state, post) if r["request_id"])
    target, st = _follow(request, _panel(mon, "Realtime Requests"), "request_id", 0, state, window)
    same = _rows(target, "Realtime Requests", st, post)
    assert same and all(request["request_id"] in (r["request_id"], r["trace_id"]) for r in same)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_post(base: str) -> Post:
    def _post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={**HEADERS, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")
    return _post


@pytest.mark.slow
def test_every_dashboard_against_the_demo_under_gunicorn(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPA_MONITOR_")}
    env.update(PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(tmp_path))
    cmd = [sys.executable, "-m", "datasource", "demo", "--seed", "11", "--backfill-minutes", "20",
           "--bind", f"127.0.0.1:{port}", "--api-token", TOKEN, "--db", str(tmp_path / "demo.db")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "demo.log", "wb"), start_new_session=True)
    base, post = f"http://127.0.0.1:{port}", _http_post(f"http://127.0.0.1:{port}")
    try:
        now = int(time.time() * 1000)
        window = (now - 3_600_000, now + 120_000)
        summary = {"targets": [{"refId": "A", "target": "summary", "payload": {}}],
                   "range": {"from": sim.iso(window[0]), "to": sim.iso(window[1])}}
        deadline, requests = time.time() + 60, 0
        while time.time() < deadline and requests < 1000:
            time.sleep(0.5)
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-2000:]
            try:
                status, body = post("/query", summary)
            except OSError:
                continue
            if status == 200:
                requests = sim.to_frames(body)[0]["columns"]["requests"][0]
        assert requests >= 1000, (tmp_path / "demo.log").read_text()[-2000:]
        with urllib.request.urlopen(base + "/", timeout=5) as resp:
            assert resp.status == 200
        for dash in dashboards().values():
            check_dashboard(dash, sim.state_from_dashboard(dash, *window), post,
                            {"Collector gaps", "Duplicates", "Dead letters"})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
