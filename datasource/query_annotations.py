"""`annotations` (failure spikes, collector gaps, account status changes) and `collector`.

Failure spike rule (docs/filters.md): buckets as for `timeseries`; the baseline of a bucket
is the mean failure count of the BASELINE_BUCKETS buckets before it (empty ones count as 0,
buckets before the window are read too). A bucket is a spike when its failures are at least
max(SPIKE_MIN_FAILURES, SPIKE_FACTOR x baseline) and above the baseline.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from datasource import filters, store_status
from datasource.model import BadRequest, Frame
from datasource.query_common import UNITS, Ctx, table_frame
from datasource.query_series import bucket_step, bucket_times

KINDS = ("failure_spikes", "collector_gaps", "account_status")
BASELINE_BUCKETS = 6
SPIKE_MIN_FAILURES = 3
SPIKE_FACTOR = 2.0

ANNOTATION_COLUMNS = (("time", "time"), ("timeEnd", "time"), ("title", "string"), ("text", "string"),
                      ("tags", "string"))
COLLECTOR_COLUMNS = (
    ("instance", "string"), ("url", "string"), ("state", "string"), ("transport", "string"),
    ("mode", "string"), ("last_consumed", "time"), ("last_inserted", "time"), ("lag_s", "number"),
    ("inserted", "number"), ("duplicates", "number"), ("dead_letters", "number"),
    ("last_error", "string"), ("last_error_stage", "string"), ("last_error_at", "time"),
    ("usage_publishing", "boolean"), ("queue_retention_s", "number"), ("warnings", "string"),
)
EPISODES_SQL = """
SELECT start_ms, coalesce(end_ms, ?), instance, kind, detail FROM collector_episodes
WHERE start_ms < ? AND coalesce(end_ms, ?) >= ? AND {where} ORDER BY start_ms, id
"""
STATUS_CHANGES_SQL = """
SELECT ts_ms, instance, auth_index, label, old_status, new_status FROM account_status_changes
WHERE ts_ms >= ? AND ts_ms < ? AND {where} ORDER BY ts_ms, id
"""
COLLECTOR_SQL = """
SELECT instance, url, state, transport, mode, last_consumed_ms, last_inserted_ms, inserted, duplicates,
       dead_letters, last_error, last_error_stage, last_error_ms, usage_publishing, queue_retention_s,
       warnings, updated_ms
FROM collector_status WHERE {where} ORDER BY instance
"""


def _kinds(payload: dict[str, Any]) -> list[str]:
    raw = payload.get("kind")
    values = filters.expand_value(raw, "kind") if raw is not None else ()
    chosen = [v for v in values if v in KINDS] if values else list(KINDS)
    unknown = [v for v in values if v not in KINDS]
    if unknown:
        raise BadRequest(f"payload 'kind': {unknown[0]!r} is not one of {', '.join(KINDS)}")
    return chosen


def failure_spikes(ctx: Ctx) -> list[tuple]:
    spec = ctx.spec
    step = bucket_step(spec.from_ms, spec.to_ms, spec.interval_ms, spec.max_data_points)
    times = bucket_times(spec.from_ms, spec.to_ms, step)
    start = times[0] - BASELINE_BUCKETS * step if times else spec.from_ms
    sums = ctx.reader.sums(start, spec.to_ms, step=step, measures=("requests", "failures"))
    counts = {b: (n, f) for (b,), (n, f) in sums.items()}
    out = []
    for b in times:
        baseline = sum(counts.get(b - i * step, (0, 0))[1] for i in range(1, BASELINE_BUCKETS + 1))
        baseline /= BASELINE_BUCKETS
        n, failed = counts.get(b, (0, 0))
        if failed >= max(SPIKE_MIN_FAILURES, SPIKE_FACTOR * baseline) and failed > baseline:
            text = f"{failed} of {n} requests failed; baseline {baseline:g} failures per bucket"
            out.append((b, b + step, f"Failure spike: {failed} failures", text, "failure_spike"))
    return out


def collector_gaps(ctx: Ctx) -> list[tuple]:
    spec = ctx.spec
    where, params = filters.where_sql(spec.clauses, filters.COLLECTOR_COLUMNS)
    rows = ctx.rows(EPISODES_SQL.format(where=where),
                    [spec.now_ms, spec.to_ms, spec.now_ms, spec.from_ms, *params])
    return [(start, end, f"Collector {kind}: {inst}", detail or "", f"collector,{kind}")
            for start, end, inst, kind, detail in rows]


def account_status(ctx: Ctx) -> list[tuple]:
    spec = ctx.spec
    where, params = filters.where_sql(spec.clauses, filters.STATUS_CHANGE_COLUMNS)
    out = []
    for ts, inst, auth_index, label, old, new in ctx.rows(
            STATUS_CHANGES_SQL.format(where=where), [spec.from_ms, spec.to_ms, *params]):
        name = ctx.account_label(label, auth_index)
        out.append((ts, ts, f"{name}: {old or 'unknown'} -> {new or 'unknown'}",
                    f"instance {inst}, auth_index {auth_index}", f"account_status,{new or 'unknown'}"))
    return out


def annotations(ctx: Ctx) -> list[Frame]:
    producers = {"failure_spikes": failure_spikes, "collector_gaps": collector_gaps,
                 "account_status": account_status}
    rows: list[tuple] = []
    for kind in _kinds(ctx.spec.payload):
        rows.extend(producers[kind](ctx))
    rows.sort(key=lambda r: (r[0], r[2]))
    return [table_frame("annotations", ANNOTATION_COLUMNS, rows)]


def _safe_url(url: str | None) -> str | None:
    """The upstream URL without user info, query or fragment (never a credential)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


_SIDECAR_FIELDS = ("instance", "url", "state", "transport", "mode", "last_consumed_ms", "last_inserted_ms",
                   "inserted", "duplicates", "dead_letters", "last_error", "last_error_stage", "last_error_ms",
                   "usage_publishing", "queue_retention_s", "warnings")


def collector(ctx: Ctx) -> list[Frame]:
    where, params = filters.where_sql(ctx.spec.clauses, filters.COLLECTOR_COLUMNS)
    sidecar = store_status.read_sidecar(getattr(ctx.conn, "filename", ""))  # rows the store refused (disk full, read-only)
    rows = []
    for *r, updated_ms in ctx.rows(COLLECTOR_SQL.format(where=where), params):
        newer = store_status.newer_sidecar_row(sidecar, r[0], updated_ms)
        if newer is not None:
            r = [newer.get(name, value) for name, value in zip(_SIDECAR_FIELDS, r)]
            r[-1] = json.dumps(r[-1]) if isinstance(r[-1], list) and r[-1] else (r[-1] or None)
        (inst, url, state, transport, mode, consumed, inserted_ms, inserted, dups, dead, error, stage,
         error_ms, publishing, retention, warnings) = r
        lag = (ctx.spec.now_ms - consumed) / 1000 if consumed else None
        rows.append((inst, _safe_url(url), state, transport, mode, consumed, inserted_ms, lag, inserted,
                     dups, dead, error, stage, error_ms, None if publishing is None else bool(publishing),
                     retention, warnings))
    return [table_frame("collector", COLLECTOR_COLUMNS, rows, UNITS)]
