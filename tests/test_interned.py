"""Schema step 12: labels stored once in event_strings, rows in event_rows, `events` a view."""

from __future__ import annotations

import hashlib

import apsw
import pytest

from datasource import filters, interned, store, txn
from datasource.db import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, connect, migrate
from datasource.model import Clause, Normalized

T0 = 1_778_000_000_000


def event(n: int, **row) -> Normalized:
    digest = hashlib.sha256(f"interned-{n}".encode()).hexdigest()
    base = {"event_hash": digest, "ts_ms": T0 + n * 1000, "ts": "2026-05-05T16:53:20Z", "model": "gpt-5.4",
            "analytics_model": "gpt-5.4", "provider": "codex", "payload_provider": "codex",
            "input_tokens": 10 * n, "output_tokens": n, "created_ms": T0 + n * 1000 + 5}
    base.update(row)
    private = {"fail_body": None, "client_ip": f"192.0.2.{n}", "x_forwarded_for": None, "raw_json": None}
    return Normalized(row=base, private=private, ledger_hash=bytes.fromhex(digest)[:16])


# labels with the cases that matter: shared values, NULL, '', a 32-byte BLOB (source_hash)
EVENTS = [
    event(1, account_key="acct-a", account="Alice", request_type="chat", endpoint="POST /v1/chat",
          source_hash="ab" * 32, api_key_hash="11" * 32, status_class="success"),
    event(2, account_key="acct-b", account="Bob", request_type=None, endpoint="",
          source_hash="cd" * 32, api_key_hash="22" * 32, status_class="4xx", failed=1, action="reauth",
          action_reason="token_revoked", failure_type="auth"),
    event(3, account_key="acct-a", account="Alice", request_type="responses", endpoint="POST /v1/responses",
          api_key_hash=None, quota_plan="plus", quota_used_pct=40.0),
    event(4, account_key="acct-c", account=None, request_type="chat", provider="claude", payload_provider=None,
          model="claude-x", analytics_model="claude-x", user_agent="cli/1.0 (linux)"),
]


def database_at_step(path: str, step: int) -> apsw.Connection:
    """A new database migrated to schema `step` only (what an older CPA Monitor left)."""
    conn = connect(path)
    with conn:
        for migration in MIGRATIONS[:step]:
            migration(conn) if callable(migration) else conn.execute(migration)
        conn.pragma("user_version", step)
        conn.pragma("application_id", APPLICATION_ID)
    return conn


def step_11_database(path: str) -> apsw.Connection:
    return database_at_step(path, 11)


def columns(conn: apsw.Connection) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA table_info(events)") if not r[1].startswith(interned.ID_PREFIX)]


def test_the_upgrade_keeps_every_value_the_private_rows_and_the_statistics(tmp_path):
    conn = step_11_database(str(tmp_path / "old.db"))
    assert store.insert_batch(conn, EVENTS, origin="test").inserted == 4
    conn.execute("ANALYZE")
    names = columns(conn)
    before = conn.execute(f"SELECT {', '.join(names)} FROM events ORDER BY id").fetchall()
    private = conn.execute("SELECT * FROM event_private ORDER BY event_id").fetchall()
    stats = dict(conn.execute("SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'events'"))

    assert migrate(conn) == SCHEMA_VERSION == 12
    assert conn.execute("SELECT type FROM sqlite_schema WHERE name = 'events'").get == "view"
    assert columns(conn) == names  # same columns, same order
    assert conn.execute(f"SELECT {', '.join(names)} FROM events ORDER BY id").fetchall() == before
    assert conn.execute("SELECT * FROM event_private ORDER BY event_id").fetchall() == private
    assert dict(conn.execute("SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'event_rows'")) == stats
    # each distinct label once: by hand from EVENTS and the defaults
    labels = set()
    for (value,) in conn.execute("SELECT v FROM event_strings"):
        assert value not in labels
        labels.add(value)
    assert {"acct-a", "acct-b", "acct-c", "Alice", "Bob", "chat", "", "POST /v1/chat", bytes.fromhex("ab" * 32),
            "11" * 32, "default", "codex", "claude", "reauth", "token_revoked", "plus"} <= labels
    assert "Carol" not in labels and None not in labels
    # the rows hold small integers where the labels were
    assert conn.execute("SELECT typeof(account_key), typeof(source_hash), typeof(request_type) FROM event_rows "
                        "WHERE id = 2").fetchone() == ("integer", "integer", "null")
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_the_upgrade_of_an_empty_database_and_a_fresh_one_end_alike(tmp_path):
    old = step_11_database(str(tmp_path / "old.db"))
    migrate(old)
    fresh = connect(str(tmp_path / "fresh.db"))
    migrate(fresh)
    schema = "SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE name NOT LIKE 'sqlite_stat%' ORDER BY name"
    assert old.execute(schema).fetchall() == fresh.execute(schema).fetchall()


def test_insert_batch_writes_ids_and_reuses_labels_across_batches(conn):
    assert store.insert_batch(conn, EVENTS[:2], origin="test").inserted == 2
    count = conn.execute("SELECT count(*) FROM event_strings").get
    assert store.insert_batch(conn, [event(5, account_key="acct-a", account="Alice", request_type="chat")],
                              origin="test").inserted == 1
    assert conn.execute("SELECT count(*) FROM event_strings").get == count  # nothing new in event 5
    row = conn.execute("SELECT account_key, account, request_type, instance, cache_state, status_class "
                       "FROM events WHERE id = 3").fetchone()
    assert row == ("acct-a", "Alice", "chat", "default", "miss", "success")  # defaults for what it left out
    ids = conn.execute("SELECT account_key FROM event_rows WHERE id IN (1, 3)").fetchall()
    assert ids[0] == ids[1] and isinstance(ids[0][0], int)


def test_a_rolled_back_batch_leaves_no_label_behind(conn):
    store.insert_batch(conn, EVENTS[:1], origin="test")
    before = conn.execute("SELECT * FROM event_strings ORDER BY id").fetchall()
    with pytest.raises(RuntimeError):
        with txn.write(conn):
            store.insert_batch(conn, [event(9, account_key="acct-new", endpoint="GET /v1/new")], origin="test")
            raise RuntimeError("the store failed after the insert")
    assert conn.execute("SELECT * FROM event_strings ORDER BY id").fetchall() == before
    # the next batch gets fresh ids for the same labels, and the view reads them back
    store.insert_batch(conn, [event(9, account_key="acct-new", endpoint="GET /v1/new")], origin="test")
    assert conn.execute("SELECT account_key, endpoint FROM events WHERE ts_ms = ?", (T0 + 9000,)).fetchone() == (
        "acct-new", "GET /v1/new")


def test_inserting_into_the_view_interns_and_applies_the_old_defaults(conn):
    conn.execute("INSERT INTO events(event_hash, ts_ms, ts, created_ms, account_key, endpoint) "
                 "VALUES (x'01', 5, '', 6, 'acct-z', NULL)")
    row = conn.execute("SELECT instance, provider, account_key, model, analytics_model, cache_state, status_class, "
                       "failure_type, endpoint, input_tokens, failed, est_cost_usd FROM events").fetchone()
    assert row == ("default", "unknown", "acct-z", "-", "-", "miss", "success", "none", None, 0, 0, 0)
    conn.execute("DELETE FROM events WHERE account_key = 'acct-z'")
    assert conn.execute("SELECT count(*) FROM event_rows").get == 0


def test_pruning_deletes_rows_and_their_private_rows_and_keeps_the_labels(conn):
    store.insert_batch(conn, EVENTS, origin="test")
    labels = conn.execute("SELECT count(*) FROM event_strings").get
    assert store.prune(conn, T0 + 2500) == 2
    assert conn.execute("SELECT id FROM events ORDER BY id").fetchall() == [(3,), (4,)]
    assert conn.execute("SELECT event_id FROM event_private ORDER BY event_id").fetchall() == [(3,), (4,)]
    assert conn.execute("SELECT count(*) FROM event_strings").get == labels


CLAUSES = [
    Clause("request_type", "=", ("chat",)),
    Clause("request_type", "=", ("chat", "responses")),
    Clause("request_type", "=", ("",)),  # NULL and '' alike
    Clause("request_type", "!=", ("chat",)),
    Clause("request_type", "=~", ("^re",)),
    Clause("request_type", "!~", ("^re",)),
    Clause("request_type", "=~", ("^$",)),  # matches the NULL one as ''
    Clause("endpoint", "=", ("",)),
    Clause("endpoint", "!=", ("",)),
    Clause("account", "=", ("Alice",)),
    Clause("account", "=", ("acct-c",)),
    Clause("provider", "=", ("codex",)),
    Clause("search", "=", ("v1/ch",)),
    Clause("search", "=", ("laude",)),
    Clause("search", "=", ("nothing-like-it",)),
]
EXPECTED = [[1, 4], [1, 3, 4], [2], [2, 3], [3], [1, 2, 4], [2], [2, 4], [1, 3], [1, 3], [4], [1, 2, 3], [1], [4], []]


@pytest.mark.parametrize("clause, ids", list(zip(CLAUSES, EXPECTED)), ids=[f"{c.key}{c.op}{c.values}" for c in CLAUSES])
def test_filters_through_label_ids_select_the_same_events_as_through_text(conn, clause, ids):
    store.insert_batch(conn, EVENTS, origin="test")
    conn.create_scalar_function("regexp", filters.regexp, 2, deterministic=True)  # as query.py does
    found = {}
    for mode in (False, True):
        where, params = filters.where_sql([clause], interned=mode)
        found[mode] = [r[0] for r in conn.execute(f"SELECT id FROM events WHERE {where} ORDER BY id", params)]
    assert found[False] == found[True] == ids
    where, _ = filters.where_sql([clause], interned=True)
    assert ("lid_" in where) == (clause.values != ("",))  # '' stands for NULL too: matched as text


def test_label_seeks_and_the_partial_action_index_apply_through_the_view(conn):
    store.insert_batch(conn, EVENTS, origin="test")
    conn.execute("ANALYZE")

    def plan(sql: str, params=()) -> str:
        return " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))

    seek = plan(f"SELECT id FROM events WHERE lid_account_key = {interned.label_id_sql()} AND ts_ms >= ?",
                ("acct-a", 0))
    assert "USING COVERING INDEX events_account_ts (account_key=? AND ts_ms>?)" in seek
    actions = plan("SELECT lid_account_key, count(*) FROM events WHERE failed = 1 AND lid_action IS NOT NULL "
                   "AND ts_ms >= ? GROUP BY 1", (0,))
    assert "COVERING INDEX events_action_ts" in actions
    assert conn.execute("SELECT account_key, action FROM events WHERE lid_action IS NOT NULL").fetchall() == [
        ("acct-b", "reauth")]


def test_the_trigger_defaults_are_the_old_tables_defaults_and_every_label_column_is_text(tmp_path):
    """interned.DEFAULTS must be what step 1-11's events table declared for its label columns."""
    conn = step_11_database(str(tmp_path / "old.db"))
    info = {r[1]: (r[2], r[4]) for r in conn.execute("PRAGMA table_info(events)")}
    assert set(interned.COLUMNS) <= set(info)
    assert all(info[name][0] == "TEXT" for name in interned.COLUMNS)
    declared = {name: default.strip("'") for name, (_, default) in info.items()
                if name in interned.INTERNED and default is not None}
    assert declared == interned.DEFAULTS


def test_export_reads_event_rows_and_maps_every_label_back(conn, monkeypatch):
    store.insert_batch(conn, EVENTS, origin="test")
    view = {r[0]: r for r in conn.execute("SELECT id, account_key, account, endpoint, source_hash, user_agent "
                                          "FROM events")}
    real = interned.texts
    loads = []

    def first_load_misses_a_label(c):  # a label the collector added after the export read them
        loads.append(1)
        found = real(c)
        return {k: v for k, v in found.items() if v != "acct-c"} if len(loads) == 1 else found

    monkeypatch.setattr(interned, "texts", first_load_misses_a_label)
    rows = list(store.iter_export_rows(conn, 0, 2**62, {}))
    assert len(loads) == 2
    assert [(r["id"], r["account_key"], r["account"], r["endpoint"], r["source_hash"], r["user_agent"])
            for r in rows] == [(i, k, a, e, (h.hex() if h else h), u) for i, k, a, e, h, u in view.values()]
    assert not any(k.startswith(interned.ID_PREFIX) for r in rows for k in r)


@pytest.mark.parametrize("filters, ids", [
    ({"account": "Alice"}, [1, 3]), ({"account": "acct-c"}, [4]), ({"account": "nobody"}, []),
    ({"provider": "claude"}, [4]), ({"model": "gpt-5.4", "account": "acct-b"}, [2]), ({}, [1, 2, 3, 4]),
])
def test_export_filters_match_labels_in_any_of_their_columns(conn, filters, ids):
    store.insert_batch(conn, EVENTS, origin="test")
    assert [r["id"] for r in store.iter_export_rows(conn, 0, 2**62, filters)] == ids


def test_the_key_columns_the_planner_seeks_by_id_are_interned():
    """query_plan.key_equals_sql binds a label id for every LABELS key column."""
    from datasource.query_plan import LABELS
    assert set(LABELS) == {"account_key", "api_key_hash"} and set(LABELS) <= interned.INTERNED
