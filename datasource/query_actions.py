"""`account_actions` (Account Action Queue): failed events with an action, plus CPA credential errors.

Events carry the action normalize chose (events.action / action_reason / action_detail).
Credential errors from CPA's errors channel map to actions here: quota exceeded ->
wait_quota_reset (reason quota_exhausted, as for 429 quota events), 401 -> reauth, 403 -> review. Rows are grouped per
(instance, account_key, action, reason_code); both sources merge into one row.
"""

from __future__ import annotations

import json
from typing import Any

from datasource import filters
from datasource.interned import labels_id_sql, text_of
from datasource.model import Frame
from datasource.query_common import Ctx, payload_int, sort_rows, table_frame

ACTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("account_key", "string"), ("account", "string"), ("instance", "string"), ("provider", "string"),
    ("auth_file", "string"), ("action", "string"), ("reason_code", "string"), ("reason", "string"),
    ("first_seen", "time"), ("last_seen", "time"), ("hits", "number"), ("last_status", "number"),
    ("last_evidence", "string"), ("quota_recover_at", "time"),
)
REASONS: dict[str, str] = {
    "quota_exhausted": "usage quota exhausted; wait for the window to reset",
    "credential_unauthorized": "CPA reported 401 for the credential; sign in again",
    "credential_forbidden": "CPA reported 403 for the credential; review it",
}
EVIDENCE_CHARS = 500

# Per (instance, account, action, reason): the counts from the partial covering index
# events_action_ts (schema step 9; no table row read), then the newest event of each group by
# one seek (its label, provider, auth file, status, evidence). Was: window functions over every
# column of every action event in the window, 6.5 s at 30 d on the 10 M dataset (336 k rows).
# Grouped and sought by label ids (`lid_`, datasource/interned.py): the index holds ids, and its
# condition `action IS NOT NULL` applies only when written on the id.
EVENT_ACTIONS_SQL = f"""
WITH g AS (SELECT lid_instance AS g_inst, lid_account_key AS g_key, lid_action AS g_action,
                  coalesce(lid_action_reason, lid_action) AS g_reason, max(ts_ms) AS g_last,
                  min(ts_ms) AS g_first, count(*) AS g_hits, max(quota_recover_at_ms) AS g_recover
           FROM events WHERE {{where}} AND failed = 1 AND lid_action IS NOT NULL GROUP BY 1, 2, 3, 4)
SELECT {text_of("g_inst")}, {text_of("g_key")}, {text_of("g_action")}, {text_of("g_reason")}, g_last, g_first,
       g_hits, e.account, e.provider, e.auth_file, e.status_code, e.fail_summary, e.action_detail, g_recover
FROM g JOIN events e ON e.id = (
    SELECT id FROM events WHERE {{where}} AND failed = 1 AND lid_action IS NOT NULL AND lid_instance = g_inst
      AND lid_account_key = g_key AND lid_action = g_action AND coalesce(lid_action_reason, lid_action) = g_reason
      AND ts_ms = g_last ORDER BY id DESC LIMIT 1)
"""
CREDENTIAL_WINDOW_SQL = """
SELECT instance, account_key, action, reason, max(ts_ms), first_ts, hits, provider, status_code,
       summary, recover
FROM (SELECT *, min(ts_ms) OVER w AS first_ts, count(*) OVER w AS hits,
             max(next_retry_after_ms) OVER w AS recover
      FROM (SELECT *, CASE WHEN quota_exceeded = 1 THEN 'wait_quota_reset'
                           WHEN status_code = 401 THEN 'reauth' ELSE 'review' END AS action,
                      CASE WHEN quota_exceeded = 1 THEN 'quota_exhausted'
                           WHEN status_code = 401 THEN 'credential_unauthorized'
                           ELSE 'credential_forbidden' END AS reason
            FROM credential_errors
            WHERE ts_ms >= ? AND ts_ms < ? AND {where}
              AND (quota_exceeded = 1 OR status_code IN (401, 403)))
      WINDOW w AS (PARTITION BY instance, account_key, action, reason))
GROUP BY 1, 2, 3, 4
"""
ACCOUNT_INFO_SQL = f"""
SELECT instance, account_key, max(ts_ms), account, provider, auth_file
FROM events WHERE lid_account_key IN {labels_id_sql()} GROUP BY lid_instance, lid_account_key
"""


def _evidence(text: str | None) -> str | None:
    if not text:
        return text
    return text if len(text) <= EVIDENCE_CHARS else text[:EVIDENCE_CHARS] + "..."


def _event_rows(ctx: Ctx) -> list[dict[str, Any]]:
    # the filters' exact form (`lid_account_key = ?` for an account, as the rollups resolve it),
    # kept off the key indexes: the partial covering index events_action_ts reads the window's
    # action events alone, where a seek on the busiest account read its every event in the
    # window (a week at 10 M events: 140 against 6 ms; SQLite picked the seek from 7 days down)
    where, params = ctx.reader.raw_where(ctx.spec.from_ms, ctx.spec.to_ms, key_indexes=False)
    out = []
    for (inst, key, action, reason_code, last, first, hits, label, provider, auth_file, status,
         summary, detail, recover) in ctx.rows(EVENT_ACTIONS_SQL.format(where=where), [*params, *params]):
        out.append({"account_key": key, "account": label, "instance": inst, "provider": provider,
                    "auth_file": auth_file, "action": action, "reason_code": reason_code,
                    "reason": detail or REASONS.get(reason_code, reason_code), "first_seen": first,
                    "last_seen": last, "hits": hits, "last_status": status,
                    "last_evidence": _evidence(summary), "quota_recover_at": recover})
    return out


def _credential_rows(ctx: Ctx) -> list[dict[str, Any]]:
    where, params = filters.where_sql(ctx.spec.clauses, filters.CREDENTIAL_ERROR_COLUMNS)
    out = []
    for (inst, key, action, reason_code, last, first, hits, provider, status, summary,
         recover) in ctx.rows(CREDENTIAL_WINDOW_SQL.format(where=where),
                              [ctx.spec.from_ms, ctx.spec.to_ms, *params]):
        out.append({"account_key": key, "account": None, "instance": inst, "provider": provider,
                    "auth_file": None, "action": action, "reason_code": reason_code,
                    "reason": REASONS[reason_code], "first_seen": first, "last_seen": last, "hits": hits,
                    "last_status": status, "last_evidence": _evidence(summary), "quota_recover_at": recover})
    return out


def _merge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        ident = (row["instance"], row["account_key"], row["action"], row["reason_code"])
        have = merged.get(ident)
        if have is None:
            merged[ident] = dict(row)
            continue
        newer, older = (row, have) if row["last_seen"] > have["last_seen"] else (have, row)
        combined = dict(newer)
        for col in ("account", "provider", "auth_file"):
            combined[col] = newer[col] or older[col]
        combined["first_seen"] = min(row["first_seen"], have["first_seen"])
        combined["hits"] = row["hits"] + have["hits"]
        recovers = [r for r in (row["quota_recover_at"], have["quota_recover_at"]) if r is not None]
        combined["quota_recover_at"] = max(recovers) if recovers else None
        merged[ident] = combined
    return list(merged.values())


def _fill_accounts(ctx: Ctx, rows: list[dict[str, Any]]) -> None:
    """Label, provider and auth file for credential-error rows, from the account's newest event."""
    keys = sorted({r["account_key"] for r in rows if r["account"] is None})
    if not keys:
        return
    info = {(r[0], r[1]): r[3:] for r in ctx.rows(ACCOUNT_INFO_SQL, [json.dumps(keys)])}
    for row in rows:
        label, provider, auth_file = info.get((row["instance"], row["account_key"]), (None, None, None))
        row["account"] = row["account"] or label
        row["provider"] = row["provider"] or provider
        row["auth_file"] = row["auth_file"] or auth_file


def account_actions(ctx: Ctx) -> list[Frame]:
    limit = payload_int(ctx.spec.payload, "limit", 1000, 1, 5000)
    rows = _merge(_event_rows(ctx) + _credential_rows(ctx))
    _fill_accounts(ctx, rows)
    for row in rows:
        row["account"] = ctx.account_label(row["account"], row["account_key"])
    rows = sort_rows(rows, (("last_seen", True), ("hits", True), ("account_key", False), ("action", False)))
    names = [c for c, _ in ACTION_COLUMNS]
    return [table_frame("account_actions", ACTION_COLUMNS, [[r[c] for c in names] for r in rows[:limit]])]
