"""`breakdown` (requests and failures by one dimension) and `usage` (tokens and cost by one)."""

from __future__ import annotations

from typing import Any

from datasource.model import Frame
from datasource.query_common import UNITS, Ctx, payload_choice, ratio, sort_rows, table_frame

# dimension -> (key SQL, label SQL); label is resolved in Python for account and api_key.
DIMENSIONS: dict[str, tuple[str, str]] = {
    "status_code": ("coalesce(CAST(status_code AS TEXT), 'none')", "''"),
    "failure_type": ("failure_type", "''"),
    "model": ("analytics_model", "''"),
    "provider": ("provider", "''"),
    "account": ("account_key", "max(account)"),
    "api_key": ("coalesce(api_key_hash, '')", "max(api_key_masked)"),
    "request_type": ("coalesce(request_type, 'unknown')", "''"),
    "cache": ("cache_state", "''"),
    "instance": ("instance", "''"),
    "status_class": ("status_class", "''"),
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
GROUP_SQL = """
SELECT {key}, {label}, count(*), coalesce(sum(failed), 0), coalesce(sum(total_tokens), 0),
       coalesce(sum(est_cost_usd), 0), coalesce(sum(norm_input_tokens), 0),
       coalesce(sum(output_tokens), 0), coalesce(sum(norm_cache_read_tokens), 0),
       coalesce(sum(reasoning_tokens), 0)
FROM events WHERE {where} GROUP BY 1
"""


def _groups(ctx: Ctx, by: str) -> list[dict[str, Any]]:
    key_sql, label_sql = DIMENSIONS[by]
    where, params = ctx.where()
    out = []
    for key, label, n, failed, tokens, cost, inp, out_t, cached, reasoning in ctx.rows(
            GROUP_SQL.format(key=key_sql, label=label_sql, where=where), params):
        key = str(key)
        if by == "account":
            label = ctx.account_label(label, key)
        elif by == "api_key":
            label = ctx.api_key_label(key, label)
        else:
            label = key
        out.append({"key": key, "label": label, "requests": n, "failures": failed, "total_tokens": tokens,
                    "est_cost_usd": cost, "input_tokens": inp, "output_tokens": out_t,
                    "cached_tokens": cached, "reasoning_tokens": reasoning})
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
    total_cost = sum(r["est_cost_usd"] for r in rows)
    for r in rows:
        r["cache_hit_rate"] = ratio(r["cached_tokens"], r["input_tokens"], clamp=True)
        r["cost_share"] = ratio(r["est_cost_usd"], total_cost)
    rows = sort_rows(rows, (("est_cost_usd", True), ("requests", True), ("key", False)))
    names = [c for c, _ in USAGE_COLUMNS]
    return [table_frame("usage", USAGE_COLUMNS, [[r[c] for c in names] for r in rows], UNITS, {"by": by})]
