"""`timeseries`: aligned buckets, every bucket present, optional split with top N plus `other`."""

from __future__ import annotations

from typing import Any

from datasource.model import BadRequest, Field, Frame
from datasource.query_common import Ctx, payload_choice, payload_int, ratio
from datasource.query_plan import cost_usd, labels

MIN_STEP_MS = 1000
MAX_BUCKETS = 10_000
OTHER = "other"
OTHER_KEY = object()  # the folded rest of a split, before it is named OTHER

# measure -> (kind, numerator, denominator or percentile): sums and ratios of query_plan.SUMS
# fields, percentiles of a latency column.
MEASURES: dict[str, tuple[str, str, Any]] = {
    "requests": ("sum", "requests", None),
    "successes": ("sum", "successes", None),
    "failures": ("sum", "failures", None),
    "unusual": ("sum", "unusual", None),
    "success_rate": ("ratio", "successes", "requests"),
    "failure_rate": ("ratio", "failures", "requests"),
    "latency_avg": ("ratio", "latency_sum_ms", "latency_samples"),
    "latency_p50": ("pct", "latency_ms", 50),
    "latency_p95": ("pct", "latency_ms", 95),
    "latency_p99": ("pct", "latency_ms", 99),
    "ttft_p50": ("pct", "ttft_ms", 50),
    "ttft_p95": ("pct", "ttft_ms", 95),
    "tokens": ("sum", "total_tokens", None),
    "input_tokens": ("sum", "norm_input_tokens", None),
    "output_tokens": ("sum", "output_tokens", None),
    "cached_tokens": ("sum", "norm_cache_read_tokens", None),
    "reasoning_tokens": ("sum", "reasoning_tokens", None),
    "cost": ("sum", "cost_nusd", None),
    "cache_hit_rate": ("ratio", "norm_cache_read_tokens", "norm_input_tokens"),
}
# split_by -> the key column it groups on (query_plan.GROUPS)
SPLITS: dict[str, str] = {
    "status_class": "status_class",
    "status_code": "status_code",
    "failure_type": "failure_type",
    "provider": "provider",
    "model": "analytics_model",
    "account": "account_key",
    "api_key": "api_key_hash",
    "request_type": "request_type",
    "instance": "instance",
}
UNITS = {"success_rate": "percentunit", "failure_rate": "percentunit", "cache_hit_rate": "percentunit",
         "cost": "currencyUSD"}


def split_value(split_by: str | None, value: Any) -> str:
    """A split key as shown: no status code is `none`, no request type `unknown`."""
    if split_by == "status_code":
        return "none" if not value else str(value)
    if split_by == "request_type":
        return value or "unknown"
    return "" if value is None else str(value)


def bucket_step(from_ms: int, to_ms: int, interval_ms: int, max_data_points: int) -> int:
    """Bucket size: intervalMs, widened so the window fits maxDataPoints (and MAX_BUCKETS)."""
    span = max(to_ms - from_ms, 1)
    points = min(max_data_points if max_data_points > 0 else MAX_BUCKETS, MAX_BUCKETS)
    return max(interval_ms, -(-span // points), MIN_STEP_MS)


def bucket_times(from_ms: int, to_ms: int, step: int) -> list[int]:
    """Aligned bucket starts covering [from_ms, to_ms): the first is floor(from/step)*step."""
    return list(range(from_ms - from_ms % step, to_ms, step))


def _names(ctx: Ctx, split_by: str | None, keys: list[str]) -> dict[str, str]:
    if split_by not in ("account", "api_key"):
        return {k: k for k in keys}
    spec = ctx.spec
    found = labels(ctx.reader, SPLITS[split_by], keys, spec.from_ms, spec.to_ms)
    if split_by == "account":
        names = {k: ctx.account_label(found.get(k), k) for k in keys}
    else:
        names = {k: ctx.api_key_label(k, found.get(k)) for k in keys}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {k: (n if counts[n] == 1 else f"{n} ({k[:12]})") for k, n in names.items()}


def _ranked(totals: dict[str, tuple[Any, int]], top: int) -> list[str]:
    """Split values by measure total, then requests, then name; the first `top`."""
    ranked = sorted(totals.items(), key=lambda kv: (-(kv[1][0] or 0), -kv[1][1], kv[0]))
    return [k for k, _ in ranked[:top]]


def _value(kind: str, num: str, parts: Any, pct: Any) -> float | None:
    if kind == "sum":
        value = parts[0] if parts else 0
        return cost_usd(value) if num == "cost_nusd" else value
    if not parts:
        return None
    if kind == "pct":
        if isinstance(parts, tuple):  # (distributions, key)
            return parts[0].percentiles(parts[1], [pct])[0]
        return parts.percentiles((), [pct])[0]
    return ratio(parts[0], parts[1])


def _split_from_raw(reader: Any, from_ms: int, to_ms: int, kind: str, num: str, arg: Any, split_by: str,
                    group: tuple[str, ...], step: int, top: int) -> tuple[list[str], dict[tuple[int, Any], list[Any]]]:
    """A split series only raw events can answer, in one read: the ranking and the cells that ranking
    first and then folding the rest into `other` in SQL give (two scans of the same rows), summed
    in Python from per-bucket sums of every split value. SQL folds a value unless it is IN the kept
    raw values, so a NULL value goes to `other` even when its shown name ranks; so it does here.
    """
    measures = list(dict.fromkeys((num, "requests", arg or "requests")))
    i_num, i_req, i_den = (measures.index(m) for m in (num, "requests", arg or "requests"))
    rows = reader.sums(from_ms, to_ms, group, step=step, measures=measures)
    totals: dict[str, tuple[Any, int]] = {}
    raw_values: dict[str, list[Any]] = {}
    for (_, raw_val), parts in rows.items():
        s_val = split_value(split_by, raw_val)
        have = totals.get(s_val)
        if have is None:
            totals[s_val] = (parts[i_num], parts[i_req])
            raw_values[s_val] = [raw_val]
        else:
            totals[s_val] = (have[0] + parts[i_num], have[1] + parts[i_req])
            if raw_val not in raw_values[s_val]:
                raw_values[s_val].append(raw_val)
    if kind != "sum":
        totals = {k: (r, r) for k, (_, r) in totals.items()}
    keep = _ranked(totals, top)
    kept_raw = {raw for s_val in keep for raw in raw_values[s_val] if raw is not None}
    cells: dict[tuple[int, Any], list[Any]] = {}
    for (b, raw_val), parts in rows.items():
        s_val = split_value(split_by, raw_val) if raw_val in kept_raw else OTHER_KEY
        n, d = parts[i_num], (parts[i_den] if arg else 0)
        have = cells.get((b, s_val))
        cells[(b, s_val)] = [n, d] if have is None else [have[0] + n, have[1] + d]
    return keep, cells


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
    group = (SPLITS[split_by],) if split_by else ()
    reader = ctx.reader
    exact = (reader.exact_series(num, spec.from_ms, spec.to_ms, step, arg)
             if kind == "pct" and not split_by else None)
    if exact is not None:
        config = {"unit": UNITS[measure]} if measure in UNITS else None
        fields = [Field("time", "time", times), Field(measure, "number", [exact.get(b) for b in times], config)]
        return [Frame(name=measure, fields=fields, meta={"interval_ms": step, "measure": measure, "split_by": None})]
    if kind == "pct":
        dist = reader.distribution(num, spec.from_ms, spec.to_ms, group, step=step)
        cells = {(b, split_value(split_by, s[0]) if s else ""): (b, *s) for b, *s in dist.keys()}
        totals = {}
        if split_by:
            for (s_val,), (n,) in reader.sums(spec.from_ms, spec.to_ms, group, measures=("requests",)).items():
                totals[split_value(split_by, s_val)] = (n, n)
        keep = _ranked(totals, top) if split_by else [""]
    elif split_by and not reader.plan(spec.from_ms, spec.to_ms, group, step=step).uses_rollups:
        keep, cells = _split_from_raw(reader, spec.from_ms, spec.to_ms, kind, num, arg, split_by, group,
                                      step, top)
    else:
        keep_raw = None
        keep = [""]
        if split_by:
            # rank first (no time buckets: whole days can answer), then fold the rest into `other` in SQL
            totals = {}
            raw_values: dict[str, list[Any]] = {}
            for (raw_val,), (n, r) in reader.sums(spec.from_ms, spec.to_ms, group, measures=(num, "requests")).items():
                s_val = split_value(split_by, raw_val)
                have = totals.get(s_val, (0, 0))
                totals[s_val] = (have[0] + n, have[1] + r)
                raw_values.setdefault(s_val, []).append(raw_val)
            if kind != "sum":
                totals = {k: (r, r) for k, (_, r) in totals.items()}
            keep = _ranked(totals, top)
            keep_raw = [raw for s_val in keep for raw in raw_values[s_val]]
        wanted = (num, arg or "requests")
        sums = reader.sums(spec.from_ms, spec.to_ms, group, step=step, measures=wanted, keep=keep_raw)
        cells = {}
        for (b, *s), (n, d) in sums.items():
            s_val = (OTHER_KEY if s[0] is None else split_value(split_by, s[0])) if s else ""
            have = cells.get((b, s_val))
            cells[(b, s_val)] = [n, d if arg else 0] if have is None else [have[0] + n, have[1] + (d if arg else 0)]
    kept = set(keep)
    merged: dict[tuple[int, str], Any] = {}
    if kind == "pct":
        groups: dict[tuple[int, str], list[tuple]] = {}
        for (b, s_val), key in cells.items():
            groups.setdefault((b, s_val if s_val in kept else OTHER), []).append(key)
        for cell, keys in groups.items():
            merged[cell] = dist.merged(keys) if len(keys) > 1 or cell[1] == OTHER else (dist, keys[0])
    else:
        for (b, s_val), parts in cells.items():
            series = s_val if s_val in kept else OTHER  # OTHER_KEY: folded in SQL
            have = merged.get((b, series))
            merged[(b, series)] = list(parts) if have is None else [have[0] + parts[0], have[1] + parts[1]]
    order = keep + ([OTHER] if any(s == OTHER for _, s in merged) else [])
    names = _names(ctx, split_by, keep) if split_by else {"": measure}
    names[OTHER] = OTHER
    config = {"unit": UNITS[measure]} if measure in UNITS else None
    fields = [Field("time", "time", times)]
    for s in order:
        values = [_value(kind, num, merged.get((b, s)), arg) for b in times]
        series_labels = {split_by: names[s]} if split_by else None
        fields.append(Field(names[s], "number", values, config, series_labels))
    meta = {"interval_ms": step, "measure": measure, "split_by": split_by}
    return [Frame(name=measure, fields=fields, meta=meta)]
