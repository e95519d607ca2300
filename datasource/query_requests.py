"""`requests` (Realtime Requests): newest first, keyset pagination, sanitized columns only."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from datasource.model import BadRequest, Frame
from datasource.query_common import UNITS, Ctx, payload_int, table_frame

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
# The page is read newest slice first: 1 hour, doubling up to a day. Most filters fill it from
# the first slice; one that no index serves and few rows match (a search for a rare text, a
# regex) scans the window, ~1 s per day at 10 M events / 30 days. After SCAN_BUDGET_S the page
# ends where the scan got to: what it found, `has_more` with the cursor at that point, and a
# notice on the frame that the panel shows, instead of the whole query running into the limit.
FIRST_SLICE_MS = 3_600_000
MAX_SLICE_MS = 24 * 3_600_000
SCAN_BUDGET_S = 2.0

REQUEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "time"), ("id", "number"), ("request_id", "string"), ("trace_id", "string"),
    ("instance", "string"), ("provider", "string"), ("model", "string"), ("resolved_model", "string"),
    ("model_route", "string"), ("account", "string"), ("account_key", "string"), ("api_key", "string"),
    ("api_key_hash", "string"), ("request_type", "string"), ("endpoint", "string"),
    ("status_code", "number"), ("status_class", "string"), ("failure_type", "string"),
    ("latency_ms", "number"), ("ttft_ms", "number"), ("output_tps", "number"),
    ("input_tokens", "number"), ("output_tokens", "number"), ("cached_tokens", "number"),
    ("reasoning_tokens", "number"), ("cache_state", "string"), ("est_cost_usd", "number"),
    ("fail_summary", "string"),
)
# Never event_private, never a raw key: every column here is already sanitized by normalize.
REQUESTS_SQL = """
SELECT ts_ms, id, request_id, trace_id, instance, provider, model, resolved_model, account,
       account_key, api_key_hash, api_key_masked, request_type, endpoint, status_code, status_class,
       failure_type, latency_ms, ttft_ms, norm_input_tokens, output_tokens, norm_cache_read_tokens,
       reasoning_tokens, cache_state, est_cost_usd, fail_summary
FROM events
WHERE {where}
ORDER BY ts_ms DESC, id DESC
LIMIT ?
"""
# The next page: rows strictly before the cursor (ts_ms, id); without before_id (passed as
# -1, below every id) that is every row before before_ms.
REQUESTS_AFTER_SQL = REQUESTS_SQL.replace(
    "WHERE {where}", "WHERE {where} AND ts_ms <= ? AND (ts_ms < ? OR id < ?)")


def _cursor(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    values = []
    for name in ("before_ms", "before_id"):
        raw = payload.get(name)
        if raw in (None, ""):
            values.append(None)
            continue
        try:
            values.append(int(str(raw)))
        except ValueError:
            raise BadRequest(f"payload {name!r}: {raw!r} is not an integer") from None
    if values[0] is None and values[1] is not None:
        raise BadRequest("payload 'before_id' needs 'before_ms'")
    return values[0], values[1]


def _row(ctx: Ctx, r: tuple) -> dict[str, Any]:
    (ts, rid, request_id, trace_id, inst, provider, model, resolved, label, key, key_hash, masked,
     rtype, endpoint, code, sclass, ftype, latency, ttft, inp, out, cached, reasoning, cache,
     cost, summary) = r
    route = model if not resolved or resolved == model else f"{model} -> {resolved}"
    tps = out / (latency / 1000) if out and latency and out > 0 and latency > 0 else None
    return {
        "time": ts, "id": rid, "request_id": request_id, "trace_id": trace_id, "instance": inst,
        "provider": provider, "model": model, "resolved_model": resolved, "model_route": route,
        "account": ctx.account_label(label, key), "account_key": key,
        "api_key": ctx.api_key_label(key_hash, masked), "api_key_hash": key_hash,
        "request_type": rtype, "endpoint": endpoint, "status_code": code, "status_class": sclass,
        "failure_type": ftype, "latency_ms": latency, "ttft_ms": ttft, "output_tps": tps,
        "input_tokens": inp, "output_tokens": out, "cached_tokens": cached,
        "reasoning_tokens": reasoning, "cache_state": cache, "est_cost_usd": cost,
        "fail_summary": summary if sclass != "success" else None,
    }


def requests(ctx: Ctx) -> list[Frame]:
    """One page; meta carries `next_before_ms`/`next_before_id` and `has_more` (and `notices`
    when the page stopped at the scan budget)."""
    payload = ctx.spec.payload
    limit = payload_int(payload, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    before_ms, before_id = _cursor(payload)
    spec = ctx.spec
    if before_ms is None:
        sql, cursor = REQUESTS_SQL, []
    else:
        sql, cursor = REQUESTS_AFTER_SQL, [before_ms, before_ms, -1 if before_id is None else before_id]
    # the newest ts_ms the cursor lets through, + 1 (with before_id, rows at before_ms itself)
    top = spec.to_ms if before_ms is None else min(spec.to_ms, before_ms + (before_id is not None))
    found: list[tuple] = []
    started, size, stopped_at = time.monotonic(), FIRST_SLICE_MS, None
    while top > spec.from_ms and len(found) <= limit:
        if size > FIRST_SLICE_MS and time.monotonic() - started > SCAN_BUDGET_S:  # after the first slice
            stopped_at = top
            break
        low = max(spec.from_ms, top - size)
        # Alias keys (account, model, api key, provider) narrowed to their key column when exact
        # (query_plan.translate), so events(account_key, ts_ms) and friends serve the newest rows.
        where, params = ctx.reader.raw_where(low, top, shared_search=False)
        found += ctx.rows(sql.format(where=where), [*params, *cursor, limit + 1 - len(found)])
        top, size = low, min(MAX_SLICE_MS, size * 2)
    has_more = len(found) > limit or stopped_at is not None
    rows = [_row(ctx, r) for r in found[:limit]]
    meta: dict[str, Any] = {"has_more": has_more, "next_before_ms": None, "next_before_id": None}
    if len(found) > limit:
        meta["next_before_ms"], meta["next_before_id"] = rows[-1]["time"], rows[-1]["id"]
    elif stopped_at is not None:
        # every row from stopped_at on was read: the next page is everything before it
        meta["next_before_ms"] = stopped_at
        when = datetime.fromtimestamp(stopped_at / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        meta["notices"] = [{"severity": "warning", "text": (
            f"{len(rows)} rows from {when} on: these filters scan every event and the scan stopped "
            f"after {SCAN_BUDGET_S:g} s; narrow the time range or the filters to see older rows")}]
    names = [c for c, _ in REQUEST_COLUMNS]
    return [table_frame("requests", REQUEST_COLUMNS, [[r[c] for c in names] for r in rows], UNITS, meta)]
