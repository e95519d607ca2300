"""Every filter against every target, with the expected matching events computed by hand."""

from __future__ import annotations

import pytest

from datasource import query
from datasource.filters import clauses_from_adhoc, clauses_from_payload
from test_query import A, HOUR, K1_HASH, T10, columns, rows, spec  # noqa: F401  (db fixture below)
from test_query import db  # noqa: F401

ALL = {f"r{i:02d}" for i in range(1, 11)}
ACTION_EVENTS = {"r03": 1, "r05": 1, "r06": 1}  # failed events with an account action
FAILED = {"r03", "r05", "r06", "r07", "r10"}

# (id, payload filters or ad hoc list, matching request ids, credential errors kept (of 2))
CASES = [
    ("instance", {"instance": "east"}, {"r07", "r08"}, 0),
    ("provider", {"provider": "claude"}, {"r07", "r08"}, 0),
    ("model-analytics", {"model": "beta-2"}, {"r04", "r05", "r06"}, 0),
    ("model-requested", {"model": "beta-2(high)"}, {"r04", "r05"}, 0),
    ("model-regex-multi", {"model": "(alpha-1|gamma-3)"}, ALL - {"r04", "r05", "r06"}, 2),
    ("project", {"project": "p1"}, set(), 2),
    ("account-key", {"account": A}, {"r01", "r02", "r03", "r10"}, 2),
    ("account-label", {"account": "bob@example.com"}, {"r04", "r05", "r06"}, 0),
    ("account-regex-escaped", {"account": "(bob@example\\.com|cccc000000000003)"},
     {"r04", "r05", "r06", "r07", "r08"}, 0),
    ("account-glob", {"account": "{aaaa000000000001,cccc000000000003}"},
     {"r01", "r02", "r03", "r10", "r07", "r08"}, 2),
    ("api-key-hash", {"api_key": K1_HASH}, {"r01", "r02", "r04", "r08", "r10"}, 2),
    ("api-key-masked", {"api_key": ["sk******02"]}, {"r03", "r05", "r06", "r07"}, 2),
    ("status-success", {"status": "success"}, {"r01", "r02", "r04", "r08", "r09"}, 2),
    ("status-failed", {"status": "failed"}, FAILED, 2),
    ("status-unusual", {"status": "unusual"}, {"r09"}, 2),
    ("status-code", {"status": 429}, {"r03"}, 2),
    ("status-4xx", {"status": "4xx"}, {"r03", "r05", "r06"}, 2),
    ("status-5xx", {"status": "5xx"}, {"r07", "r10"}, 2),
    ("status-mixed", {"status": ["401", "5xx"]}, {"r05", "r06", "r07", "r10"}, 2),
    ("failure-type", {"failure_type": "auth"}, {"r05", "r06"}, 2),
    ("request-type", {"request_type": "ClaudeExecutor"}, {"r07", "r08"}, 2),
    ("endpoint", {"endpoint": "POST /v1/responses"}, ALL, 2),
    ("cache-hit", {"cache": "hit"}, {"r01", "r08"}, 2),
    ("cache-miss", {"cache": "miss"}, ALL - {"r01", "r08"}, 2),
    ("cache-read", {"cache": "read"}, {"r01"}, 2),
    ("cache-creation", {"cache": "creation"}, {"r08"}, 2),
    ("min-latency", {"min_latency_ms": "3000"}, {"r04", "r07", "r08"}, 2),
    ("max-latency", {"max_latency_ms": 500}, {"r03", "r05", "r06"}, 2),
    ("trace-id", {"trace_id": "req_trace_10"}, {"r10"}, 2),
    ("trace-id-is-request-id", {"trace_id": "r04"}, {"r04"}, 2),
    ("search-summary", {"search": "exploded"}, {"r07"}, 2),
    ("search-percent-literal", {"search": "50%"}, {"r07"}, 2),
    ("search-underscore-literal", {"search": "ofXthe"}, set(), 2),
    ("all-forms", {"provider": "All", "model": "$__all", "account": "__all__", "status": "*",
                   "instance": ".*", "cache": "", "api_key": [], "failure_type": ["__all__"]}, ALL, 2),
    ("combined", {"provider": "codex", "status": "failed"}, {"r03", "r05", "r06", "r10"}, 2),
    ("adhoc-not-equal", [{"key": "provider", "operator": "!=", "value": "codex"}], {"r07", "r08"}, 0),
    ("adhoc-regex", [{"key": "model", "operator": "=~", "value": "^gam"}], {"r07", "r08"}, 0),
    ("adhoc-not-regex", [{"key": "account", "operator": "!~", "value": "^aaaa"}],
     {"r04", "r05", "r06", "r07", "r08", "r09"}, 0),
    ("adhoc-status-gt", [{"key": "status", "operator": ">", "value": "499"}], {"r07", "r10"}, 2),
    ("adhoc-latency-gt", [{"key": "min_latency_ms", "operator": ">", "value": "3000"}], {"r04", "r08"}, 2),
    ("adhoc-status-not-success", [{"key": "status", "operator": "!=", "value": "success"}], FAILED, 2),
    ("adhoc-multi", [{"key": "instance", "operator": "=|", "values": ["east", "west"]}], {"r07", "r08"}, 0),
]
TARGETS = ["summary", "timeseries", "accounts", "api_keys", "requests", "breakdown", "usage",
           "account_actions", "annotations", "collector"]


def _clauses(filters):
    return clauses_from_adhoc(filters) if isinstance(filters, list) else clauses_from_payload(filters)


def _total_requests(target, frame):
    cols = columns(frame)
    if target == "summary":
        return cols["requests"][0]
    if target == "timeseries":
        return sum(cols["requests"])
    if target == "requests":
        return len(cols["request_id"])
    return sum(cols["requests"])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name,filters,expected,creds", CASES, ids=[c[0] for c in CASES])
def test_filter_against_target(db, target, name, filters, expected, creds):
    clauses = _clauses(filters)
    payload = {"kind": "failure_spikes"} if target == "annotations" else {}
    [frame] = query.execute(db, spec(target, payload, clauses, interval_ms=HOUR if target == "annotations" else 15 * 60_000))
    if target == "requests":
        assert {r["request_id"] for r in rows(frame)} == expected
    elif target == "account_actions":
        hits = sum(columns(frame)["hits"])
        assert hits == sum(ACTION_EVENTS.get(r, 0) for r in expected) + creds
    elif target == "annotations":
        # one 1 h bucket; the baseline (p02 only) is at most 1/6, so 3 failures make a spike
        assert len(rows(frame)) == (1 if len(expected & FAILED) >= 3 else 0)
    elif target == "collector":
        instance_only = [c for c in clauses if c.key == "instance"]
        kept = 0 if instance_only and name in ("instance", "adhoc-multi") else 1
        assert len(rows(frame)) == kept
    else:
        assert _total_requests(target, frame) == len(expected)
