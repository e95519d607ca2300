"""`summary`: one row of totals for the window and the previous window of equal length."""

from __future__ import annotations

from typing import Any

from datasource.model import Frame
from datasource.query_common import UNITS, Ctx, change_pct, nearest_rank, ratio, table_frame

SUMMARY_COLUMNS: tuple[str, ...] = (
    "requests", "successes", "failures", "success_rate", "unusual", "avg_latency_ms",
    "p50_latency_ms", "p95_latency_ms", "p99_latency_ms", "p50_ttft_ms", "p95_ttft_ms",
    "input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens", "cache_read_tokens",
    "cache_creation_tokens", "total_tokens", "cache_hit_rate", "est_cost_usd", "accounts", "api_keys",
)

# Sums over the filtered window; cached_tokens is every input token served from cache
# (CPA's legacy mirror plus cache reads: norm_cache_read_tokens), see docs/filters.md.
TOTALS_SQL = """
SELECT count(*), coalesce(sum(failed = 0), 0), coalesce(sum(failed), 0),
       coalesce(sum(status_class = 'unusual'), 0), avg(nullif(latency_ms, 0)),
       coalesce(sum(norm_input_tokens), 0), coalesce(sum(output_tokens), 0),
       coalesce(sum(reasoning_tokens), 0), coalesce(sum(norm_cache_read_tokens), 0),
       coalesce(sum(cache_read_tokens), 0), coalesce(sum(cache_creation_tokens), 0),
       coalesce(sum(total_tokens), 0), coalesce(sum(est_cost_usd), 0),
       count(DISTINCT nullif(account_key, '-')), count(DISTINCT nullif(api_key_hash, ''))
FROM events WHERE {where}
"""
LATENCY_SQL = "SELECT latency_ms FROM events WHERE {where} AND latency_ms > 0 ORDER BY latency_ms"
TTFT_SQL = "SELECT ttft_ms FROM events WHERE {where} AND ttft_ms > 0 ORDER BY ttft_ms"


def totals(ctx: Ctx, from_ms: int, to_ms: int) -> dict[str, Any]:
    """Every summary column over [from_ms, to_ms) with the spec's filters."""
    where, params = ctx.where(from_ms, to_ms)
    (n, ok, failed, unusual, avg_lat, inp, out, reasoning, cached, read, creation, total, cost,
     accounts, keys) = ctx.rows(TOTALS_SQL.format(where=where), params)[0]
    latencies = [r[0] for r in ctx.rows(LATENCY_SQL.format(where=where), params)]
    ttfts = [r[0] for r in ctx.rows(TTFT_SQL.format(where=where), params)]
    return {
        "requests": n, "successes": ok, "failures": failed, "success_rate": ratio(ok, n),
        "unusual": unusual, "avg_latency_ms": avg_lat,
        "p50_latency_ms": nearest_rank(latencies, 50), "p95_latency_ms": nearest_rank(latencies, 95),
        "p99_latency_ms": nearest_rank(latencies, 99), "p50_ttft_ms": nearest_rank(ttfts, 50),
        "p95_ttft_ms": nearest_rank(ttfts, 95), "input_tokens": inp, "output_tokens": out,
        "reasoning_tokens": reasoning, "cached_tokens": cached, "cache_read_tokens": read,
        "cache_creation_tokens": creation, "total_tokens": total,
        "cache_hit_rate": ratio(cached, inp, clamp=True), "est_cost_usd": cost,
        "accounts": accounts, "api_keys": keys,
    }


def summary(ctx: Ctx) -> list[Frame]:
    spec = ctx.spec
    length = spec.to_ms - spec.from_ms
    current = totals(ctx, spec.from_ms, spec.to_ms)
    previous = totals(ctx, spec.from_ms - length, spec.from_ms)
    columns: list[tuple[str, str]] = []
    row: list[Any] = []
    for name in SUMMARY_COLUMNS:
        columns.append((name, "number"))
        row.append(current[name])
    for name in SUMMARY_COLUMNS:
        columns.append((f"prev_{name}", "number"))
        row.append(previous[name])
    for name in SUMMARY_COLUMNS:
        columns.append((f"{name}_change_pct", "number"))
        row.append(change_pct(current[name], previous[name]))
    units = {c: UNITS[c] for c in SUMMARY_COLUMNS if c in UNITS}
    units.update({f"prev_{c}": u for c, u in list(units.items())})
    units.update({c: "ms" for c, _ in columns if c.endswith(("latency_ms", "ttft_ms"))})
    return [table_frame("summary", columns, [row], units)]
