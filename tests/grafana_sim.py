"""What Grafana (scenes, 11.3+) and simpod-json-datasource do with a dashboard, without Grafana.

- `interpolate()`: the variable regex and formatters (regex, json, doublequote, queryparam,
  percentencode, csv, pipe, raw, text), multi values, All with a custom allValue inserted
  verbatim, built-ins (${__from}, ${__to}, ${__interval_ms}, ${__url_time_range}, data-link fields).
- `query_body()` / `annotation_body()` / `variable_body()`: the request bodies the plugin posts
  (grafana-json-protocol.md 3.4, 3.5): `target` with format regex, code-mode payload strings with
  format json then JSON.parse (`{}` on a syntax error, as the plugin does).
- `to_frames()`: the response mapping (DataFrame DTO, table, timeseries) into name -> values.
- `follow_link()`: a data/dashboard link URL -> (dashboard uid, variable values, time range).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

VAR_RE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")
REGEX_SPECIAL = re.compile(r"([\\^$*+?.()|\[\]{}/])")
ALL_TEXT, ALL_VALUE = "All", "$__all"
INTERVALS_MS = [1000, 2000, 5000, 10000, 15000, 20000, 30000, 60000, 120000, 300000, 600000,
                900000, 1800000, 3600000, 7200000, 10800000, 21600000, 43200000, 86400000]


@dataclass
class Var:
    """One dashboard variable's current state."""

    name: str
    kind: str  # query | textbox | custom | adhoc
    multi: bool = False
    include_all: bool = False
    all_value: str | None = None
    value: Any = ""  # list for multi variables, str otherwise; ALL_VALUE when All is selected
    options: list[tuple[str, str]] = field(default_factory=list)  # (text, value)

    @property
    def is_all(self) -> bool:
        return self.include_all and (self.value == ALL_VALUE or self.value == [ALL_VALUE])


@dataclass
class State:
    """A dashboard as a user has it open: variables, ad hoc filters and the time range."""

    uid: str
    variables: dict[str, Var]
    filters: list[dict[str, Any]]
    from_ms: int
    to_ms: int
    raw: dict[str, str]


def state_from_dashboard(dash: dict[str, Any], from_ms: int, to_ms: int) -> State:
    variables: dict[str, Var] = {}
    for v in dash.get("templating", {}).get("list", []):
        current = v.get("current", {}).get("value", "")
        if v.get("multi") and not isinstance(current, list):
            current = [current]
        variables[v["name"]] = Var(v["name"], v["type"], bool(v.get("multi")), bool(v.get("includeAll")),
                                   v.get("allValue") or None, current)
    raw = {"from": dash["time"]["from"], "to": dash["time"]["to"]}
    return State(dash["uid"], variables, [], from_ms, to_ms, raw)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _escape_regex(text: str) -> str:
    return REGEX_SPECIAL.sub(r"\\\1", text)


def _uri(text: str) -> str:
    return quote(text, safe="-_.!~*'()")


def _fmt(value: Any, fmt: str, var: Var | None) -> str:
    """Scenes formatRegistry for a resolved value (str, number or list)."""
    name = var.name if var else ""
    if fmt == "json":
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    items = value if isinstance(value, list) else [value]
    items = [v if isinstance(v, str) else json.dumps(v) for v in items]
    if fmt == "regex":
        esc = [_escape_regex(v) for v in items]
        return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in items)
    if fmt == "queryparam":
        return "&".join(f"var-{name}={_uri(v)}" for v in items)
    if fmt == "percentencode":
        return _uri(items[0]) if len(items) == 1 else _uri("{" + ",".join(items) + "}")
    if fmt == "pipe":
        return "|".join(items)
    if fmt == "glob":
        return items[0] if len(items) == 1 else "{" + ",".join(items) + "}"
    return ",".join(items)  # csv, raw, text, glob-less defaults


def _var_text(var: Var, fmt: str) -> str:
    if var.is_all:
        if var.all_value is not None:  # CustomAllValue: verbatim except text/queryparam/percentencode
            if fmt == "text":
                return ALL_TEXT
            if fmt == "queryparam":
                return f"var-{var.name}={ALL_TEXT}"
            if fmt == "percentencode":
                return _uri(var.all_value)
            return var.all_value
        return _fmt([v for _, v in var.options], fmt, var)
    return _fmt(var.value, fmt, var)


def _date_fmt(ms: int, arg: str | None) -> str:
    if arg in (None, "") or arg == "date":
        return str(ms)
    if arg in ("date:iso", "iso"):
        return iso(ms)
    if arg in ("date:seconds", "seconds"):
        return str(ms // 1000)
    raise ValueError(f"unsupported date format {arg!r}")


def interpolate(text: str, state: State, fmt: str, builtins: dict[str, Any] | None = None,
                row: dict[str, Any] | None = None) -> str:
    """templateSrv.replace(text, scopedVars, fmt); unknown variables are left as-is."""
    extra = builtins or {}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        path, own_fmt = m.group(5), m.group(3) or m.group(6)
        use = own_fmt or fmt
        if name in ("__from", "__to"):
            return _date_fmt(state.from_ms if name == "__from" else state.to_ms, own_fmt)
        if name == "__url_time_range":
            return f"from={_uri(state.raw['from'])}&to={_uri(state.raw['to'])}"
        if name == "__all_variables":
            return "&".join(_var_text(v, "queryparam") for v in state.variables.values() if v.kind != "adhoc")
        if name == "__data" and path and path.startswith("fields.") and row is not None:
            key = path[len("fields."):].strip('[]"')
            return _fmt(row[key], use, None)
        if name == "__value" and row is not None and "__value" in row:
            return _fmt(row["__value"], use, None)
        if name in extra:
            return _fmt(extra[name], use, None)
        if name in state.variables and state.variables[name].kind != "adhoc":
            return _var_text(state.variables[name], use)
        return m.group(0)

    return VAR_RE.sub(repl, text)


def interval_ms(from_ms: int, to_ms: int, max_data_points: int) -> int:
    """Grafana's interval: range / maxDataPoints rounded up to a nice step, at least 1 s."""
    raw = max(1, (to_ms - from_ms) // max(1, max_data_points))
    return next((step for step in INTERVALS_MS if step >= raw), INTERVALS_MS[-1])


def parse_interval(text: str | None) -> int:
    """A panel's min interval ("30s", "5m", "1h", "1d") in ms; 0 when unset."""
    if not text:
        return 0
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    found = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text.strip())
    if not found:
        raise ValueError(f"not an interval: {text!r}")
    return int(found.group(1)) * units[found.group(2)]


def parse_payload(payload: Any, state: State, builtins: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """simpod processPayload: (payload object, JSON error or None). Code mode: json format + JSON.parse."""
    if isinstance(payload, str):
        text = interpolate(payload, state, "json", builtins)
        if not text.strip():
            return {}, None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            return {}, f"{exc}: {text}"
        return (parsed, None) if isinstance(parsed, dict) else ({}, f"not an object: {text}")
    if payload is None:
        return {}, None
    out: dict[str, Any] = {}
    for key, value in payload.items():  # builder/object payload: every value regex-formatted as a string
        if value is None:
            return {}, None
        out[key] = ([interpolate(str(v), state, "regex", builtins) for v in value] if isinstance(value, list)
                    else interpolate(value if isinstance(value, str) else "[object Object]"
                                     if isinstance(value, dict) else json.dumps(value), state, "regex", builtins))
    return out, None


def _builtins(state: State, step_ms: int) -> dict[str, Any]:
    return {"__interval_ms": step_ms, "__interval": f"{step_ms // 1000}s"}


def _target(raw: dict[str, Any], state: State, builtins: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    out = dict(raw)
    out["target"] = interpolate(raw.get("target", ""), state, "regex", builtins)
    out["payload"], err = parse_payload(raw.get("payload"), state, builtins)
    if err:
        errors.append(f"{raw.get('refId')}: {err}")
    return out


def _range(state: State) -> dict[str, Any]:
    return {"from": iso(state.from_ms), "to": iso(state.to_ms), "raw": dict(state.raw)}


def query_body(dash: dict[str, Any], panel: dict[str, Any], state: State,
               errors: list[str] | None = None) -> dict[str, Any]:
    """The /query body for one panel, as the plugin posts it."""
    errs = errors if errors is not None else []
    max_points = panel.get("maxDataPoints") or panel["gridPos"]["w"] * 80  # the query option, else the width
    step = max(interval_ms(state.from_ms, state.to_ms, max_points), parse_interval(panel.get("interval")))
    builtins = _builtins(state, step)
    targets = [_target(t, state, builtins, errs) for t in panel.get("targets", []) if not t.get("hide")]
    body = {
        "app": "dashboard", "requestId": f"SQR{panel['id']}", "timezone": "browser", "range": _range(state),
        "rangeRaw": dict(state.raw), "interval": builtins["__interval"], "intervalMs": step,
        "maxDataPoints": max_points, "startTime": state.to_ms, "targets": targets,
        "scopedVars": {"__interval": {"text": builtins["__interval"], "value": builtins["__interval"]},
                       "__interval_ms": {"text": str(step), "value": step}},
        "dashboardUID": dash["uid"], "panelId": panel["id"], "panelPluginId": panel["type"],
    }
    adhoc = [v for v in dash.get("templating", {}).get("list", []) if v["type"] == "adhoc"]
    if adhoc and adhoc[0].get("datasource") == panel.get("datasource"):
        body["filters"] = list(state.filters)
    return body


def annotation_body(dash: dict[str, Any], anno: dict[str, Any], state: State,
                    errors: list[str] | None = None) -> dict[str, Any]:
    """Standard annotation support: the stored target through /query, no rangeRaw, no filters."""
    errs = errors if errors is not None else []
    step = interval_ms(state.from_ms, state.to_ms, 1200)
    builtins = _builtins(state, step)
    tgt = _target({**anno["target"], "refId": "Anno", "datasource": anno["datasource"]}, state, builtins, errs)
    return {"app": "dashboard", "requestId": "AQ1", "timezone": "browser", "range": _range(state),
            "interval": builtins["__interval"], "intervalMs": step, "maxDataPoints": 1200,
            "targets": [tgt], "scopedVars": {"__annotation": {"text": anno["name"], "value": anno}},
            "dashboardUID": dash["uid"]}


def variable_body(var_def: dict[str, Any], state: State) -> dict[str, Any]:
    """VariableSupport: {payload, range}; format string -> {target: <regex-interpolated query>}."""
    query = var_def["query"]
    text, fmt = (query.get("query", ""), query.get("format", "string")) if isinstance(query, dict) else (query, "string")
    if fmt == "json":
        payload = json.loads(interpolate(text, state, "json"))
    else:
        payload = {"target": interpolate(text, state, "regex")}
    return {"payload": payload, "range": _range(state)}


def variable_options(response: Any) -> list[tuple[str, str]]:
    """response_parser: __text/__value pairs (values stringified), de-duplicated by text."""
    frames = to_frames(response if isinstance(response, list) and response and isinstance(response[0], dict)
                       and "fields" in response[0] else [response])
    cols = frames[0]["columns"] if frames else {}
    if "__text" not in cols or "__value" not in cols:
        raise AssertionError(f"variable response lacks __text/__value: {list(cols)}")
    seen: dict[str, str] = {}
    for t, v in zip(cols["__text"], cols["__value"]):
        seen.setdefault(str(t), str(v))
    return list(seen.items())


def to_frames(response: list[Any]) -> list[dict[str, Any]]:
    """toDataFrame for each element: {refId, name, columns: {field: values}, types: {field: type}, meta}."""
    frames = []
    for item in response:
        if isinstance(item, dict) and "fields" in item:
            cols = {f["name"]: list(f.get("values", [])) for f in item["fields"]}
            types = {f["name"]: f.get("type") for f in item["fields"]}
        elif isinstance(item, dict) and ("datapoints" in item or "points" in item):
            points = item.get("datapoints") or item.get("points") or []
            cols = {"Time": [p[1] for p in points], "Value": [p[0] for p in points]}
            types = {"Time": "time", "Value": "number"}
        elif isinstance(item, dict) and "columns" in item:
            names = [c["text"] for c in item["columns"]]
            cols = {n: [r[i] for r in item["rows"]] for i, n in enumerate(names)}
            types = {c["text"]: c.get("type") for c in item["columns"]}
        elif isinstance(item, list) and all(isinstance(r, dict) for r in item):
            names = list(dict.fromkeys(k for r in item for k in r))
            cols = {n: [r.get(n) for r in item] for n in names}
            types = {n: None for n in names}
        else:
            raise AssertionError(f"Unsupported data format: {str(item)[:200]}")
        frames.append({"refId": item.get("refId") if isinstance(item, dict) else None,
                       "name": item.get("name") if isinstance(item, dict) else None,
                       "columns": cols, "types": types,
                       "meta": item.get("meta") if isinstance(item, dict) else None})
    return frames


def rows(frame: dict[str, Any]) -> list[dict[str, Any]]:
    cols = frame["columns"]
    n = max((len(v) for v in cols.values()), default=0)
    return [{k: (v[i] if i < len(v) else None) for k, v in cols.items()} for i in range(n)]


def link_url(url: str, state: State, row: dict[str, Any] | None = None, value: Any = None) -> str:
    """A data or panel link as Grafana renders it (query-param and percent formats where asked)."""
    data = dict(row or {})
    if value is not None:
        data["__value"] = value
    return interpolate(url, state, "raw", row=data)


def follow_link(url: str) -> tuple[str, dict[str, list[str]], dict[str, str]]:
    """/d/<uid>[/slug]?from=..&to=..&var-x=a&var-x=b -> (uid, {var: values}, {from, to})."""
    parts = urlsplit(url)
    m = re.match(r"^/d/([^/?]+)", parts.path)
    if not m:
        raise AssertionError(f"not a dashboard URL: {url}")
    values: dict[str, list[str]] = {}
    time: dict[str, str] = {}
    for key, val in parse_qsl(parts.query, keep_blank_values=True):
        if key.startswith("var-"):
            values.setdefault(key[4:], []).append(val)
        elif key in ("from", "to"):
            time[key] = val
    return m.group(1), values, time


def apply_url_values(state: State, values: dict[str, list[str]]) -> None:
    """URL sync: var-x=All / $__all selects All; a multi variable always holds a list."""
    for name, vals in values.items():
        var = state.variables[name]
        if var.include_all and vals in ([ALL_TEXT], [ALL_VALUE]):
            var.value = [ALL_VALUE] if var.multi else ALL_VALUE
        else:
            var.value = list(vals) if var.multi else (vals[0] if vals else "")
