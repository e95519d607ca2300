"""Temporary stand-in for datasource.query until the real module is committed (tests only)."""
from __future__ import annotations

import sys
from typing import Any

from datasource.model import BadRequest, Field, Frame, TargetSpec

TARGETS = ("summary", "timeseries", "accounts", "api_keys", "requests", "breakdown",
           "account_actions", "usage", "collector", "annotations")


def metrics() -> list[dict]:
    return [{"value": t, "label": t, "payloads": []} for t in TARGETS]


def payload_options(metric: str, name: str, payload: dict) -> list[dict]:
    if metric != "timeseries" or name != "split_by":
        raise BadRequest(f"no options for {metric}.{name}")
    return [{"label": "Provider", "value": "provider"}]


def execute(conn: Any, spec: TargetSpec, *, aliases: dict, mask_emails: bool) -> list[Frame]:
    if spec.target not in TARGETS:
        raise BadRequest(f"unknown target {spec.target!r}")
    if spec.target == "collector":
        return [Frame("collector", [Field("instance", "string", ["default"]), Field("url", "string", ["http://127.0.0.1:8317"]),
                                     Field("state", "string", ["running"])])]
    count = conn.execute("SELECT count(*) FROM events WHERE ts_ms >= ? AND ts_ms < ?", (spec.from_ms, spec.to_ms)).get
    return [Frame(spec.target, [Field("requests", "number", [count])])]


def variable_values(conn, name, from_ms, to_ms, clauses):
    return [("codex", "codex")]


def tag_keys() -> list[str]:
    return ["provider", "min_latency_ms"]


def tag_values(conn, key, from_ms, to_ms, clauses):
    return ["codex"]


def install() -> None:
    try:
        import datasource.query  # noqa: F401
    except ImportError:
        sys.modules["datasource.query"] = sys.modules[__name__]
