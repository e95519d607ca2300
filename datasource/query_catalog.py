"""What the API offers: the target catalogue for Builder mode, payload options, variable values."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from datasource import filters, interned
from datasource.model import BadRequest, Clause
from datasource.query_breakdown import DIMENSIONS, USAGE_DIMENSIONS
from datasource.query_common import api_key_display, events_where, mask_email
from datasource.query_series import MEASURES, SPLITS
from datasource.query_tables import ACCOUNT_SORTS
from datasource.query_annotations import KINDS

TARGET_LABELS: dict[str, str] = {
    "summary": "Summary (stat panels, with previous window)",
    "timeseries": "Time series",
    "accounts": "Account Overview",
    "api_keys": "API Key Summary",
    "requests": "Realtime Requests",
    "breakdown": "Breakdown by dimension",
    "account_actions": "Account Action Queue",
    "usage": "Usage Analytics",
    "collector": "Collector status",
    "annotations": "Annotations",
}
# Select payloads per target: name -> allowed values.
SELECTS: dict[str, dict[str, Iterable[str]]] = {
    "timeseries": {"measure": MEASURES, "split_by": SPLITS},
    "accounts": {"sort": ACCOUNT_SORTS},
    "breakdown": {"by": DIMENSIONS},
    "usage": {"by": USAGE_DIMENSIONS},
    "annotations": {"kind": KINDS},
}
INPUTS: dict[str, tuple[str, ...]] = {
    "timeseries": ("top",),
    "accounts": ("limit",),
    "api_keys": ("limit",),
    "requests": ("limit", "before_ms", "before_id"),
    "account_actions": ("limit",),
}
STATUS_WORDS = ("success", "failed", "unusual")
CACHE_WORDS = ("hit", "miss", "read", "creation")
# variable name -> value column, and the label column whose max() per value is its text (None:
# the value is its own text); fixed SQL fragments
VARIABLE_COLUMNS: dict[str, tuple[str, str | None]] = {
    "instance": ("instance", None),
    "provider": ("provider", None),
    "model": ("analytics_model", None),
    "project": ("project_id", None),
    "account": ("account_key", "account"),
    "api_key": ("api_key_hash", "api_key_masked"),
    "failure_type": ("failure_type", None),
    "request_type": ("request_type", None),
    "endpoint": ("endpoint", None),
    "status": ("status_code", None),
}
VARIABLES = tuple(VARIABLE_COLUMNS) + ("cache",)
VARIABLE_SQL = "SELECT {value}, {text} FROM events WHERE {where} AND {value} IS NOT NULL GROUP BY 1 ORDER BY 1 LIMIT 1000"
# A label column (datasource/interned.py) is grouped by its id, so each label is looked up once
# per group, not once per event; a `max(label)` text by (value id, label id) first, then by value
# (`+`: not in the key index's order, whose random row reads took 10 s over 30 days). On the 10 M
# file over 30 days, against schema step 11's text: account 24.5 -> 4.4 s, API key 9.7 -> 4.5 s,
# endpoint 3.6 -> 2.5 s, model 0.49 -> 0.40 s (docs/performance.md).
LABEL_VARIABLE_SQL = ("SELECT {value}, {value} FROM events WHERE {where} AND lid_{value} IS NOT NULL "
                      "GROUP BY lid_{value} ORDER BY 1 LIMIT 1000")
LABELLED_VARIABLE_SQL = ("SELECT value, max(text) FROM (SELECT {value} AS value, {text} AS text FROM events "
                         "WHERE {where} AND lid_{value} IS NOT NULL GROUP BY +lid_{value}, +lid_{text}) "
                         "GROUP BY 1 ORDER BY 1 LIMIT 1000")


def _variable_sql(value_col: str, label_col: str | None, where: str) -> str:
    if value_col in interned.INTERNED and label_col is None:
        return LABEL_VARIABLE_SQL.format(value=value_col, where=where)
    if value_col in interned.INTERNED and label_col in interned.INTERNED:
        return LABELLED_VARIABLE_SQL.format(value=value_col, text=label_col, where=where)
    text = value_col if label_col is None else f"max({label_col})"
    return VARIABLE_SQL.format(value=value_col, text=text, where=where)


def _options(values: Iterable[str]) -> list[dict[str, str]]:
    return [{"label": v, "value": v} for v in values]


def metrics() -> list[dict[str, Any]]:
    """Every target with its payload options (Builder mode), then the filter inputs."""
    out = []
    for target, label in TARGET_LABELS.items():
        payloads: list[dict[str, Any]] = []
        for name, values in SELECTS.get(target, {}).items():
            kind = "multi-select" if name == "kind" else "select"
            payloads.append({"name": name, "label": name, "type": kind, "options": _options(values)})
        for name in INPUTS.get(target, ()):
            payloads.append({"name": name, "label": name, "type": "input"})
        for key in filters.FILTER_KEYS:
            payloads.append({"name": key, "label": key, "type": "input"})
        out.append({"value": target, "label": label, "payloads": payloads})
    return out


def payload_options(metric: str, name: str, payload: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    if metric not in TARGET_LABELS:
        raise BadRequest(f"unknown target {metric!r}")
    values = SELECTS.get(metric, {}).get(name)
    if values is None:
        raise BadRequest(f"target {metric!r} has no select payload {name!r}")
    return _options(values)


def variable_values(conn: Any, name: str, from_ms: int, to_ms: int, clauses: Iterable[Clause], *,
                    aliases: Mapping[str, str] | None = None, mask_emails: bool = False) -> list[tuple[str, str]]:
    """(text, value) pairs of one dimension within the window; the variable's own filter is ignored."""
    if name == "cache":
        return [(w, w) for w in CACHE_WORDS]
    if name not in VARIABLE_COLUMNS:
        raise BadRequest(f"unknown variable {name!r}; known: {', '.join(VARIABLES)}")
    value_col, label_col = VARIABLE_COLUMNS[name]
    where, params = events_where([c for c in clauses if c.key != name], from_ms, to_ms)
    rows = list(conn.execute(_variable_sql(value_col, label_col, where), params))
    if name == "status":
        return [(w, w) for w in STATUS_WORDS] + [(str(v), str(v)) for v, _ in rows]
    out = []
    for value, text in rows:
        if name == "account":
            text = text or value
            text = mask_email(text) if mask_emails else text
        elif name == "api_key":
            text = api_key_display(value, text, aliases or {})
        out.append((str(text), str(value)))
    return out


def tag_keys() -> list[str]:
    return list(filters.FILTER_KEYS)


def tag_values(conn: Any, key: str, from_ms: int, to_ms: int, clauses: Iterable[Clause], *,
               mask_emails: bool = False) -> list[str]:
    """Values an ad hoc filter on `key` matches (free-text and numeric keys have none)."""
    if key not in filters.FILTER_KEYS:
        raise BadRequest(f"unknown filter key {key!r}")
    if key in ("min_latency_ms", "max_latency_ms", "trace_id", "search"):
        return []
    pairs = variable_values(conn, key, from_ms, to_ms, clauses, mask_emails=mask_emails)
    if key == "account":
        # A masked label no longer matches the stored one: offer the account key instead.
        return [value if mask_emails else text for text, value in pairs]
    if key == "api_key":
        return [value if text.startswith(("sha256:", "unknown")) else text for text, value in pairs]
    return [value for _, value in pairs]
