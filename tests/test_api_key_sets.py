"""Schema step 8: the API-key set rollups (instance x key, with the distinct models and accounts
seen) and the API Key Summary read from them, against hand-computed values and the raw path."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from datasource import query, query_plan, rollup, store
from datasource.db import SCHEMA_VERSION, migrate, open_database
from datasource.filters import clauses_from_payload
from datasource.model import Normalized, TargetSpec
from test_rollup import remigrate_from

T0 = 1_778_000_400_000  # 2026-05-05T17:00:00Z, an hour boundary (not a day boundary)
MIN = 60_000
HOUR = rollup.HOUR_MS
DAY = rollup.DAY_MS
K1, K2 = "a" * 64, "b" * 64


def event(n: int, ts_ms: int, key: str, model: str, account: str, *, failed: int = 0, tokens: int = 0,
          cost: float = 0.0) -> Normalized:
    digest = hashlib.sha256(f"api-key-set-{n}".encode()).hexdigest()
    row = {"event_hash": digest, "ts_ms": ts_ms, "ts": "x", "created_ms": ts_ms, "model": model,
           "analytics_model": model, "account_key": account, "api_key_hash": key,
           "api_key_masked": "sk***" + key[:2], "provider": "codex", "failed": failed,
           "status_class": "4xx" if failed else "success", "status_code": 429 if failed else 200,
           "total_tokens": tokens, "est_cost_usd": cost}
    return Normalized(row=row, private={}, ledger_hash=bytes.fromhex(digest)[:16])


# The window of the summary tests: [T0 + 1 min, T0 + 2 h 42 min) reads a raw head (1-5 min),
# 5-minute buckets (5-60 min), one hour (1-2 h), 5-minute buckets (2 h - 2 h 40) and a raw tail.
LO, HI = T0 + MIN, T0 + 162 * MIN
EVENTS = [
    event(1, T0 + 10 * MIN, K1, "gpt-5", "acc-1", tokens=100, cost=0.001),               # 5-minute piece
    event(2, T0 + 25 * MIN, K1, "claude-4", "acc-2", failed=1, tokens=50, cost=0.002),   # 5-minute piece
    event(3, T0 + 65 * MIN, K1, "gpt-5", "-", tokens=10, cost=0.0005),                   # hour piece
    event(4, T0 + 2 * MIN, K2, "gpt-5", "acc-1", tokens=7, cost=0.0001),                 # raw head
    event(5, T0 + 130 * MIN, K2, "gemini", "acc-3", failed=1, tokens=3),                 # 5-minute tail
    event(6, T0 + 161 * MIN + 30_000, K1, "o3", "acc-3", tokens=1, cost=0.25),           # raw tail
    event(7, T0 + 3 * HOUR, K1, "late", "acc-9", tokens=1000),                           # after the window
    event(8, T0 - 5 * MIN, K2, "early", "acc-8", tokens=1000),                           # before it
]
# By hand from the rows above (events 1-6).
WANT = {
    K1: {"requests": 4, "failures": 1, "total_tokens": 161, "est_cost_usd": 0.2535, "models": 3,
         "models_used": "claude-4, gpt-5, o3", "accounts_hit": 3, "last_seen": T0 + 161 * MIN + 30_000},
    K2: {"requests": 2, "failures": 1, "total_tokens": 10, "est_cost_usd": 0.0001, "models": 2,
         "models_used": "gemini, gpt-5", "accounts_hit": 2, "last_seen": T0 + 130 * MIN},
}


def api_keys(conn, lo: int = LO, hi: int = HI, payload: dict[str, Any] | None = None, *,
             rollups: bool = True) -> dict[str, dict[str, Any]]:
    payload = payload or {}
    spec = TargetSpec(target="api_keys", payload=payload, from_ms=lo, to_ms=hi, interval_ms=HOUR,
                      max_data_points=1000, clauses=clauses_from_payload(payload), now_ms=hi)
    [frame] = query.execute(conn, spec, rollups=rollups)
    cols = {f.name: f.values for f in frame.fields}
    return {h: {name: cols[name][i] for name in cols if name not in ("api_key_hash", "api_key", "success_rate")}
            for i, h in enumerate(cols["api_key_hash"])}


def statements(conn, fn) -> list[tuple[str, Any]]:
    """(sql, bindings) of every statement `fn` runs on `conn`."""
    seen: list[tuple[str, Any]] = []

    def trace(cursor, sql, bindings):
        seen.append((sql, bindings))
        return True

    conn.exec_trace = trace
    try:
        fn()
    finally:
        conn.exec_trace = None
    return seen


def tables_read(conn, fn) -> set[str]:
    seen = [sql for sql, _ in statements(conn, fn)]
    names = [t for spec in rollup.SPECS for t in (spec.table,)] + ["events"]
    return {t for t in names for sql in seen if f"FROM {t} " in sql or f"FROM {t}\n" in sql}


def table(conn, name: str) -> list[tuple]:
    return conn.execute(f"SELECT * FROM {name} ORDER BY bucket_ms, instance, api_key_hash").fetchall()


def sets_snapshot(conn) -> dict[str, list[tuple]]:
    return {t: table(conn, t) for t in rollup.STEP8_TABLES}


def test_merge_sets_is_a_sorted_union_idempotent_and_order_free():
    merge = rollup.merge_sets
    assert rollup.encode_set(["b", "a", "b", "é"]) == '["a","b","é"]'
    assert merge('["a","c"]', '["b"]') == '["a","b","c"]'
    assert merge('["b"]', '["a","c"]') == '["a","b","c"]'
    assert merge('["a","b"]', '["a","b"]') == '["a","b"]'
    assert merge('["a","b"]', '["b"]') == '["a","b"]'  # nothing new: the stored text as it is
    assert merge('["a"]', "[]") == '["a"]' and merge("[]", "[]") == "[]"
    assert merge(None, '["x"]') == '["x"]' and merge('["x"]', None) == '["x"]'


def test_set_rows_by_hand_and_merged_across_batches(conn):
    store.insert_batch(conn, EVENTS[:3], origin="test")
    store.insert_batch(conn, EVENTS[3:], origin="test")
    hour = conn.execute("SELECT bucket_ms, api_key_hash, requests, failures, total_tokens, cost_nusd, first_ms, "
                        "last_ms, last_failure_ms, models, accounts FROM rollup_api_key_sets_hour "
                        "ORDER BY bucket_ms, api_key_hash").fetchall()
    assert hour == [
        (T0 - HOUR, K2, 1, 0, 1000, 0, T0 - 5 * MIN, T0 - 5 * MIN, None, '["early"]', '["acc-8"]'),
        (T0, K1, 2, 1, 150, 3_000_000, T0 + 10 * MIN, T0 + 25 * MIN, T0 + 25 * MIN, '["claude-4","gpt-5"]',
         '["acc-1","acc-2"]'),
        (T0, K2, 1, 0, 7, 100_000, T0 + 2 * MIN, T0 + 2 * MIN, None, '["gpt-5"]', '["acc-1"]'),
        (T0 + HOUR, K1, 1, 0, 10, 500_000, T0 + 65 * MIN, T0 + 65 * MIN, None, '["gpt-5"]', "[]"),  # '-' left out
        (T0 + 2 * HOUR, K1, 1, 0, 1, 250_000_000, T0 + 161 * MIN + 30_000, T0 + 161 * MIN + 30_000, None,
         '["o3"]', '["acc-3"]'),
        (T0 + 2 * HOUR, K2, 1, 1, 3, 0, T0 + 130 * MIN, T0 + 130 * MIN, T0 + 130 * MIN, '["gemini"]', '["acc-3"]'),
        (T0 + 3 * HOUR, K1, 1, 0, 1000, 0, T0 + 3 * HOUR, T0 + 3 * HOUR, None, '["late"]', '["acc-9"]'),
    ]
    day_start = T0 - T0 % DAY
    days = conn.execute("SELECT bucket_ms, api_key_hash, requests, models, accounts FROM rollup_api_key_sets_day "
                        "ORDER BY 2").fetchall()
    assert days == [(day_start, K1, 5, '["claude-4","gpt-5","late","o3"]', '["acc-1","acc-2","acc-3","acc-9"]'),
                    (day_start, K2, 3, '["early","gemini","gpt-5"]', '["acc-1","acc-3","acc-8"]')]
    # 5-minute buckets: the two K1 events at 10 and 25 minutes are different buckets
    assert conn.execute("SELECT count(*) FROM rollup_api_key_sets_5m").fetchone()[0] == 8


def test_batch_order_duplicates_and_rebuild_give_the_same_bytes(tmp_path):
    one = open_database(str(tmp_path / "one.db"))
    for e in EVENTS:  # one event per batch: every set grows through the SQL merge
        store.insert_batch(one, [e], origin="test")
    want = sets_snapshot(one)
    other = open_database(str(tmp_path / "other.db"))
    store.insert_batch(other, EVENTS[::-1], origin="test")  # one batch, reversed
    assert sets_snapshot(other) == want
    # re-delivered events are duplicates: the ledger keeps them out of the rollups
    again = store.insert_batch(other, EVENTS[2:6], origin="test")
    assert again.inserted == 0 and again.duplicates == 4
    assert sets_snapshot(other) == want
    assert api_keys(other) == WANT
    # a rebuild from raw events reproduces the incremental rows exactly
    assert rollup.rebuild(other) == len(EVENTS)
    assert sets_snapshot(other) == want
    one.close()
    other.close()


def test_summary_by_hand_with_partial_hour_edges(conn):
    store.insert_batch(conn, EVENTS[:4], origin="test")
    store.insert_batch(conn, EVENTS[4:], origin="test")
    assert api_keys(conn, rollups=False) == WANT
    read = tables_read(conn, lambda: api_keys.__call__(conn))
    assert {"rollup_api_key_sets_5m", "rollup_api_key_sets_hour", "events"} <= read
    assert "rollup_api_key_day" not in read
    assert api_keys(conn) == WANT
    # filtered by API key (hash or masked key) and instance: still the set tables
    for payload in ({"api_key": K1}, {"api_key": "sk***bb"}, {"instance": "default", "api_key": K2}):
        got = api_keys(conn, payload=payload)
        assert got == api_keys(conn, payload=payload, rollups=False)
        assert list(got) == [K1 if payload.get("api_key") == K1 else K2]
    read = tables_read(conn, lambda: api_keys(conn, payload={"api_key": K1}))
    assert "rollup_api_key_sets_hour" in read
    # a model filter falls back to rollup_api_key_day + raw edges (here all raw: no whole day)
    got = api_keys(conn, payload={"model": "gpt-5"})
    assert got == api_keys(conn, payload={"model": "gpt-5"}, rollups=False)
    assert got[K1] == {"requests": 2, "failures": 0, "total_tokens": 110, "est_cost_usd": 0.0015, "models": 1,
                       "models_used": "gpt-5", "accounts_hit": 1, "last_seen": T0 + 65 * MIN}
    assert got[K2]["requests"] == 1 and got[K2]["accounts_hit"] == 1
    assert not {"rollup_api_key_sets_5m", "rollup_api_key_sets_hour"} & tables_read(
        conn, lambda: api_keys(conn, payload={"model": "gpt-5"}))
    # whole days come from the daily set table
    day_start = T0 - T0 % DAY
    assert api_keys(conn, day_start, day_start + DAY) == api_keys(conn, day_start, day_start + DAY, rollups=False)
    assert tables_read(conn, lambda: api_keys(conn, day_start, day_start + DAY)) == {
        "rollup_api_key_sets_day", "rollup_traffic_day"}


def _spread_events(days: int) -> list[Normalized]:
    """Four events a day at fixed hours, keys / models / accounts cycling."""
    start = T0 - T0 % DAY
    out = []
    for d in range(days):
        for i, h in enumerate((1, 7, 13, 19)):
            n = d * 4 + i
            out.append(event(100 + n, start + d * DAY + h * HOUR + n, (K1, K2)[n % 2], f"m{n % 3}", f"acc-{n % 5}",
                             failed=int(n % 7 == 0), tokens=n, cost=n / 1000))
    return out


def test_upgrade_after_prune_keeps_the_days_only_the_old_tables_hold(conn):
    """Step 8 backfills from the events present; days retention had pruned are whole only in
    rollup_api_key_day, and the summary keeps reading them there."""
    events = _spread_events(4)
    start = T0 - T0 % DAY
    store.insert_batch(conn, events, origin="test")
    lo, hi = start, start + 4 * DAY
    before = api_keys(conn, lo, hi, rollups=False)
    assert sum(v["requests"] for v in before.values()) == 16
    assert store.prune(conn, start + DAY + 10 * HOUR) == 6  # day 1 and the first two events of day 2
    remigrate_from(conn, 7)
    assert conn.execute("SELECT sum(requests) FROM rollup_api_key_sets_day").fetchone()[0] == 10
    assert api_keys(conn, lo, hi) == before
    read = tables_read(conn, lambda: api_keys(conn, lo, hi))
    assert {"rollup_api_key_day", "rollup_api_key_sets_day"} <= read
    # a window wholly after the pruned days reads the set tables only (and equals raw)
    assert api_keys(conn, start + 2 * DAY, hi) == api_keys(conn, start + 2 * DAY, hi, rollups=False)
    assert "rollup_api_key_day" not in tables_read(conn, lambda: api_keys(conn, start + 2 * DAY, hi))


def test_step_8_backfill_equals_incremental(conn):
    events = _spread_events(3) + EVENTS
    store.insert_batch(conn, events[:7], origin="test")
    store.insert_batch(conn, events[7:], origin="test")
    want = sets_snapshot(conn)
    assert sum(r[3] for r in want["rollup_api_key_sets_day"]) == len(events)  # requests column
    remigrate_from(conn, 7)
    assert sets_snapshot(conn) == want


def test_a_failing_set_merge_rolls_the_batch_back(conn):
    store.insert_batch(conn, EVENTS[:1], origin="test")
    with conn:
        conn.execute("UPDATE rollup_api_key_sets_hour SET models = 'not json'")
    before = sets_snapshot(conn)
    with pytest.raises(Exception):
        store.insert_batch(conn, [event(50, T0 + 11 * MIN, K1, "other", "acc-5")], origin="test")
    assert sets_snapshot(conn) == before
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1


def test_merge_sets_equals_the_set_union_on_awkward_values():
    """Values with quotes, backslashes, commas and brackets: the text fast path never misjudges."""
    import random

    rng = random.Random(8)
    alphabet = ["a", "b", '"', "\\", ",", "[", "]", "é"]

    def some(most: int) -> set[str]:
        return {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(0, most))}

    for _ in range(5000):
        left, right = some(4), some(2)
        a, b = rollup.encode_set(left), rollup.encode_set(right)
        assert rollup.merge_sets(a, b) == rollup.encode_set(left | right), (a, b)
        assert rollup.merge_sets(b, a) == rollup.encode_set(left | right), (a, b)


def test_encode_set_is_json_dumps_text_and_decodes_back():
    """The join fast path gives exactly json.dumps's text (what earlier versions stored), and the
    split fast path reads it back, for values with quotes, backslashes, control characters, line
    separators, the '","' separator itself and empty strings."""
    import json
    import random

    rng = random.Random(11)
    alphabet = ["a", "Z", '"', "\\", ",", "[", "]", "é", "\x01", "\n", "\u2028", "\x7f", '","', "😀"]
    for _ in range(5000):
        values = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(0, 5))}
        text = rollup.encode_set(values)
        assert text == json.dumps(sorted(values), ensure_ascii=False, separators=(",", ":"))
        assert rollup._decode_set(text) == sorted(values)
    assert rollup.encode_set(["b", "a", "b"]) == '["a","b"]' and rollup._decode_set('["","a"]') == ["", "a"]
    for corrupt in ('["a]', "not json", '["a""b"]'):
        with pytest.raises(ValueError):
            rollup._decode_set(corrupt)


def usage_by_key(conn, lo: int, hi: int, *, rollups: bool = True) -> dict[str, tuple[int, int]]:
    spec = TargetSpec(target="usage", payload={"by": "api_key"}, from_ms=lo, to_ms=hi, interval_ms=HOUR,
                      max_data_points=1000, clauses=(), now_ms=hi)
    [frame] = query.execute(conn, spec, rollups=rollups)
    cols = {f.name: f.values for f in frame.fields}
    return {k: (n, t) for k, n, t in zip(cols["key"], cols["requests"], cols["total_tokens"])}


def _set_ranges_read(conn, fn) -> int:
    """Statements reading a bucket range of a set table (not their completeness check's first day)."""
    return sum(1 for sql, _ in statements(conn, fn) if "FROM rollup_api_key_sets_" in sql and "bucket_ms >= ?" in sql)


def test_sums_by_api_key_read_the_set_tables_only_where_they_are_complete(conn):
    """The set tables are a family of the general planner (usage and cost series by API key), but
    after an upgrade that came after retention pruned, only from the day they are complete."""
    start = T0 - T0 % DAY
    store.insert_batch(conn, _spread_events(4), origin="test")
    lo, hi = start, start + 4 * DAY
    # event n (0-15) has n tokens, key K1 when n is even: K1 0+2+...+14 = 56, K2 1+3+...+15 = 64
    want = {K1: (8, 56), K2: (8, 64)}
    assert usage_by_key(conn, lo, hi) == want == usage_by_key(conn, lo, hi, rollups=False)
    assert "rollup_api_key_sets_day" in tables_read(conn, lambda: usage_by_key(conn, lo, hi))
    assert store.prune(conn, start + DAY + 10 * HOUR) == 6  # day 1 and the first two events of day 2
    remigrate_from(conn, 7)
    assert query_plan.sets_complete_from(conn) == start + 2 * DAY
    assert usage_by_key(conn, lo, hi) == want  # rollup_api_key_day still holds the pruned days
    assert _set_ranges_read(conn, lambda: usage_by_key(conn, lo, hi)) == 0
    assert "rollup_api_key_day" in tables_read(conn, lambda: usage_by_key(conn, lo, hi))
    # from the day they are complete on: the set tables again; days 3-4 are events 8-15
    assert usage_by_key(conn, start + 2 * DAY, hi) == {K1: (4, 8 + 10 + 12 + 14), K2: (4, 9 + 11 + 13 + 15)}
    assert _set_ranges_read(conn, lambda: usage_by_key(conn, start + 2 * DAY, hi)) == 1
