"""Rollups against real SQLite: equal to raw aggregates, exact under dedup, rebuildable, kept by prune."""

from __future__ import annotations

import hashlib
import random

import apsw
import pytest

from datasource import rollup, store
from datasource.db import ACCOUNT_INDEXED
from datasource.model import Normalized
from datasource.sketch import Sketch, SketchError
from datasource.sketch import bucket_index as sketch_index

T0 = 1_778_000_400_000  # 2026-05-05T17:00:00Z, an hour boundary
HOUR = rollup.HOUR_MS
DAY = rollup.DAY_MS


def make_event(n: int, ts_ms: int, **row) -> Normalized:
    digest = hashlib.sha256(f"rollup-event-{n}-{ts_ms}".encode()).hexdigest()
    base = {"event_hash": digest, "ts_ms": ts_ms, "ts": "x", "created_ms": ts_ms, "model": "m",
            "analytics_model": "m"}
    base.update(row)
    return Normalized(row=base, private={}, ledger_hash=bytes.fromhex(digest)[:16])


def random_events(count: int, seed: int = 1, start: int = T0, span: int = 3 * DAY) -> list[Normalized]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        failed = rng.random() < 0.2
        code = rng.choice([429, 401, 500, 503, 418]) if failed else rng.choice([200] * 9 + [299])
        unusual = code in (418, 299)
        row = {
            "instance": rng.choice(["default", "eu"]),
            "provider": rng.choice(["codex", "claude", "gemini"]),
            "analytics_model": rng.choice(["gpt-5.4", "claude-4", "gemini-3"]),
            "account_key": rng.choice(["acct-a", "acct-b", "acct-c", "-"]),
            "api_key_hash": rng.choice(["h1", "h2", None]),
            "request_type": rng.choice(["CodexExecutor", "ClaudeExecutor", None]),
            "status_code": code, "failed": int(failed),
            "status_class": "unusual" if unusual else ("success" if not failed else f"{code // 100}xx"),
            "failure_type": "none" if not failed else rng.choice(["quota", "auth", "upstream"]),
            "cache_state": rng.choice(["hit", "miss"]),
            "input_tokens": rng.randint(0, 20_000), "output_tokens": rng.randint(0, 3000),
            "reasoning_tokens": rng.randint(0, 500), "cached_tokens": rng.randint(0, 9000),
            "cache_read_tokens": rng.randint(0, 9000), "cache_creation_tokens": rng.randint(0, 100),
            "norm_input_tokens": rng.randint(0, 20_000), "norm_uncached_tokens": rng.randint(0, 5000),
            "norm_cache_read_tokens": rng.randint(0, 9000), "compat_cached_tokens": rng.randint(0, 50),
            "total_tokens": rng.randint(0, 25_000), "est_cost_usd": rng.random() / 7,
            "latency_ms": rng.choice([None, 0, -1] + [round(rng.lognormvariate(7, 1)) for _ in range(6)]),
            "ttft_ms": rng.choice([None, 0] + [round(rng.lognormvariate(6, 0.7)) for _ in range(3)]),
        }
        out.append(make_event(n, start + rng.randrange(span), **row))
    return out


def insert(conn, events, batch: int = 97) -> None:
    for i in range(0, len(events), batch):
        store.insert_batch(conn, events[i:i + batch], origin="test")


def snapshot(conn) -> dict[str, list[tuple]]:
    return {spec.table: conn.execute(f"SELECT * FROM {spec.table} ORDER BY 1, 2, 3, 4, 5, 6, 7").fetchall()
            for spec in rollup.SPECS}


_DIM_SQL = {"request_type": "coalesce(request_type, '')", "api_key_hash": "coalesce(api_key_hash, '')",
            "status_code": "coalesce(status_code, 0)"}


def raw_aggregate(conn, spec: rollup.RollupSpec) -> dict[tuple, dict]:
    """The same aggregate straight from events, written independently in SQL."""
    dims = [_DIM_SQL.get(d, d) for d in spec.dims]
    sql = (
        f"SELECT ts_ms - ts_ms % {spec.grain_ms} AS b, {', '.join(dims)}, count(*), sum(failed = 0), "
        "sum(failed = 1), sum(status_class = 'unusual'), "
        + ", ".join(f"sum({c})" for c in rollup.TOKEN_COLUMNS)
        + ", sum(CAST(round(est_cost_usd * 1e9) AS INTEGER)), coalesce(sum(latency_ms) FILTER (WHERE latency_ms > 0), 0), "
        "count(*) FILTER (WHERE latency_ms > 0), coalesce(sum(ttft_ms) FILTER (WHERE ttft_ms > 0), 0), "
        "count(*) FILTER (WHERE ttft_ms > 0), min(ts_ms), max(ts_ms), max(ts_ms) FILTER (WHERE failed = 1), "
        "json_group_array(latency_ms), json_group_array(ttft_ms) "
        f"FROM events GROUP BY b, {', '.join(dims)}"
    )
    out = {}
    width = 1 + len(spec.dims)
    for row in conn.execute(sql):
        out[tuple(row[:width])] = {"measures": row[width:-2], "latency": row[-2], "ttft": row[-1],
                                   "models": set(), "accounts": set()}
    if spec.sets:  # the distinct models and accounts (not '-') of each group, collected row by row
        for row in conn.execute(f"SELECT ts_ms - ts_ms % {spec.grain_ms}, {', '.join(dims)}, analytics_model, "
                                "account_key FROM events"):
            group = out[tuple(row[:width])]
            group["models"].add(row[width])
            if row[width + 1] != "-":
                group["accounts"].add(row[width + 1])
    return out


def assert_matches_raw(conn) -> None:
    import json

    for spec in rollup.SPECS:
        raw = raw_aggregate(conn, spec)
        width = 1 + len(spec.dims)
        names = rollup.MEASURES + ("first_ms", "last_ms", "last_failure_ms")
        cols = ", ".join(("bucket_ms",) + spec.dims + names + (("latency_sketch", "ttft_sketch") if spec.sketches else ())
                         + (tuple(rollup.SET_COLUMNS) if spec.sets else ()))
        rows = conn.execute(f"SELECT {cols} FROM {spec.table}").fetchall()
        assert len(rows) == len(raw), spec.table
        for row in rows:
            expected = raw[tuple(row[:width])]
            got = row[width:width + len(names)]
            for name, g, e in zip(names, got, expected["measures"]):
                assert g == e, (spec.table, name, g, e)
            if spec.sets:  # sorted distinct models / accounts (not '-') as compact JSON arrays
                assert row[-2:] == (json.dumps(sorted(expected["models"]), separators=(",", ":")),
                                    json.dumps(sorted(expected["accounts"]), separators=(",", ":"))), spec.table
            if spec.sketches:
                for blob, values in zip(row[-2:], (expected["latency"], expected["ttft"])):
                    want = Sketch()
                    want.extend(json.loads(values))
                    assert Sketch.from_bytes(blob) == want
                    assert (blob is None) == (want.count == 0)


def test_tables_match_specs(conn):
    for spec in rollup.SPECS:
        cols = [r[1] for r in conn.execute("SELECT * FROM pragma_table_info(?)", (spec.table,))]
        extra = ("latency_sketch", "ttft_sketch") if spec.sketches else ()
        extra += tuple(rollup.SET_COLUMNS) if spec.sets else ()
        assert cols == ["bucket_ms", *spec.dims, *rollup.MEASURES, "first_ms", "last_ms", "last_failure_ms", *extra]
        pk = [r[1] for r in sorted(conn.execute("SELECT * FROM pragma_table_info(?)", (spec.table,)),
                                   key=lambda r: r[5]) if r[5]]
        assert pk == ["bucket_ms", *spec.dims]


def test_hand_computed_hour(conn):
    common = {"provider": "codex", "analytics_model": "gpt-5.4", "account_key": "acct-a", "status_code": 200,
              "input_tokens": 100, "output_tokens": 10, "total_tokens": 110, "est_cost_usd": 0.25}
    events = [
        make_event(1, T0 + 1000, latency_ms=1000, ttft_ms=200, **common),
        make_event(2, T0 + 2000, latency_ms=3000, ttft_ms=0, **common),
        make_event(3, T0 + 3000, latency_ms=0, ttft_ms=None, **common),
        make_event(4, T0 + 4000, latency_ms=500, ttft_ms=100, failed=1, status_class="4xx",
                   **{**common, "status_code": 429}),
        make_event(5, T0 + HOUR + 5, latency_ms=700, **common),  # the next hour
    ]
    result = store.insert_batch(conn, events, origin="test")
    assert result.inserted == 5
    row = conn.execute(
        "SELECT sum(requests), sum(successes), sum(failures), sum(input_tokens), sum(total_tokens), "
        "sum(cost_nusd), sum(latency_sum_ms), sum(latency_samples), sum(ttft_sum_ms), sum(ttft_samples), "
        "min(first_ms), max(last_ms), max(last_failure_ms) FROM rollup_traffic_hour WHERE bucket_ms = ?",
        (T0,)).fetchone()
    assert row == (4, 3, 1, 400, 440, 1_000_000_000, 4500, 3, 300, 2, T0 + 1000, T0 + 4000, T0 + 4000)
    success = conn.execute(
        "SELECT requests, latency_sketch, last_failure_ms FROM rollup_latency_hour "
        "WHERE bucket_ms = ? AND failed = 0", (T0,)).fetchone()
    assert success[0] == 3 and success[2] is None
    sk = Sketch.from_bytes(success[1])
    assert sk.count == 2  # 1000 and 3000; the 0 is not a sample
    assert abs(sk.quantile(0.5) - 1000) / 1000 <= 0.01 and abs(sk.quantile(0.95) - 3000) / 3000 <= 0.01
    day = conn.execute("SELECT sum(requests), sum(latency_samples) FROM rollup_traffic_day").fetchone()
    assert day == (5, 4)
    account = conn.execute(
        "SELECT instance, account_key, analytics_model, provider, requests FROM rollup_account_hour "
        "WHERE bucket_ms = ? AND failed = 0", (T0,)).fetchone()
    assert account == ("default", "acct-a", "gpt-5.4", "codex", 3)
    key = conn.execute("SELECT api_key_hash, account_key, sum(requests), sum(failures) FROM rollup_api_key_day "
                       "GROUP BY 1, 2").fetchone()
    assert key == ("", "acct-a", 5, 1)


def test_rollups_equal_raw_aggregates(conn):
    insert(conn, random_events(3000))
    assert_matches_raw(conn)


def test_duplicates_do_not_change_rollups(conn):
    events = random_events(800, seed=2)
    insert(conn, events)
    before = snapshot(conn)
    insert(conn, events, batch=53)  # every one a duplicate
    mixed = random_events(800, seed=2)[::3] + random_events(200, seed=3)
    insert(conn, mixed)  # a third duplicates, 200 new
    assert conn.execute("SELECT count(*) FROM events").get == 1000
    assert snapshot(conn) != before
    assert_matches_raw(conn)


def test_rebuild_equals_incremental(conn):
    insert(conn, random_events(2500, seed=4))
    incremental = snapshot(conn)
    assert rollup.rebuild(conn) == 2500
    assert snapshot(conn) == incremental
    # damage two days' rows, then rebuild only a window that covers them
    conn.execute("DELETE FROM rollup_traffic_hour WHERE bucket_ms >= ?", (T0 + DAY,))
    conn.execute("UPDATE rollup_account_day SET requests = 0")
    rollup.rebuild(conn, T0 - DAY, T0 + 4 * DAY)
    assert snapshot(conn) == incremental


def test_prune_keeps_rollups_and_rebuild_leaves_pruned_buckets(conn):
    events = random_events(2000, seed=5)
    insert(conn, events)
    kept = snapshot(conn)
    cutoff = T0 + DAY + 5 * HOUR  # mid-day: that day is only partly in raw rows now
    deleted = store.prune(conn, cutoff)
    assert deleted == sum(1 for e in events if e.row["ts_ms"] < cutoff) > 0
    assert snapshot(conn) == kept
    rebuilt = rollup.rebuild(conn)
    first_whole_day = ((cutoff - 1) // DAY + 1) * DAY
    assert rebuilt == sum(1 for e in events if e.row["ts_ms"] >= first_whole_day)
    assert snapshot(conn) == kept


def test_apply_nothing_and_rebuild_empty(conn):
    assert rollup.apply(conn, []) == 0
    assert rollup.rebuild(conn) == 0
    with pytest.raises(ValueError):
        rollup.rebuild(conn, chunk_ms=HOUR)


def test_corrupt_sketch_rolls_back_the_whole_batch(conn):
    common = {"provider": "codex", "analytics_model": "gpt-5.4", "status_code": 200}
    store.insert_batch(conn, [make_event(1, T0 + 10, latency_ms=100, **common)], origin="test")
    conn.execute("UPDATE rollup_latency_hour SET latency_sketch = x'ff00'")
    with pytest.raises(SketchError):
        store.insert_batch(conn, [make_event(2, T0 + 20, latency_ms=200, **common)], origin="test")
    assert conn.execute("SELECT count(*), count(*) FILTER (WHERE 1) FROM events").fetchone() == (1, 1)
    assert conn.execute("SELECT sum(requests) FROM rollup_traffic_day").get == 1
    assert conn.execute("SELECT count(*) FROM event_ledger").get == 1


def test_merge_function_is_registered_once_per_connection(db_path, conn):
    rollup.register_functions(conn)
    rollup.register_functions(conn)
    blob = conn.execute("SELECT cpm_sketch_merge(?, ?)", (Sketch({3: 1}).to_bytes(), Sketch({3: 2}).to_bytes())).get
    assert Sketch.from_bytes(blob).bins == {3: 3}
    other = apsw.Connection(db_path)
    with pytest.raises(apsw.SQLError):
        other.execute("SELECT cpm_sketch_merge(NULL, NULL)").get


def test_hand_computed_five_minutes(conn):
    common = {"provider": "codex", "analytics_model": "gpt-5.4", "account_key": "acct-a", "status_code": 200,
              "total_tokens": 10}
    events = [
        make_event(1, T0 + 1_000, latency_ms=100, **common),
        make_event(2, T0 + 299_999, latency_ms=300, **common),  # the last millisecond of the bucket
        make_event(3, T0 + 300_000, latency_ms=50, failed=1, status_class="5xx",  # the next bucket
                   **{**common, "status_code": 503}),
    ]
    store.insert_batch(conn, events, origin="test")
    rows = conn.execute("SELECT bucket_ms, status_code, requests, failures, total_tokens, latency_sum_ms, first_ms, "
                        "last_ms, last_failure_ms FROM rollup_traffic_5m ORDER BY bucket_ms").fetchall()
    assert rows == [(T0, 200, 2, 0, 20, 400, T0 + 1_000, T0 + 299_999, None),
                    (T0 + 300_000, 503, 1, 1, 10, 50, T0 + 300_000, T0 + 300_000, T0 + 300_000)]
    totals = conn.execute("SELECT bucket_ms, instance, failed, requests, latency_sketch "
                          "FROM rollup_latency_total_5m ORDER BY bucket_ms").fetchall()
    assert [r[:4] for r in totals] == [(T0, "default", 0, 2), (T0 + 300_000, "default", 1, 1)]
    assert Sketch.from_bytes(totals[0][4]) == Sketch({sketch_index(100): 1, sketch_index(300): 1})
    hours = conn.execute("SELECT account_key, analytics_model, failed, requests FROM "
                         "rollup_account_model_latency_hour ORDER BY failed").fetchall()
    assert hours == [("acct-a", "gpt-5.4", 0, 2), ("acct-a", "gpt-5.4", 1, 1)]
    assert conn.execute("SELECT bucket_ms, requests FROM rollup_account_latency_hour").fetchall() == [(T0, 3)]


def undo_step_12(conn) -> None:
    """The events table of schema step 11 again, holding the view's rows (labels as text), with
    step 11's indexes and an event_private that refers to it."""
    import apsw
    from datasource.db import MIGRATIONS

    ref = apsw.Connection(":memory:")
    for step in MIGRATIONS[:11]:
        step(ref) if callable(step) else ref.execute(step)
    table_sql, private_sql = (ref.execute("SELECT sql FROM sqlite_schema WHERE name = ?", (name,)).get
                              for name in ("events", "event_private"))
    index_sqls = [r[0] for r in ref.execute(
        "SELECT sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events' AND sql IS NOT NULL")]
    columns = ", ".join(r[1] for r in ref.execute("PRAGMA table_info(events)"))
    ref.close()
    conn.execute(f"CREATE TEMP TABLE old_events AS SELECT {columns} FROM events")
    conn.execute("CREATE TEMP TABLE old_private AS SELECT * FROM event_private")
    conn.execute("DROP TABLE event_private; DROP VIEW events; DROP TABLE event_rows; DROP TABLE event_strings")
    conn.execute(table_sql)
    for sql in index_sqls:
        conn.execute(sql)
    conn.execute(f"INSERT INTO events({columns}) SELECT {columns} FROM temp.old_events")
    conn.execute(private_sql)
    conn.execute("INSERT INTO event_private SELECT * FROM temp.old_private")
    conn.execute("DROP TABLE temp.old_events; DROP TABLE temp.old_private")


def remigrate_from(conn, step: int) -> None:
    """Drop the rollup tables of the schema steps after `step`, set the schema back to `step` and
    migrate (their backfills run)."""
    from datasource.db import SCHEMA_VERSION, migrate

    with conn:
        if step < 12:
            undo_step_12(conn)
        for later, tables in rollup.STEP_TABLES.items():
            if later > step:
                for table in tables:
                    conn.execute(f"DROP TABLE {table}")
        if step < 9:  # step 9 also indexed older tables
            for table in ACCOUNT_INDEXED:
                conn.execute(f"DROP INDEX IF EXISTS {table}_account")
            conn.execute("DROP INDEX IF EXISTS events_action_ts")
        if step < 11:  # step 11 swapped the request and trace id indexes
            conn.execute("DROP INDEX events_request_hour; DROP INDEX events_trace_hour; "
                         "CREATE INDEX events_request_id ON events(request_id); "
                         "CREATE INDEX events_trace_id ON events(trace_id)")
        conn.pragma("user_version", step)
    assert migrate(conn) == SCHEMA_VERSION


@pytest.mark.parametrize("step, seed, table", [(5, 9, "rollup_latency_total_day"),
                                                (8, 11, "rollup_account_model_failure_day")])
def test_later_steps_backfill_their_tables_from_the_events_present(conn, step, seed, table):
    """A database at schema 5 (or 8) with events: steps 6 on (or 9) fill their new tables exactly
    as inserts would."""
    insert(conn, random_events(1500, seed=seed))
    incremental = snapshot(conn)
    remigrate_from(conn, step)
    assert snapshot(conn) == incremental
    assert_matches_raw(conn)
    assert conn.execute(f"SELECT sum(requests) FROM {table}").get == 1500


def test_step_7_backfills_accounts_by_failure_type(conn):
    events = random_events(1200, seed=10)
    insert(conn, events)
    incremental = snapshot(conn)
    remigrate_from(conn, 6)
    assert snapshot(conn) == incremental
    # failures per account and type, counted by hand from the events
    want: dict[tuple, int] = {}
    for e in events:
        if e.row["failed"]:
            k = (e.row["account_key"], e.row["failure_type"])
            want[k] = want.get(k, 0) + 1
    got = dict(((a, f), n) for a, f, n in conn.execute(
        "SELECT account_key, failure_type, sum(failures) FROM rollup_account_failure_day WHERE failed = 1 GROUP BY 1, 2"))
    assert got == want and sum(want.values()) > 100


def test_step_9_accounts_by_model_status_code_and_failure_type_by_hand(conn):
    """rollup_account_model_failure_*: one row per account x model x status code x failure type
    (with provider and status class), hourly and daily; a step 8 -> 9 upgrade backfills the same rows."""
    a = {"provider": "codex", "analytics_model": "gpt-5.4", "account_key": "acct-a", "total_tokens": 10}
    ok = {"status_code": 200, "status_class": "success", "failed": 0, "failure_type": "none"}
    quota = {"status_code": 429, "status_class": "4xx", "failed": 1, "failure_type": "quota"}
    upstream = {"status_code": 503, "status_class": "5xx", "failed": 1, "failure_type": "upstream"}
    events = [
        make_event(1, T0 + 1_000, **a, **ok),
        make_event(2, T0 + 2_000, **a, **ok),
        make_event(3, T0 + 3_000, **a, **quota),
        make_event(4, T0 + 4_000, **a, **quota),
        make_event(5, T0 + 5_000, **a, **upstream),
        make_event(6, T0 + HOUR + 1, **a, **quota),  # the next hour, same day
        make_event(7, T0 + 6_000, **{**a, "analytics_model": "gpt-5.5"}, **quota),  # another model
    ]
    store.insert_batch(conn, events[:4], origin="test")
    store.insert_batch(conn, events[4:], origin="test")
    cols = ("SELECT bucket_ms, analytics_model, status_code, failure_type, requests, failures, total_tokens, "
            "first_ms, last_ms, last_failure_ms FROM {} ORDER BY 1, 2, 3")
    hours = conn.execute(cols.format("rollup_account_model_failure_hour")).fetchall()
    assert hours == [
        (T0, "gpt-5.4", 200, "none", 2, 0, 20, T0 + 1_000, T0 + 2_000, None),
        (T0, "gpt-5.4", 429, "quota", 2, 2, 20, T0 + 3_000, T0 + 4_000, T0 + 4_000),
        (T0, "gpt-5.4", 503, "upstream", 1, 1, 10, T0 + 5_000, T0 + 5_000, T0 + 5_000),
        (T0, "gpt-5.5", 429, "quota", 1, 1, 10, T0 + 6_000, T0 + 6_000, T0 + 6_000),
        (T0 + HOUR, "gpt-5.4", 429, "quota", 1, 1, 10, T0 + HOUR + 1, T0 + HOUR + 1, T0 + HOUR + 1),
    ]
    day = T0 - T0 % DAY
    assert conn.execute(cols.format("rollup_account_model_failure_day")).fetchall() == [
        (day, "gpt-5.4", 200, "none", 2, 0, 20, T0 + 1_000, T0 + 2_000, None),
        (day, "gpt-5.4", 429, "quota", 3, 3, 30, T0 + 3_000, T0 + HOUR + 1, T0 + HOUR + 1),
        (day, "gpt-5.4", 503, "upstream", 1, 1, 10, T0 + 5_000, T0 + 5_000, T0 + 5_000),
        (day, "gpt-5.5", 429, "quota", 1, 1, 10, T0 + 6_000, T0 + 6_000, T0 + 6_000),
    ]
    assert {r[0] for r in conn.execute("SELECT DISTINCT status_class || '/' || provider || '/' || account_key "
                                       "FROM rollup_account_model_failure_day")} == {
        "success/codex/acct-a", "4xx/codex/acct-a", "5xx/codex/acct-a"}
    incremental = snapshot(conn)
    remigrate_from(conn, 8)
    assert snapshot(conn) == incremental


def test_step_9_indexes_the_account_rollups_and_the_action_events(conn):
    insert(conn, random_events(300, seed=12))
    remigrate_from(conn, 8)
    # the upgrade indexed the hourly account tables and rollup_api_key_day by account, and analyzed them
    indexes = {r[0]: r[1] for r in conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' "
                                                "AND name LIKE 'rollup_%_account'")}
    assert indexes == {f"{t}_account": t for t in ACCOUNT_INDEXED}
    analyzed = {r[0] for r in conn.execute("SELECT idx FROM sqlite_stat1")}
    assert set(indexes) <= analyzed
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'events_action_ts'").get == 1


def test_upsert_params_single_and_grouped_keys_by_hand():
    base = {"instance": "default", "provider": "codex", "analytics_model": "m", "failed": 0,
            "status_class": "success", "input_tokens": 0}
    hour = 3_600_000
    rows = [
        {**base, "ts_ms": 10 * hour + 5, "latency_ms": 100, "ttft_ms": 0, "input_tokens": 3},
        {**base, "ts_ms": 10 * hour + 9, "latency_ms": 250, "ttft_ms": None, "input_tokens": 4,
         "failed": 1, "status_class": "client_error"},
        {**base, "ts_ms": 11 * hour, "latency_ms": -1, "ttft_ms": 40, "analytics_model": "other"},
        {**base, "ts_ms": 10 * hour + 20, "latency_ms": 100, "ttft_ms": 7, "input_tokens": 5},
    ]
    spec = rollup.SPEC_BY_TABLE["rollup_latency_hour"]  # key: instance, provider, analytics_model, failed
    params = rollup.upsert_params(rows, [spec])["rollup_latency_hour"]
    n = len(rollup.MEASURES)
    by_key = {p[:5]: p for p in params}
    assert len(params) == 3
    pair = by_key[(10 * hour, "default", "codex", "m", 0)]  # rows 0 and 3
    assert pair[5:9] == (2, 2, 0, 0) and pair[9] == 3 + 5  # requests, successes, failures, unusual, input
    assert pair[5 + n:] == (10 * hour + 5, 10 * hour + 20, None, Sketch({sketch_index(100): 2}).to_bytes(),
                            Sketch({sketch_index(7): 1}).to_bytes())  # TTFT 0 is not a sample
    failed = by_key[(10 * hour, "default", "codex", "m", 1)]
    assert failed[5:9] == (1, 0, 1, 0)
    assert failed[5 + n:] == (10 * hour + 9, 10 * hour + 9, 10 * hour + 9,
                              Sketch({sketch_index(250): 1}).to_bytes(), None)
    lone = by_key[(11 * hour, "default", "codex", "other", 0)]  # latency -1 is not a sample
    assert lone[5 + n:] == (11 * hour, 11 * hour, None, None, Sketch({sketch_index(40): 1}).to_bytes())


@pytest.mark.parametrize("span", [2 * HOUR, 3 * DAY])  # dense (groups merge) and sparse (mostly single rows)
def test_upsert_params_derived_from_parent_groups_equal_each_table_grouped_from_the_rows(span):
    """upsert_params groups only the root tables from the rows and sums every other table from its
    parent's groups (day from hour, accounts from accounts x models, ...). Each table alone has no
    parent, so it is grouped straight from the rows: both must give the same parameters, sketch
    blobs and set encodings included, whatever the parameter order."""
    rows = [dict(e.row) for e in random_events(2000, seed=21, span=span)]
    derived = rollup.upsert_params(rows)
    assert [t for t, p in derived.items() if rollup._parent(rollup.SPEC_BY_TABLE[t], rollup.SPECS) is None] == [
        "rollup_api_key_day", "rollup_traffic_5m", "rollup_api_key_sets_5m", "rollup_account_model_failure_hour"]
    assert set(derived) == {spec.table for spec in rollup.SPECS}
    for spec in rollup.SPECS:
        alone = rollup.upsert_params(rows, [spec])[spec.table]
        assert sorted(derived[spec.table], key=repr) == sorted(alone, key=repr), spec.table
    merged = rollup.upsert_params(rows)["rollup_latency_total_day"]
    assert sum(p[1 + len(rollup._LATENCY_TOTAL)] for p in merged) == 2000  # requests


def test_backfill_and_rebuild_in_small_slices_equal_incremental(conn, monkeypatch):
    """backfill/rebuild read a chunk's events STREAM_ROWS at a time (bounded memory at 10 M);
    slicing a day into 7-event pieces must give the very same rows, sketches and sets byte for byte."""
    monkeypatch.setattr(rollup, "STREAM_ROWS", 7)
    insert(conn, random_events(600, seed=11))
    incremental = snapshot(conn)
    assert rollup.rebuild(conn) == 600
    assert snapshot(conn) == incremental
    remigrate_from(conn, 5)
    assert snapshot(conn) == incremental
    assert conn.execute("SELECT sum(requests) FROM rollup_api_key_sets_day").get == 600


def test_alias_params_from_full_rows_partial_rows_and_odd_values() -> None:
    full = {"provider": "openai", "payload_provider": None, "analytics_model": "gpt-5", "model": "gpt-5",
            "resolved_model": None, "account_key": "a1", "account": "x***@y.z", "auth_index": "a1",
            "api_key_hash": "h", "api_key_masked": "sk**"}
    expected = {("provider", "openai", "", ""), ("model", "gpt-5", "gpt-5", ""),
                ("account", "a1", "x***@y.z", "a1"), ("api_key", "h", "sk**", "")}
    assert rollup.alias_params([full, dict(full)]) == expected  # repeats collapse
    # a row without most columns takes the defaults; an unhashable value is stored as its text
    odd = {"provider": ["weird"], "analytics_model": "m"}
    assert rollup.alias_params([full, odd]) == expected | {
        ("provider", "['weird']", "", ""), ("model", "m", "-", ""), ("account", "-", "", ""), ("api_key", "", "", "")}


def test_dims_of_a_row_defaults_and_failed_as_0_or_1() -> None:
    defaults = tuple(rollup._DIM_DEFAULTS.values())
    assert rollup._dims({}) == defaults  # no column at all: every default
    full = {name: None for name in rollup._DIM_NAMES}
    assert rollup._dims(full) == defaults  # every column NULL: the same
    failed_at = rollup._DIM_NAMES.index("failed")
    for value, expected in ((True, 1), (2, 1), (0, 0), (False, 0), (1, 1)):
        dims = rollup._dims(dict(full, failed=value, provider="openai"))
        assert dims[failed_at] == expected and type(dims[failed_at]) is int
        assert dims[rollup._DIM_NAMES.index("provider")] == "openai"


def test_measures_count_null_or_missing_tokens_as_zero() -> None:
    row = {"failed": 1, "status_class": "unusual", "latency_ms": 250, "ttft_ms": None, "est_cost_usd": 0.0125,
           "input_tokens": 100, "output_tokens": None}  # the other token columns are missing
    tokens = (100,) + (0,) * (len(rollup.TOKEN_COLUMNS) - 1)
    assert rollup._measures(row) == (1, 0, 1, 1) + tokens + (12_500_000, 250, 1, 0, 0)
    assert rollup._measures(dict(row, output_tokens=""))[4:6] == (100, 0)  # an empty text too
    full = dict(row, **{c: 7 for c in rollup.TOKEN_COLUMNS})
    assert rollup._measures(full)[4:4 + len(rollup.TOKEN_COLUMNS)] == (7,) * len(rollup.TOKEN_COLUMNS)
