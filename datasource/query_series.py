"""`timeseries`: aligned buckets, every bucket present, optional split with top N plus `other`."""

from __future__ import annotations

from typing import Any

from datasource.model import BadRequest, Field, Frame
from datasource.query_common import Ctx, nearest_rank, payload_choice, payload_int, ratio

MIN_STEP_MS = 1000
MAX_BUCKETS = 10_000
OTHER = "other"

# measure -> (kind, numerator SQL, denominator SQL or percentile); fixed SQL fragments only.
MEASURES: dict[str, tuple[str, str, Any]] = {
    "requests": ("sum", "count(*)", None),
    "successes": ("sum", "sum(failed = 0)", None),
    "failures": ("sum", "sum(failed)", None),
    "unusual": ("sum", "sum(status_class = 'unusual')", None),
    "success_rate": ("ratio", "sum(failed = 0)", "count(*)"),
    "failure_rate": ("ratio", "sum(failed)", "count(*)"),
    "latency_avg": ("ratio", "sum(CASE WHEN latency_ms > 0 THEN latency_ms ELSE 0 END)", "sum(latency_ms > 0)"),
    "latency_p50": ("pct", "latency_ms", 50),
    "latency_p95": ("pct", "latency_ms", 95),
    "latency_p99": ("pct", "latency_ms", 99),
    "ttft_p50": ("pct", "ttft_ms", 50),
    "ttft_p95": ("pct", "ttft_ms", 95),
    "tokens": ("sum", "sum(total_tokens)", None),
    "input_tokens": ("sum", "sum(norm_input_tokens)", None),
    "output_tokens": ("sum", "sum(output_tokens)", None),
    "cached_tokens": ("sum", "sum(norm_cache_read_tokens)", None),
    "reasoning_tokens": ("sum", "sum(reasoning_tokens)", None),
    "cost": ("sum", "sum(est_cost_usd)", None),
    "cache_hit_rate": ("ratio", "sum(norm_cache_read_tokens)", "sum(norm_input_tokens)"),
}
SPLITS: dict[str, str] = {
    "status_class": "status_class",
    "status_code": "coalesce(CAST(status_code AS TEXT), 'none')",
    "failure_type": "failure_type",
    "provider": "provider",
    "model": "analytics_model",
    "account": "account_key",
    "api_key": "coalesce(api_key_hash, '')",
    "request_type": "coalesce(request_type, 'unknown')",
    "instance": "instance",
}
UNITS = {"success_rate": "percentunit", "failure_rate": "percentunit", "cache_hit_rate": "percentunit",
         "cost": "currencyUSD"}

SUM_SQL = "SELECT ts_ms - (ts_ms % ?), {split}, {num}, {den}, count(*) FROM events WHERE {where} GROUP BY 1, 2"
PCT_SQL = "SELECT ts_ms - (ts_ms % ?), {split}, {col} FROM events WHERE {where} AND {col} > 0"
RANK_SQL = "SELECT {split}, count(*), {num} FROM events WHERE {where} GROUP BY 1"
LABEL_SQL = {
    "account": "SELECT account_key, max(account) FROM events WHERE {where} GROUP BY 1",
    "api_key": "SELECT coalesce(api_key_hash, ''), max(api_key_masked) FROM events WHERE {where} GROUP BY 1",
}


def bucket_step(from_ms: int, to_ms: int, interval_ms: int, max_data_points: int) -> int:
    """Bucket size: intervalMs, widened so the window fits maxDataPoints (and MAX_BUCKETS)."""
    span = max(to_ms - from_ms, 1)
    points = min(max_data_points if max_data_points > 0 else MAX_BUCKETS, MAX_BUCKETS)
    return max(interval_ms, -(-span // points), MIN_STEP_MS)


def bucket_times(from_ms: int, to_ms: int, step: int) -> list[int]:
    """Aligned bucket starts covering [from_ms, to_ms): the first is floor(from/step)*step."""
    return list(range(from_ms - from_ms % step, to_ms, step))


def _aggregate(ctx: Ctx, kind: str, num: str, den: Any, split: str, step: int) -> dict[tuple[int, str], list]:
    """(bucket, split value) -> [numerator, denominator] or the list of sample values."""
    where, params = ctx.where()
    out: dict[tuple[int, str], list] = {}
    if kind == "pct":
        for b, s, v in ctx.rows(PCT_SQL.format(split=split, col=num, where=where), [step, *params]):
            out.setdefault((b, s), []).append(v)
        return out
    sql = SUM_SQL.format(split=split, num=num, den=den or "0", where=where)
    for b, s, n, d, _ in ctx.rows(sql, [step, *params]):
        out[(b, s)] = [n or 0, d or 0]
    return out


def _top(ctx: Ctx, kind: str, num: str, split: str, top: int) -> list[str]:
    """The split values ranked by the measure (sums) or by requests (rates, percentiles)."""
    where, params = ctx.where()
    ranked = ctx.rows(RANK_SQL.format(split=split, num=num if kind == "sum" else "0", where=where), params)
    ranked.sort(key=lambda r: (-((r[2] if kind == "sum" else r[1]) or 0), -r[1], str(r[0])))
    return [str(r[0]) for r in ranked[:top]]


def _value(kind: str, parts: list | None, pct: Any) -> float | None:
    if kind == "sum":
        return parts[0] if parts else 0
    if not parts:
        return None
    if kind == "pct":
        return nearest_rank(sorted(parts), pct)
    return ratio(parts[0], parts[1])


def _merge(kind: str, into: list | None, parts: list) -> list:
    if into is None:
        return list(parts)
    if kind == "pct":
        return into + parts
    return [into[0] + parts[0], into[1] + parts[1]]


def _names(ctx: Ctx, split_by: str | None, keys: list[str]) -> dict[str, str]:
    if split_by not in LABEL_SQL:
        return {k: k for k in keys}
    where, params = ctx.where()
    found = {str(k): v for k, v in ctx.rows(LABEL_SQL[split_by].format(where=where), params)}
    if split_by == "account":
        names = {k: ctx.account_label(found.get(k), k) for k in keys}
    else:
        names = {k: ctx.api_key_label(k, found.get(k)) for k in keys}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {k: (n if counts[n] == 1 else f"{n} ({k[:12]})") for k, n in names.items()}


def timeseries(ctx: Ctx) -> list[Frame]:
    payload = ctx.spec.payload
    measure = payload_choice(payload, "measure", MEASURES, "requests")
    split_by = payload_choice(payload, "split_by", SPLITS, None)
    top = payload_int(payload, "top", 8, 1, 50)
    kind, num, arg = MEASURES[measure]
    spec = ctx.spec
    if spec.to_ms <= spec.from_ms:
        raise BadRequest("range: `to` must be after `from`")
    step = bucket_step(spec.from_ms, spec.to_ms, spec.interval_ms, spec.max_data_points)
    times = bucket_times(spec.from_ms, spec.to_ms, step)
    split = SPLITS[split_by] if split_by else "''"
    cells = _aggregate(ctx, kind, num, arg, split, step)
    keep = _top(ctx, kind, num, split, top) if split_by else [""]
    kept = set(keep)
    merged: dict[tuple[int, str], list] = {}
    for (b, s), parts in cells.items():
        series = str(s) if str(s) in kept else OTHER
        merged[(b, series)] = _merge(kind, merged.get((b, series)), parts)
    order = keep + ([OTHER] if any(s == OTHER for _, s in merged) else [])
    names = _names(ctx, split_by, keep) if split_by else {"": measure}
    names[OTHER] = OTHER
    config = {"unit": UNITS[measure]} if measure in UNITS else None
    fields = [Field("time", "time", times)]
    for s in order:
        values = [_value(kind, merged.get((b, s)), arg) for b in times]
        labels = {split_by: names[s]} if split_by else None
        fields.append(Field(names[s], "number", values, config, labels))
    meta = {"interval_ms": step, "measure": measure, "split_by": split_by}
    return [Frame(name=measure, fields=fields, meta=meta)]
