"""`breakdown` (requests and failures by one dimension) and `usage` (tokens and cost by one)."""

from __future__ import annotations

from typing import Any

from datasource.model import Frame
from datasource.query_common import UNITS, Ctx, payload_choice, ratio, sort_rows, table_frame
from datasource.query_plan import IDX, cost_usd, labels
from datasource.query_series import split_value

# dimension -> the key column it groups on (query_plan.GROUPS); labels for account and
# api_key are resolved like the timeseries split names.
DIMENSIONS: dict[str, str] = {
    "status_code": "status_code",
    "failure_type": "failure_type",
    "model": "analytics_model",
    "provider": "provider",
    "account": "account_key",
    "api_key": "api_key_hash",
    "request_type": "request_type",
    "cache": "cache_state",
    "instance": "instance",
    "status_class": "status_class",
}
USAGE_DIMENSIONS = ("model", "api_key", "account", "provider")

BREAKDOWN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "string"), ("label", "string"), ("requests", "number"), ("failures", "number"),
    ("share", "number"), ("failure_rate", "number"), ("total_tokens", "number"), ("est_cost_usd", "number"),
)
USAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "string"), ("label", "string"), ("requests", "number"), ("input_tokens", "number"),
    ("output_tokens", "number"), ("cached_tokens", "number"), ("reasoning_tokens", "number"),
    ("total_tokens", "number"), ("cache_hit_rate", "number"), ("est_cost_usd", "number"),
    ("cost_share", "number"),
)


def _groups(ctx: Ctx, by: str) -> list[dict[str, Any]]:
    column = DIMENSIONS[by]
    spec = ctx.spec
    sums = ctx.reader.sums(spec.from_ms, spec.to_ms, (column,))
    found = (labels(ctx.reader, column, [k for (k,) in sums], spec.from_ms, spec.to_ms)
             if by in ("account", "api_key") else {})
    out = []
    for (raw_key,), v in sums.items():
        key = split_value(by, raw_key)
        if by == "account":
            label = ctx.account_label(found.get(key), key)
        elif by == "api_key":
            label = ctx.api_key_label(key, found.get(key))
        else:
            label = key
        out.append({"key": key, "label": label, "requests": v[IDX["requests"]],
                    "failures": v[IDX["failures"]], "total_tokens": v[IDX["total_tokens"]],
                    "est_cost_usd": cost_usd(v[IDX["cost_nusd"]]), "cost_nusd": v[IDX["cost_nusd"]],
                    "input_tokens": v[IDX["norm_input_tokens"]],
                    "output_tokens": v[IDX["output_tokens"]], "cached_tokens": v[IDX["norm_cache_read_tokens"]],
                    "reasoning_tokens": v[IDX["reasoning_tokens"]]})
    return out


def breakdown(ctx: Ctx) -> list[Frame]:
    by = payload_choice(ctx.spec.payload, "by", DIMENSIONS, "status_code")
    rows = _groups(ctx, by)
    total = sum(r["requests"] for r in rows)
    for r in rows:
        r["share"] = ratio(r["requests"], total)
        r["failure_rate"] = ratio(r["failures"], r["requests"])
    rows = sort_rows(rows, (("requests", True), ("key", False)))
    names = [c for c, _ in BREAKDOWN_COLUMNS]
    return [table_frame("breakdown", BREAKDOWN_COLUMNS, [[r[c] for c in names] for r in rows], UNITS,
                        {"by": by})]


def usage(ctx: Ctx) -> list[Frame]:
    by = payload_choice(ctx.spec.payload, "by", USAGE_DIMENSIONS, "model")
    rows = _groups(ctx, by)
    total_cost = cost_usd(sum(r["cost_nusd"] for r in rows))  # integer sum: order-free
    for r in rows:
        r["cache_hit_rate"] = ratio(r["cached_tokens"], r["input_tokens"], clamp=True)
        r["cost_share"] = ratio(r["est_cost_usd"], total_cost)
    rows = sort_rows(rows, (("est_cost_usd", True), ("requests", True), ("key", False)))
    names = [c for c, _ in USAGE_COLUMNS]
    return [table_frame("usage", USAGE_COLUMNS, [[r[c] for c in names] for r in rows], UNITS, {"by": by})]
