"""Building blocks for the provisioned dashboards (stdlib only; used by generate.py).

One place defines the datasource, the dashboard uids, the filter variables, the code-mode
payload string that carries every filter, and the drill-down links, so the four dashboards
cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Any

DS: dict[str, str] = {"type": "simpod-json-datasource", "uid": "cpa-monitor"}

UIDS: dict[str, str] = {
    "monitoring": "cpa-monitoring",
    "usage": "cpa-usage-analytics",
    "actions": "cpa-account-action-queue",
    "collector": "cpa-collector-health",
}
TITLES: dict[str, str] = {
    "monitoring": "CPA Monitoring",
    "usage": "Usage Analytics",
    "actions": "Account Action Queue",
    "collector": "Collector Health",
}
FILES: dict[str, str] = {
    "monitoring": "cpa-monitoring.json",
    "usage": "usage-analytics.json",
    "actions": "account-action-queue.json",
    "collector": "collector-health.json",
}

# (variable name = payload key, label); values come from /variable with the same target name.
MULTI_VARS: list[tuple[str, str]] = [
    ("instance", "Instance"), ("provider", "Provider"), ("model", "Model"), ("project", "Project"),
    ("account", "Account"), ("api_key", "API key"), ("status", "Status"),
    ("failure_type", "Failure type"), ("request_type", "Request type"), ("cache", "Cache"),
]
# Textboxes: always quoted with ${var:doublequote} so a value with '"' keeps the payload valid JSON.
TEXT_VARS: list[tuple[str, str]] = [
    ("min_latency_ms", "Min latency (ms)"), ("trace_id", "Trace / request ID"), ("search", "Search (request id, text)"),
]
ADHOC_VAR = "filters"
ALL_VALUE = '"__all__"'  # a JSON string literal: {"provider": $provider} stays valid JSON for All
ALL_VAR_NAMES: list[str] = [n for n, _ in MULTI_VARS] + [n for n, _ in TEXT_VARS]

GREEN, ORANGE, RED, BLUE, YELLOW = "green", "orange", "red", "blue", "yellow"
RATE_STEPS = [{"color": RED, "value": None}, {"color": ORANGE, "value": 0.85}, {"color": GREEN, "value": 0.95}]


def payload(var_names: list[str], **extra: Any) -> str:
    """The code-mode payload string: every filter variable, then the target's own keys."""
    parts = []
    for name in var_names:
        ref = f"${{{name}:doublequote}}" if name in dict(TEXT_VARS) else f"${name}"
        parts.append(f'"{name}": {ref}')
    parts += [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items()]
    return "{" + ", ".join(parts) + "}"


def target(ref_id: str, name: str, var_names: list[str], **extra: Any) -> dict[str, Any]:
    return {"refId": ref_id, "datasource": DS, "editorMode": "code", "target": name,
            "payload": payload(var_names, **extra)}


def variables(var_names: list[str]) -> list[dict[str, Any]]:
    """Query variables (multi + All = "__all__"), textboxes and the ad hoc filter, in order."""
    out: list[dict[str, Any]] = []
    for name, label in MULTI_VARS:
        if name not in var_names:
            continue
        out.append({
            "type": "query", "name": name, "label": label, "datasource": DS,
            "query": {"query": name, "format": "string"}, "definition": name,
            "refresh": 2, "multi": True, "includeAll": True, "allValue": ALL_VALUE,
            "current": {"text": ["All"], "value": ["$__all"]}, "options": [], "sort": 1, "regex": "",
        })
    for name, label in TEXT_VARS:
        if name in var_names:
            out.append({"type": "textbox", "name": name, "label": label, "query": "",
                        "current": {"text": "", "value": ""}, "options": []})
    if len(var_names) > 1:
        out.append({"type": "adhoc", "name": ADHOC_VAR, "label": "Ad hoc filters",
                    "datasource": DS, "filters": []})
    return out


def drill_url(dest: str, var_names: list[str], **sets: str) -> str:
    """A data-link URL to `dest` keeping the time range and every filter not being set."""
    keep = [f"${{{n}:queryparam}}" for n in var_names if n not in sets]
    setp = [f"var-{n}={v}" for n, v in sets.items()]
    return f"/d/{UIDS[dest]}?" + "&".join(["${__url_time_range}"] + keep + setp)


def field_value(field: str) -> str:
    return f"${{__data.fields.{field}:percentencode}}"


def link(title: str, url: str) -> dict[str, Any]:
    return {"title": title, "url": url, "targetBlank": False}


def dashboard_links(here: str) -> list[dict[str, Any]]:
    return [{"type": "link", "title": TITLES[k], "url": f"/d/{uid}", "icon": "dashboard",
             "includeVars": True, "keepTime": True, "asDropdown": False, "tags": [], "targetBlank": False}
            for k, uid in UIDS.items() if k != here]


def override(name: str, *props: tuple[str, Any], regex: bool = False) -> dict[str, Any]:
    matcher = {"id": "byRegexp" if regex else "byName", "options": name}
    return {"matcher": matcher, "properties": [{"id": k, "value": v} for k, v in props]}


def hidden(name: str) -> dict[str, Any]:
    return override(name, ("custom.hidden", True))


def wrapped(name: str, width: int = 360) -> dict[str, Any]:
    return override(name, ("custom.cellOptions", {"type": "auto", "wrapText": True}),
                    ("custom.inspect", True), ("custom.width", width))


def colored_rate(name: str) -> dict[str, Any]:
    return override(name, ("unit", "percentunit"), ("decimals", 1),
                    ("custom.cellOptions", {"type": "color-background", "mode": "basic"}),
                    ("thresholds", {"mode": "absolute", "steps": RATE_STEPS}))


def links_on(name: str, *items: dict[str, Any], regex: bool = False) -> dict[str, Any]:
    return override(name, ("links", list(items)), regex=regex)


def unit_on(name: str, unit: str) -> dict[str, Any]:
    return override(name, ("unit", unit))


def _panel(kind: str, title: str, w: int, h: int, targets: list[dict[str, Any]],
           description: str = "") -> dict[str, Any]:
    return {"type": kind, "title": title, "description": description, "datasource": DS,
            "gridPos": {"w": w, "h": h}, "targets": targets}


def stat(title: str, tgt: dict[str, Any], name: str, unit: str, w: int = 3,
         steps: list[dict[str, Any]] | None = None, description: str = "",
         links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stat card showing `name` and `<name>_change_pct` (change vs the previous window)."""
    change = f"{name}_change_pct"
    p = _panel("stat", title, w, 4, [tgt], description)
    p["transformations"] = [{"id": "filterFieldsByName", "options": {"include": {"names": [name, change]}}}]
    p["fieldConfig"] = {
        "defaults": {"unit": unit, "color": {"mode": "thresholds"}, "links": links or [],
                     "thresholds": {"mode": "absolute", "steps": steps or [{"color": BLUE, "value": None}]}},
        "overrides": [override(change, ("unit", "percent"), ("decimals", 1),
                               ("displayName", "vs previous window"),
                               ("color", {"mode": "fixed", "fixedColor": "text"}))],
    }
    p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "none", "textMode": "value_and_name",
                    "justifyMode": "auto", "orientation": "vertical"}
    return p


def reduce_stat(title: str, tgt: dict[str, Any], name: str, calc: str, unit: str = "short",
                w: int = 4, description: str = "") -> dict[str, Any]:
    """A stat reducing one column of a table frame (sum, max or count of rows)."""
    p = _panel("stat", title, w, 4, [tgt], description)
    p["transformations"] = [{"id": "filterFieldsByName", "options": {"include": {"names": [name]}}}]
    p["fieldConfig"] = {"defaults": {"unit": unit, "color": {"mode": "fixed", "fixedColor": BLUE}},
                        "overrides": []}
    p["options"] = {"reduceOptions": {"calcs": [calc], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "none", "textMode": "value"}
    return p


SERIES_POINTS = 288


def timeseries(title: str, targets: list[dict[str, Any]], unit: str, w: int = 12, h: int = 8,
               overrides: list[dict[str, Any]] | None = None, description: str = "",
               stack: bool = False, min_interval: str | None = None, max_points: int = 0,
               **defaults: Any) -> dict[str, Any]:
    p = _panel("timeseries", title, w, h, targets, description)
    # One point per 5 minutes over a day whatever the panel's width (Grafana would ask 1-2 minute
    # buckets at 24 h from the width): 5-minute buckets come from rollups (docs/performance.md),
    # and longer ranges get 30 min to 3 h steps, shorter ones seconds.
    p["maxDataPoints"] = max_points or SERIES_POINTS
    if min_interval:  # Grafana's "Min interval": no finer buckets than the rollups that answer them
        p["interval"] = min_interval
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 18 if stack else 8,
              "spanNulls": False, "showPoints": "never",
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    p["fieldConfig"] = {"defaults": {"unit": unit, "custom": custom, **defaults},
                        "overrides": overrides or []}
    p["options"] = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["sum", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}}
    return p


def table(title: str, tgt: dict[str, Any], overrides: list[dict[str, Any]], w: int = 24, h: int = 9,
          description: str = "", links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    p = _panel("table", title, w, h, [tgt], description)
    p["fieldConfig"] = {"defaults": {"custom": {"align": "auto", "filterable": True},
                                     "links": links or []}, "overrides": overrides}
    p["options"] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    return p


def text(title: str, content: str, w: int = 24, h: int = 9) -> dict[str, Any]:
    return {"type": "text", "title": title, "gridPos": {"w": w, "h": h},
            "options": {"mode": "markdown", "content": content}}


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at 24 columns; assign ids and positions."""
    x = y = line_h = 0
    for pid, p in enumerate(panels, start=1):
        gp = p["gridPos"]
        if p["type"] == "row" or x + gp["w"] > 24:
            x, y, line_h = 0, y + line_h, 0
        gp.update({"x": x, "y": y})
        p["id"] = pid
        x, line_h = x + gp["w"], max(line_h, gp["h"])
        if p["type"] == "row":
            x, y, line_h = 0, y + 1, 0
    return panels


def annotation(name: str, color: str, kind: str, var_names: list[str]) -> dict[str, Any]:
    return {"name": name, "enable": True, "hide": False, "iconColor": color, "datasource": DS,
            "target": {"refId": "Anno", "datasource": DS, "editorMode": "code", "target": "annotations",
                       "payload": payload(var_names, kind=kind)}}


def dashboard(key: str, panels: list[dict[str, Any]], var_names: list[str],
              annotations: list[dict[str, Any]], refresh: str = "") -> dict[str, Any]:
    return {
        "uid": UIDS[key], "title": TITLES[key], "tags": ["cpa-monitor"], "timezone": "browser",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": refresh,
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "templating": {"list": variables(var_names)},
        "annotations": {"list": annotations},
        "links": dashboard_links(key),
        "panels": layout(panels),
    }
