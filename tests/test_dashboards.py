"""Static checks of the provisioned dashboards and of the Grafana simulator they are tested with.

The live checks (every panel, variable and annotation posted to a running service) are in
tests/test_dashboards_live.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

import grafana_sim as sim

ROOT = Path(__file__).resolve().parent.parent
DASH_DIR = ROOT / "dashboards"
DS_UID = "cpa-monitor"
BUILTIN_REFS = {"__url_time_range", "__all_variables", "__data", "__value", "__field", "__from", "__to",
                "__interval", "__interval_ms"}
MULTI = ["instance", "provider", "model", "project", "account", "api_key", "status", "failure_type",
         "request_type", "cache"]
TEXTBOXES = ["min_latency_ms", "trace_id", "search"]
T0, T1 = 1_795_000_000_000, 1_795_003_600_000


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("cpa_dash_generate", DASH_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASH_DIR.glob("*.json"))}


def by_uid() -> dict[str, dict[str, Any]]:
    return {d["uid"]: d for d in dashboards().values()}


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        if p["type"] != "row":
            yield p


def all_links(dash: dict[str, Any]) -> Iterator[tuple[dict[str, Any] | None, str, str | None]]:
    """(panel, url, override field matcher or None) for every data link and panel link."""
    for p in panels(dash):
        for link in p.get("links", []):
            yield p, link["url"], None
        fc = p.get("fieldConfig", {})
        for link in fc.get("defaults", {}).get("links", []):
            yield p, link["url"], None
        for ov in fc.get("overrides", []):
            for prop in ov["properties"]:
                if prop["id"] == "links":
                    for link in prop["value"]:
                        yield p, link["url"], ov["matcher"]["options"]


def state_of(dash: dict[str, Any]) -> sim.State:
    return sim.state_from_dashboard(dash, T0, T1)


# --- generated files -------------------------------------------------------------------


def test_committed_json_equals_generator_output():
    rendered = load_generator().render()
    assert sorted(rendered) == sorted(dashboards())
    for name, content in rendered.items():
        assert (DASH_DIR / name).read_text() == content, f"{name} is stale: run python3 dashboards/generate.py"


def test_generator_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    gen = load_generator()
    for name, content in gen.render().items():
        (tmp_path / name).write_text(content)
    monkeypatch.setattr(gen, "HERE", tmp_path)
    assert gen.main(["--check"]) == 0
    (tmp_path / "usage-analytics.json").write_text("{}")
    assert gen.main(["--check"]) == 1
    assert "usage-analytics.json" in capsys.readouterr().err


def test_four_dashboards_with_fixed_unique_uids():
    uids = {name: d["uid"] for name, d in dashboards().items()}
    assert uids == {"cpa-monitoring.json": "cpa-monitoring", "usage-analytics.json": "cpa-usage-analytics",
                    "account-action-queue.json": "cpa-account-action-queue",
                    "collector-health.json": "cpa-collector-health"}


def _datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


def test_every_datasource_reference_is_the_provisioned_uid():
    for name, dash in dashboards().items():
        refs = list(_datasource_refs(dash))
        assert refs, name
        assert all(r == {"type": "simpod-json-datasource", "uid": DS_UID} for r in refs), name


def test_monitoring_variables_time_and_refresh():
    dash = by_uid()["cpa-monitoring"]
    variables = dash["templating"]["list"]
    assert [v["name"] for v in variables] == MULTI + TEXTBOXES + ["filters"]
    for v in variables[:10]:
        assert (v["type"], v["multi"], v["includeAll"], v["allValue"]) == ("query", True, True, '"__all__"')
        assert v["query"] == {"query": v["name"], "format": "string"}
    assert [v["type"] for v in variables[10:]] == ["textbox", "textbox", "textbox", "adhoc"]
    assert dash["time"] == {"from": "now-1h", "to": "now"}
    assert dash["timepicker"]["refresh_intervals"] == ["5s", "10s", "30s", "1m", "5m"]


def test_panels_do_not_overlap_and_fit_the_grid():
    for name, dash in dashboards().items():
        cells: set[tuple[int, int]] = set()
        for p in dash["panels"]:
            gp = p["gridPos"]
            assert 0 <= gp["x"] and gp["x"] + gp["w"] <= 24, (name, p["title"])
            mine = {(x, y) for x in range(gp["x"], gp["x"] + gp["w"]) for y in range(gp["y"], gp["y"] + gp["h"])}
            assert not cells & mine, (name, p["title"])
            cells |= mine
        assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_monitoring_follows_the_seed_flow():
    titles = [p["title"] for p in by_uid()["cpa-monitoring"]["panels"]]
    order = ["Requests", "Failures", "Success rate", "p95 latency", "Avg latency", "Tokens", "Est. cost",
             "Requests vs failures by status class", "Success rate over time", "Latency p50 / p95 / p99", "Failures by failure type",
             "Failures by status code", "Account Overview", "API Key Summary", "Realtime Requests"]
    assert [t for t in titles if t in order] == order
    names = [a["name"] for a in by_uid()["cpa-monitoring"]["annotations"]["list"]]
    assert names == ["Failure spikes", "Collector gaps"]


def test_stat_cards_show_the_change_against_the_previous_window():
    dash = by_uid()["cpa-monitoring"]
    stats = {p["title"]: p for p in panels(dash) if p["type"] == "stat"}
    rate = stats["Success rate"]
    assert rate["transformations"][0]["options"]["include"]["names"] == ["success_rate", "success_rate_change_pct"]
    assert rate["fieldConfig"]["defaults"]["unit"] == "percentunit"
    steps = rate["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["color"], s["value"]) for s in steps] == [("red", None), ("orange", 0.85), ("green", 0.95)]
    assert len(stats) == 7


def test_checklist_text_panel_has_the_seed_order():
    text = [p for p in by_uid()["cpa-collector-health"]["panels"] if p["type"] == "text"][0]
    content = text["options"]["content"]
    steps = re.findall(r"^(\d)\. (.+)$", content, re.M)
    assert [n for n, _ in steps] == ["1", "2", "3", "4", "5", "6"]
    assert "go through CPA" in steps[0][1] and "8317" in steps[5][1]


# --- payloads as the plugin interpolates them ------------------------------------------


def _targets(dash: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for p in panels(dash):
        for t in p.get("targets", []):
            yield p["title"], t
    for a in dash["annotations"]["list"]:
        yield a["name"], a["target"]


def _select(state: sim.State) -> None:
    state.variables["provider"].value = ["openai", "claude.x"]
    state.variables["account"].value = ["a1b2c3d4e5f60708"]
    state.variables["min_latency_ms"].value = "1500"
    state.variables["trace_id"].value = 'req "quoted" id'


@pytest.mark.parametrize("selection", ["default", "selected"])
def test_every_code_mode_payload_is_valid_json(selection):
    for name, dash in dashboards().items():
        state = state_of(dash)
        if selection == "selected" and "provider" in state.variables:
            _select(state)
        for title, tgt in _targets(dash):
            assert tgt["editorMode"] == "code" and isinstance(tgt["payload"], str), (name, title)
            errors: list[str] = []
            fake_panel = {"id": 1, "type": "table", "gridPos": {"w": 12}, "targets": [tgt],
                          "datasource": tgt["datasource"]}
            body = sim.query_body(dash, fake_panel, state, errors)
            assert errors == [], (name, title, errors)
            assert body["targets"][0]["payload"], (name, title)


def test_realtime_requests_payload_exactly():
    dash = by_uid()["cpa-monitoring"]
    state = state_of(dash)
    _select(state)
    state.filters = [{"key": "status", "operator": "=", "value": "5xx"}]
    panel = next(p for p in panels(dash) if p["title"] == "Realtime Requests")
    body = sim.query_body(dash, panel, state)
    expected = {k: "__all__" for k in MULTI}
    expected.update(provider=["openai", "claude.x"], account=["a1b2c3d4e5f60708"], min_latency_ms="1500",
                    trace_id='req "quoted" id', search="", limit=500)
    assert body["targets"][0]["payload"] == expected
    assert body["targets"][0]["target"] == "requests"
    assert body["filters"] == [{"key": "status", "operator": "=", "value": "5xx"}]
    assert body["range"] == {"from": "2026-11-18T11:06:40.000Z", "to": "2026-11-18T12:06:40.000Z",
                             "raw": {"from": "now-1h", "to": "now"}}
    # w=24 -> 1920 points over 1 h: 1875 ms rounds up to 2 s.
    assert (body["intervalMs"], body["maxDataPoints"]) == (2000, 1920)


def test_annotation_body_has_no_filters_and_no_range_raw():
    dash = by_uid()["cpa-monitoring"]
    state = state_of(dash)
    state.filters = [{"key": "status", "operator": "=", "value": "5xx"}]
    body = sim.annotation_body(dash, dash["annotations"]["list"][0], state)
    assert "filters" not in body and "rangeRaw" not in body
    assert body["targets"][0]["refId"] == "Anno"
    assert body["targets"][0]["payload"]["kind"] == "failure_spikes"


def test_variable_bodies():
    dash = by_uid()["cpa-monitoring"]
    state = state_of(dash)
    body = sim.variable_body(dash["templating"]["list"][1], state)
    assert body == {"payload": {"target": "provider"},
                    "range": {"from": "2026-11-18T11:06:40.000Z", "to": "2026-11-18T12:06:40.000Z",
                              "raw": {"from": "now-1h", "to": "now"}}}


# --- the simulator itself ----------------------------------------------------------------


def _state(**values: Any) -> sim.State:
    variables = {
        "host": sim.Var("host", "query", True, True, None, ["web-1", "db.1"], [("web-1", "web-1"), ("db.1", "db.1")]),
        "prov": sim.Var("prov", "query", True, True, '"__all__"', [sim.ALL_VALUE]),
        "env": sim.Var("env", "textbox", value="prod"),
    }
    for name, value in values.items():
        variables[name].value = value
    return sim.State("d", variables, [], T0, T1, {"from": "now-6h", "to": "now"})


def test_sim_formats_match_the_protocol_notes():
    st = _state()
    assert sim.interpolate("cpu_$host", st, "regex") == r"cpu_(web-1|db\.1)"
    assert sim.interpolate('{"hosts": $host, "env": "$env"}', st, "json") == '{"hosts": ["web-1","db.1"], "env": "prod"}'
    assert sim.interpolate('{"p": $prov}', st, "json") == '{"p": "__all__"}'
    assert sim.interpolate("$prov", st, "regex") == '"__all__"'
    assert sim.interpolate("${prov:queryparam}&${host:queryparam}", st, "raw") == "var-prov=All&var-host=web-1&var-host=db.1"
    assert sim.interpolate("${env:doublequote}", _state(env='a"b'), "json") == '"a\\"b"'
    assert sim.interpolate("${host:csv} ${host:pipe} ${host:json}", st, "regex") == 'web-1,db.1 web-1|db.1 ["web-1","db.1"]'
    assert sim.interpolate("${__from}-${__to:date:seconds}-$unknown", st, "json") == f"{T0}-{T1 // 1000}-$unknown"
    assert sim.interpolate("${__url_time_range}", st, "raw") == "from=now-6h&to=now"


def test_sim_all_without_custom_value_lists_every_option():
    st = _state(host=[sim.ALL_VALUE])
    assert sim.interpolate("$host", st, "regex") == r"(web-1|db\.1)"
    assert sim.interpolate("$host", st, "json") == '["web-1","db.1"]'


def test_sim_payload_syntax_error_becomes_empty_payload_like_the_plugin():
    payload, err = sim.parse_payload('{"env": $env}', _state(), {})
    assert payload == {} and err is not None
    payload, err = sim.parse_payload({"h": "$host", "n": 5}, _state(), {})
    assert (payload, err) == ({"h": r"(web-1|db\.1)", "n": "5"}, None)


def test_sim_frames_from_every_response_shape():
    frames = sim.to_frames([
        {"refId": "A", "fields": [{"name": "time", "type": "time", "values": [1, 2]},
                                  {"name": "v", "type": "number", "values": [3, 4]}]},
        {"type": "table", "columns": [{"text": "k"}], "rows": [["x"], ["y"]]},
        {"target": "s", "datapoints": [[5, 1000]]},
    ])
    assert [f["columns"] for f in frames] == [{"time": [1, 2], "v": [3, 4]}, {"k": ["x", "y"]},
                                              {"Time": [1000], "Value": [5]}]
    with pytest.raises(AssertionError):
        sim.to_frames([{"nope": 1}])
    assert sim.variable_options([{"__text": "A", "__value": 2}, {"__text": "A", "__value": 3}]) == [("A", "2")]
    with pytest.raises(AssertionError):
        sim.variable_options([{"text": "A", "value": "a"}])


# --- links ---------------------------------------------------------------------------------


def _field_refs(url: str) -> set[str]:
    return set(re.findall(r"__data\.fields\.(\w+)", url))


def test_every_link_points_at_an_existing_dashboard_and_existing_variables():
    uids = by_uid()
    for dash in uids.values():
        own = {v["name"] for v in dash["templating"]["list"]}
        for link in dash["links"]:
            target_uid, _, _ = sim.follow_link(link["url"])
            assert target_uid in uids and link["includeVars"] and link["keepTime"]
        for panel, url, _ in all_links(dash):
            refs = {m[0] or m[1] or m[3] for m in sim.VAR_RE.findall(url)}
            assert refs <= own | BUILTIN_REFS, (dash["uid"], panel["title"], refs - own - BUILTIN_REFS)
            assert "${__url_time_range}" in url, url
            rendered = sim.link_url(url, state_of(dash), {f: "v" for f in _field_refs(url)})
            target_uid, values, time = sim.follow_link(rendered)
            assert target_uid in uids, url
            target_vars = {v["name"] for v in uids[target_uid]["templating"]["list"]}
            assert set(values) <= target_vars, (url, set(values) - target_vars)
            assert time == {"from": "now-1h", "to": "now"}


def test_clicking_an_account_filters_monitoring_and_keeps_other_filters():
    dash = by_uid()["cpa-monitoring"]
    state = state_of(dash)
    state.variables["provider"].value = ["openai"]
    panel = next(p for p in panels(dash) if p["title"] == "Account Overview")
    links = next(ov for ov in panel["fieldConfig"]["overrides"] if ov["matcher"]["options"] == "account")
    urls = [link["url"] for link in links["properties"][0]["value"]]
    row = {"account_key": "a1b2 c3", "account": "alice@example.com"}
    uid, values, _ = sim.follow_link(sim.link_url(urls[0], state, row))
    assert uid == "cpa-monitoring"
    assert values["account"] == ["a1b2 c3"] and values["provider"] == ["openai"]
    assert values["model"] == ["All"] and values["trace_id"] == [""]
    target = sim.state_from_dashboard(by_uid()[uid], T0, T1)
    sim.apply_url_values(target, values)
    table = next(p for p in panels(by_uid()[uid]) if p["title"] == "Realtime Requests")
    payload = sim.query_body(by_uid()[uid], table, target)["targets"][0]["payload"]
    assert (payload["account"], payload["provider"], payload["model"]) == (["a1b2 c3"], ["openai"], "__all__")
    uid2, values2, _ = sim.follow_link(sim.link_url(urls[1], state, row))
    assert uid2 == "cpa-account-action-queue" and values2["account"] == ["a1b2 c3"]


def test_drill_down_targets():
    dash = by_uid()["cpa-monitoring"]
    targets: dict[str, set[str]] = {}
    for panel, url, matcher in all_links(dash):
        uid, _, _ = sim.follow_link(sim.link_url(url, state_of(dash), {f: "v" for f in _field_refs(url)}))
        targets.setdefault(f"{panel['title']}|{matcher}", set()).add(uid)
    assert targets["API Key Summary|api_key"] == {"cpa-usage-analytics", "cpa-monitoring"}
    assert targets["Est. cost|None"] == {"cpa-usage-analytics"}
    assert targets["Failures by failure type|/auth|quota|credential|forbidden|unauthorized/i"] == {"cpa-account-action-queue"}
    assert targets["Failures by status code|/^(401|402|403|429)$/"] == {"cpa-account-action-queue"}
    assert targets["Realtime Requests|trace_id"] == {"cpa-monitoring"}
    assert targets["Realtime Requests|request_id"] == {"cpa-monitoring"}


@pytest.mark.parametrize("hours, step_ms", [(1, 15_000), (24, 300_000), (7 * 24, 3_600_000), (30 * 24, 10_800_000)])
def test_time_series_ask_five_minute_buckets_at_24_hours(hours, step_ms):
    """Every time series asks at most 288 points, so a day is 5-minute buckets (served by rollups)
    whatever the panel's width; the datasource's bucket is the interval Grafana sends."""
    from datasource.query_series import bucket_step

    for dash in dashboards().values():
        state = sim.state_from_dashboard(dash, T1 - hours * 3_600_000, T1)
        for panel in panels(dash):
            if panel["type"] != "timeseries":
                continue
            body = sim.query_body(dash, panel, state)
            if panel["title"] == "Est. cost by API key":  # 30 points: test below
                continue
            # a panel with a min interval (cost by account: hourly account rollups) asks at least that
            want = max(step_ms, sim.parse_interval(panel.get("interval")))
            assert (body["intervalMs"], body["maxDataPoints"]) == (want, 288), panel["title"]
            assert bucket_step(state.from_ms, state.to_ms, body["intervalMs"], body["maxDataPoints"]) == want


@pytest.mark.parametrize("hours, step_ms", [(1, 120_000), (24, 3_600_000), (7 * 24, 21_600_000),
                                            (30 * 24, 86_400_000)])
def test_cost_by_api_key_asks_daily_buckets_at_30_days(hours, step_ms):
    """API key x account x model is kept daily only: at most 30 points, so 30 days are whole days
    (rollup_api_key_day when filtered by account or model) and 7 days 6-hour buckets."""
    from datasource.query_series import bucket_step

    dash = dashboards()["usage-analytics.json"]
    panel = next(p for p in panels(dash) if p["title"] == "Est. cost by API key")
    state = sim.state_from_dashboard(dash, T1 - hours * 3_600_000, T1)
    body = sim.query_body(dash, panel, state)
    assert (body["intervalMs"], body["maxDataPoints"]) == (step_ms, 30)
    assert bucket_step(state.from_ms, state.to_ms, body["intervalMs"], body["maxDataPoints"]) == step_ms


def test_series_split_by_account_ask_hourly_buckets_at_least():
    """The account families are hourly and daily: a series split by account sets a 1 h min interval
    (5-minute buckets of 100 accounts would read every raw event of a 24 h window)."""
    found = {(d["uid"], p["title"]): p.get("interval") for d in dashboards().values() for p in panels(d)
             if p["type"] == "timeseries" and p.get("interval")}
    assert found == {("cpa-usage-analytics", "Est. cost by account"): "1h",
                     ("cpa-account-action-queue", "Auth and quota failures by account"): "1h"}
    split_by_account = {(d["uid"], p["title"]) for d in dashboards().values() for p in panels(d)
                        if p["type"] == "timeseries" and any('"split_by": "account"' in t.get("payload", "")
                                                             for t in p.get("targets", []))}
    assert split_by_account == set(found)
