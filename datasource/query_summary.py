"""`summary`: one row of totals for the window and the previous window of equal length."""

from __future__ import annotations

from typing import Any

from datasource.model import Frame
from datasource.query_common import UNITS, Ctx, change_pct, ratio, table_frame
from datasource.query_plan import SUMS, cost_usd, empty

SUMMARY_COLUMNS: tuple[str, ...] = (
    "requests", "successes", "failures", "success_rate", "unusual", "avg_latency_ms",
    "p50_latency_ms", "p95_latency_ms", "p99_latency_ms", "p50_ttft_ms", "p95_ttft_ms",
    "input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens", "cache_read_tokens",
    "cache_creation_tokens", "total_tokens", "cache_hit_rate", "est_cost_usd", "accounts", "api_keys",
)



def totals(ctx: Ctx, from_ms: int, to_ms: int) -> dict[str, Any]:
    """Every summary column over [from_ms, to_ms) with the spec's filters (rollups where exact)."""
    reader = ctx.reader
    sums = reader.sums(from_ms, to_ms).get((), empty())
    v = dict(zip(SUMS, sums))
    n, ok, failed, inp, cached = (v["requests"], v["successes"], v["failures"], v["norm_input_tokens"],
                                  v["norm_cache_read_tokens"])
    p50, p95, p99 = reader.distribution("latency_ms", from_ms, to_ms).percentiles((), (50, 95, 99))
    t50, t95 = reader.distribution("ttft_ms", from_ms, to_ms).percentiles((), (50, 95))
    return {
        "requests": n, "successes": ok, "failures": failed, "success_rate": ratio(ok, n),
        "unusual": v["unusual"], "avg_latency_ms": ratio(v["latency_sum_ms"], v["latency_samples"]),
        "p50_latency_ms": p50, "p95_latency_ms": p95, "p99_latency_ms": p99,
        "p50_ttft_ms": t50, "p95_ttft_ms": t95, "input_tokens": inp, "output_tokens": v["output_tokens"],
        "reasoning_tokens": v["reasoning_tokens"], "cached_tokens": cached,
        "cache_read_tokens": v["cache_read_tokens"], "cache_creation_tokens": v["cache_creation_tokens"],
        "total_tokens": v["total_tokens"], "cache_hit_rate": ratio(cached, inp, clamp=True),
        "est_cost_usd": cost_usd(v["cost_nusd"]),
        "accounts": len(reader.distinct("account_key", from_ms, to_ms, "-")),
        "api_keys": len(reader.distinct("api_key_hash", from_ms, to_ms, "")),
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
