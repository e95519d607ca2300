"""`accounts` (Account Overview) and `api_keys` (API Key Summary) tables."""

from __future__ import annotations

import json
from typing import Any

from datasource import rollup
from datasource.interned import ROWS, label_id_sql
from datasource.model import Frame
from datasource.query_plan import (
    GROUPS, IDX, RAW, RAW_EXPR, ROLLUP_EXPR, Plan, add_into, cost_usd, empty, labels, sets_complete_from,
    split_range,
)
from datasource.query_common import (
    UNITS, Ctx, payload_choice, payload_int, ratio, sort_rows, table_frame,
)

ACCOUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("account_key", "string"), ("account", "string"), ("instance", "string"), ("provider", "string"),
    ("auth_file", "string"), ("project_id", "string"), ("status", "string"), ("requests", "number"),
    ("failures", "number"), ("success_rate", "number"), ("top_failure_type", "string"),
    ("last_failure_status", "number"), ("last_failure_summary", "string"), ("total_tokens", "number"),
    ("est_cost_usd", "number"), ("avg_latency_ms", "number"), ("p95_latency_ms", "number"),
    ("last_seen", "time"), ("quota_plan", "string"), ("quota_used_pct", "number"),
    ("quota_recover_at", "time"),
)
API_KEY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("api_key_hash", "string"), ("api_key", "string"), ("requests", "number"), ("failures", "number"),
    ("success_rate", "number"), ("total_tokens", "number"), ("est_cost_usd", "number"),
    ("models", "number"), ("models_used", "string"), ("accounts_hit", "number"), ("last_seen", "time"),
)
ACCOUNT_SORTS = {
    "worst": (("failures", True), ("success_rate", False), ("requests", True), ("account_key", False)),
    "requests": (("requests", True), ("account_key", False)),
    "cost": (("est_cost_usd", True), ("requests", True), ("account_key", False)),
    "last_seen": (("last_seen", True), ("account_key", False)),
}

# Per account, seeks on events(account_key, ts_ms): the newest matching event (labels), the
# newest failure (status, summary) and the newest event carrying quota headers.
# Account Overview's per-account seeks, one statement each for every account (a correlated
# subquery per account inside SQLite instead of ~300 statements through Python): the accounts
# come as a JSON array of [instance, account key, time] (k_ names: events has a `ts` column).
_ACCOUNT_KEYS = "WITH k(k_inst, k_key, k_ts) AS (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?))"
# The seeks compare label ids (`lid_`, datasource/interned.py): a text comparison through the
# events view cannot use an index.
_K_INST, _K_KEY = label_id_sql("k_inst"), label_id_sql("k_key")
NEWEST_SQL = _ACCOUNT_KEYS + f"""
SELECT k_inst, k_key, e.account, e.provider, e.auth_file, e.project_id, e.auth_index FROM k
JOIN events e ON e.id = (SELECT id FROM events WHERE {{where}} AND lid_instance = {_K_INST}
                         AND lid_account_key = {_K_KEY} AND ts_ms = k_ts ORDER BY id DESC LIMIT 1)
"""
LAST_FAILURE_SQL = _ACCOUNT_KEYS + f"""
SELECT k_inst, k_key, e.status_code, e.fail_summary FROM k
JOIN events e ON e.id = (SELECT id FROM events WHERE {{where}} AND lid_instance = {_K_INST}
                         AND lid_account_key = {_K_KEY} AND ts_ms = k_ts AND failed = 1 ORDER BY id DESC LIMIT 1)
"""
# INDEXED BY: SQLite's planner picks events_account_ts (same key columns) and then walks every
# event of the account in the window to find one with quota headers: 438 ms for 99 accounts at
# 30 d on the 10 M dataset, against 2 ms through the partial index (its WHERE is repeated below
# verbatim, so the index always applies). INDEXED BY names a table, so this seek reads
# event_rows and checks the filters on the view for the row it stops at (EXISTS; the window's
# two parameters are passed once more for the seek itself).
QUOTA_SQL = _ACCOUNT_KEYS + f"""
SELECT k_inst, k_key, e.quota_plan, e.quota_used_pct, e.quota_recover_at_ms FROM k
JOIN events e ON e.id = (SELECT r.id FROM {ROWS} r INDEXED BY events_quota_account_ts
                         WHERE r.instance = {_K_INST} AND r.account_key = {_K_KEY}
                           AND (quota_plan IS NOT NULL OR quota_used_pct IS NOT NULL OR quota_recover_at_ms IS NOT NULL)
                           AND r.ts_ms >= ? AND r.ts_ms < ?
                           AND EXISTS (SELECT 1 FROM events f WHERE f.id = r.id AND {{where}})
                         ORDER BY r.ts_ms DESC, r.id DESC LIMIT 1)
"""
FAILURE_TYPES_SQL = """
SELECT instance, account_key, failure_type, count(*)
FROM events WHERE {where} AND failed = 1 GROUP BY lid_instance, lid_account_key, lid_failure_type
"""
CPA_STATUS_SQL = "SELECT instance, auth_index, status, disabled, unavailable, name FROM accounts"
def _cpa_status(status: str | None, disabled: int, unavailable: int) -> str:
    if disabled:
        return "disabled"
    if unavailable:
        return "unavailable"
    return status or "unknown"


def _top_failure_types(ctx: Ctx, where: str, params: list[Any]) -> dict[tuple, str]:
    """Per account, the failure type with the most failed events (ties: the first by name).

    Failure counts by account and type come from rollup_account_failure_* with raw edges when
    the filters allow; otherwise from the window's failed events (events_failed_ts).
    """
    spec = ctx.spec
    group = ("instance", "account_key", "failure_type")
    if ctx.reader.plan(spec.from_ms, spec.to_ms, group).uses_rollups:
        found = ctx.reader.sums(spec.from_ms, spec.to_ms, group, measures=("failures",))
        counted = [(*key, v[0]) for key, v in found.items() if v[0]]
    else:
        counted = ctx.rows(FAILURE_TYPES_SQL.format(where=where), params)
    best: dict[tuple, tuple[int, str]] = {}
    for inst, key, ftype, n in counted:
        current = best.get((inst, key))
        if current is None or (-n, ftype) < (-current[0], current[1]):
            best[(inst, key)] = (n, ftype)
    return {k: v[1] for k, v in best.items()}


def _seek(ctx: Ctx, sql: str, where: str, params: list[Any], keys: list[list[Any]]) -> dict[tuple, tuple]:
    """(instance, account key) -> the columns one of the statements above found for it."""
    if not keys:
        return {}
    return {(r[0], r[1]): tuple(r[2:]) for r in ctx.rows(sql.format(where=where), [json.dumps(keys), *params])}


def _account_rows(ctx: Ctx) -> list[dict[str, Any]]:
    spec = ctx.spec
    reader = ctx.reader
    sums = reader.sums(spec.from_ms, spec.to_ms, ("instance", "account_key"))
    p95 = reader.distribution("latency_ms", spec.from_ms, spec.to_ms, ("instance", "account_key"))
    where, params = reader.raw_where(spec.from_ms, spec.to_ms)  # index-friendly form of the filters
    top_types = _top_failure_types(ctx, where, params)
    cpa = {(r[0], r[1]): r[2:] for r in ctx.rows(CPA_STATUS_SQL)}
    fallback = labels(reader, "account_key", [k for _, k in sums], spec.from_ms, spec.to_ms)
    newest = _seek(ctx, NEWEST_SQL, where, params, [[i, k, v[IDX["last_ms"]]] for (i, k), v in sums.items()])
    last_failures = _seek(ctx, LAST_FAILURE_SQL, where, params, [
        [i, k, v[IDX["last_failure_ms"]]] for (i, k), v in sums.items() if v[IDX["last_failure_ms"]] is not None])
    quotas = _seek(ctx, QUOTA_SQL, where, [spec.from_ms, spec.to_ms, *params], [[i, k, None] for i, k in sums])
    rows = []
    for (inst, key), v in sums.items():
        n, failed = v[IDX["requests"]], v[IDX["failures"]]
        last_seen = v[IDX["last_ms"]]
        label, provider, auth_file, project, auth_index = newest.get((inst, key), (None,) * 5)
        if label is None and provider is None:  # newest event pruned: rollups outlive raw rows
            label = fallback.get(key)
        fail_status, fail_summary = last_failures.get((inst, key), (None, None))
        plan_name, used, recover = quotas.get((inst, key), (None, None, None))
        status, disabled, unavailable, file_name = cpa.get((inst, auth_index), (None, 0, 0, None))
        rows.append({
            "account_key": key, "account": ctx.account_label(label, key), "instance": inst,
            "provider": provider, "auth_file": auth_file or file_name, "project_id": project,
            "status": _cpa_status(status, disabled, unavailable) if (inst, auth_index) in cpa else "unknown",
            "requests": n, "failures": failed, "success_rate": ratio(n - failed, n),
            "top_failure_type": top_types.get((inst, key)), "last_failure_status": fail_status,
            "last_failure_summary": fail_summary, "total_tokens": v[IDX["total_tokens"]],
            "est_cost_usd": cost_usd(v[IDX["cost_nusd"]]),
            "avg_latency_ms": ratio(v[IDX["latency_sum_ms"]], v[IDX["latency_samples"]]),
            "p95_latency_ms": p95.percentiles((inst, key), [95])[0],
            "last_seen": last_seen, "quota_plan": plan_name, "quota_used_pct": used, "quota_recover_at": recover,
        })
    return rows


def accounts(ctx: Ctx) -> list[Frame]:
    payload = ctx.spec.payload
    order = payload_choice(payload, "sort", ACCOUNT_SORTS, "worst")
    limit = payload_int(payload, "limit", 1000, 1, 5000)
    rows = sort_rows(_account_rows(ctx), ACCOUNT_SORTS[order])[:limit]
    names = [c for c, _ in ACCOUNT_COLUMNS]
    return [table_frame("accounts", ACCOUNT_COLUMNS, [[r[c] for c in names] for r in rows], UNITS)]


# Per API key and piece: sums plus the distinct models and accounts (JSON arrays),
# merged across pieces in Python; one row per key and piece instead of key x model x account.
API_KEY_MEASURES = ("requests", "failures", "total_tokens", "cost_nusd", "last_ms")
API_KEYS_SQL = """
SELECT {key}, {measures}, json_group_array(DISTINCT analytics_model),
       json_group_array(DISTINCT nullif(account_key, '-'))
FROM {table} WHERE {where} GROUP BY 1
"""
# rollup_api_key_sets_* (schema step 8): the sets are stored per key and bucket; the distinct
# set texts of a piece come back as a JSON array of JSON arrays (whole buckets mostly repeat).
API_KEY_SETS_SQL = """
SELECT api_key_hash, {measures}, json_group_array(DISTINCT models), json_group_array(DISTINCT accounts)
FROM {table} WHERE {where} GROUP BY 1
"""
SET_DIMS = frozenset(rollup.SPEC_BY_TABLE[rollup.STEP8_TABLES[0]].dims)
SET_TABLES = {rollup.SPEC_BY_TABLE[t].grain_ms: t for t in rollup.STEP8_TABLES}


def _api_key_plans(ctx: Ctx) -> list[Plan]:
    """The API-key set tables (day / hour / 5 min, raw edges under 5 minutes) when the filters
    only read instance and api key, from where they are complete on; otherwise (and before
    that) the planner's choice, rollup_api_key_day plus raw edges."""
    spec, reader = ctx.spec, ctx.reader
    lo, hi = spec.from_ms, spec.to_ms
    tr = reader.translation()
    plans = []
    if reader.rollups and tr is not None and tr.dims <= SET_DIMS and lo < hi:
        cut = sets_complete_from(ctx.conn)
        if cut is not None and cut > lo:
            plans.append(reader.plan(lo, min(cut, hi), ("api_key_hash", "analytics_model", "account_key")))
            lo = cut
        if lo < hi:
            p = Plan(split_range(lo, hi, SET_TABLES), tr)
            reader.used_rollups = reader.used_rollups or p.uses_rollups
            plans.append(p)
        return plans
    return [reader.plan(lo, hi, ("api_key_hash", "analytics_model", "account_key"))]


def api_keys(ctx: Ctx) -> list[Frame]:
    limit = payload_int(ctx.spec.payload, "limit", 1000, 1, 5000)
    spec = ctx.spec
    reader = ctx.reader
    per_key: dict[str, dict[str, Any]] = {}
    decoded: dict[str, list[str]] = {}
    for plan, piece in [(p, piece) for p in _api_key_plans(ctx) for piece in p.pieces]:
        where, params = plan.where(piece, spec.clauses)
        raw = piece.table == RAW
        measures = ", ".join((RAW_EXPR if raw else ROLLUP_EXPR)[m] for m in API_KEY_MEASURES)
        sets = piece.table in rollup.STEP8_TABLES
        if sets:
            sql = API_KEY_SETS_SQL.format(table=piece.table, where=where, measures=measures)
        else:
            sql = API_KEYS_SQL.format(key=GROUPS["api_key_hash"][0 if raw else 1],
                                      table="events" if raw else piece.table, where=where, measures=measures)
        for key_hash, *rest in ctx.rows(sql, params):
            sums, models, accounts_hit = rest[:-2], rest[-2], rest[-1]
            have = per_key.get(key_hash)
            if have is None:
                have = per_key[key_hash] = {"sums": empty(API_KEY_MEASURES), "models": set(), "accounts": set()}
            add_into(have["sums"], sums, API_KEY_MEASURES)
            if sets:
                for texts, into in ((models, have["models"]), (accounts_hit, have["accounts"])):
                    for text in json.loads(texts):
                        values = decoded.get(text)
                        if values is None:
                            values = decoded[text] = json.loads(text)
                        into.update(values)
            else:
                have["models"].update(json.loads(models))
                have["accounts"].update(a for a in json.loads(accounts_hit) if a is not None)
    masked = labels(reader, "api_key_hash", per_key, spec.from_ms, spec.to_ms)
    rows = []
    for key_hash, have in per_key.items():
        n, failed, tokens, nusd, last_seen = have["sums"]
        used = sorted(have["models"])
        rows.append({
            "api_key_hash": key_hash, "api_key": ctx.api_key_label(key_hash, masked.get(key_hash)),
            "requests": n, "failures": failed, "success_rate": ratio(n - failed, n),
            "total_tokens": tokens, "est_cost_usd": cost_usd(nusd),
            "models": len(used), "models_used": ", ".join(used), "accounts_hit": len(have["accounts"]),
            "last_seen": last_seen,
        })
    rows = sort_rows(rows, (("requests", True), ("api_key_hash", False)))[:limit]
    names = [c for c, _ in API_KEY_COLUMNS]
    return [table_frame("api_keys", API_KEY_COLUMNS, [[r[c] for c in names] for r in rows], UNITS)]
