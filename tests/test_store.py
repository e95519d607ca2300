"""store.insert_batch / prune / backup against real SQLite files."""

from __future__ import annotations

import hashlib

import apsw
import pytest

from datasource import store
from datasource.db import connect, open_database
from datasource.model import Normalized, Rejected


def event(n: int, *, ts_ms: int = 1_778_000_000_000, **extra) -> Normalized:
    digest = hashlib.sha256(f"event-{n}".encode()).hexdigest()
    row = {
        "event_hash": digest,
        "ts_ms": ts_ms,
        "ts": "2026-05-05T16:53:20Z",
        "model": "gpt-5.4",
        "analytics_model": "gpt-5.4",
        "provider": "codex",
        "payload_provider": "codex",
        "input_tokens": 10 * n,
        "output_tokens": n,
        "created_ms": ts_ms + 5,
    }
    row.update(extra.pop("row", {}))
    private = extra.pop("private", {"fail_body": None, "client_ip": None, "x_forwarded_for": None, "raw_json": None})
    return Normalized(row=row, private=private, ledger_hash=bytes.fromhex(digest)[:16])


def count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").get


def test_insert_then_same_batch_again_is_all_duplicates(conn):
    batch = [event(1), event(2), event(3)]
    first = store.insert_batch(conn, batch, origin="test", now_ms=1)
    assert (first.inserted, first.duplicates, first.dead_letters) == (3, 0, 0)
    assert first.inserted_ids == [1, 2, 3]
    assert conn.execute("SELECT sum(input_tokens), sum(output_tokens) FROM events").fetchone() == (60, 6)
    second = store.insert_batch(conn, batch, origin="test", now_ms=2)
    assert (second.inserted, second.duplicates, second.inserted_ids) == (0, 3, [])
    assert count(conn, "events") == 3
    assert count(conn, "event_ledger") == 3


def test_duplicate_within_one_batch_counts_once(conn):
    result = store.insert_batch(conn, [event(7), event(8), event(7)], origin="test")
    assert (result.inserted, result.duplicates) == (2, 1)
    assert conn.execute("SELECT sum(input_tokens) FROM events").get == 150


def test_ledger_keys_old_repeated_and_new_in_one_batch(conn):
    store.insert_batch(conn, [event(1)], origin="test")
    result = store.insert_batch(conn, [event(9), event(1), event(9), event(10)], origin="test")
    # event 1 is in the ledger already, the second event 9 repeats the first; ids follow input order
    assert (result.inserted, result.duplicates, result.inserted_ids) == (2, 2, [2, 3])
    assert conn.execute("SELECT id, input_tokens FROM events ORDER BY id").fetchall() == [(1, 10), (2, 90), (3, 100)]
    assert count(conn, "event_ledger") == 3


def test_batch_of_rejected_items_only(conn):
    result = store.insert_batch(conn, [Rejected("not an object", b"[]")], origin="test", now_ms=5)
    assert (result.inserted, result.duplicates, result.dead_letters) == (0, 0, 1)
    assert count(conn, "event_ledger") == 0


def test_private_row_only_when_it_has_a_value(conn):
    plain = event(1)
    secret = event(2, private={"fail_body": "raw body", "client_ip": "192.0.2.1", "x_forwarded_for": None,
                               "raw_json": None})
    result = store.insert_batch(conn, [plain, secret], origin="test")
    rows = conn.execute("SELECT event_id, fail_body, client_ip, x_forwarded_for FROM event_private").fetchall()
    assert rows == [(result.inserted_ids[1], "raw body", "192.0.2.1", None)]


def test_rejected_items_become_dead_letters_next_to_stored_events(conn):
    items = [event(1), Rejected("invalid JSON: Expecting value", b"not json"), event(2)]
    result = store.insert_batch(conn, items, origin="ingest:x.jsonl", instance="east", now_ms=1234)
    assert (result.inserted, result.duplicates, result.dead_letters) == (2, 0, 1)
    assert conn.execute("SELECT received_ms, instance, origin, reason, payload FROM dead_letters").fetchall() == [
        (1234, "east", "ingest:x.jsonl", "invalid JSON: Expecting value", b"not json")
    ]


def test_enrichment_names_the_account_and_fills_only_missing_other_fields(conn):
    with conn:
        conn.execute(
            "INSERT INTO accounts(instance, auth_index, name, label, account, provider, project_id, updated_ms) "
            "VALUES ('default', 'a1', 'alice.json', 'Alice', 'alice@example.com', 'openai', 'proj-9', 1)"
        )
        conn.execute(
            "INSERT INTO accounts(instance, auth_index, name, label, account, provider, project_id, updated_ms) "
            "VALUES ('default', 'b2', 'bob.json', 'Bob', NULL, NULL, NULL, 1)"
        )
    items = [
        event(1, row={"auth_index": "a1"}),
        # normalize's fallback label (the masked source) gives way to the auth file's account
        event(2, row={"auth_index": "a1", "account": "ali***@example.com", "source": "ali***@example.com",
                      "project_id": "own"}),
        # an account the event brought itself (an imported export line) is not the fallback: kept
        event(5, row={"auth_index": "a1", "account": "kept", "source": "ali***@example.com"}),
        event(3, row={"auth_index": "b2"}),
        event(4, row={"auth_index": "zz"}),
    ]
    store.insert_batch(conn, items, origin="test")
    rows = conn.execute(
        "SELECT auth_index, account, auth_file, project_id, provider, payload_provider FROM events ORDER BY id"
    ).fetchall()
    assert rows == [
        ("a1", "alice@example.com", "alice.json", "proj-9", "openai", "codex"),
        ("a1", "alice@example.com", "alice.json", "own", "openai", "codex"),
        ("a1", "kept", "alice.json", "proj-9", "openai", "codex"),
        ("b2", "Bob", "bob.json", None, "codex", "codex"),
        ("zz", None, None, None, "codex", "codex"),
    ]


def test_unknown_row_keys_are_dropped_not_interpolated(conn, caplog):
    bad = event(1, row={"nope; DROP TABLE events": 1})
    result = store.insert_batch(conn, [bad], origin="test")
    assert result.inserted == 1
    assert count(conn, "events") == 1
    assert "dropping unknown events columns: nope; DROP TABLE events" in caplog.text


def test_a_failing_batch_rolls_back_ledger_and_rows(conn):
    broken = Normalized(row={"event_hash": "x" * 64, "ts_ms": 5}, private={}, ledger_hash=b"\x01" * 16)
    with pytest.raises(apsw.ConstraintError):  # ts and created_ms are NOT NULL
        store.insert_batch(conn, [event(1), broken], origin="test")
    assert count(conn, "events") == 0
    assert count(conn, "event_ledger") == 0
    assert store.insert_batch(conn, [event(1)], origin="test").inserted == 1


def test_ten_thousand_events_in_batches_of_500_are_20_commits(conn):
    commits: list[int] = []

    def hook() -> bool:
        commits.append(1)
        return False

    conn.set_commit_hook(hook)
    total = 0
    for start in range(0, 10_000, 500):
        total += store.insert_batch(conn, [event(n) for n in range(start, start + 500)], origin="test").inserted
    conn.set_commit_hook(None)
    assert total == 10_000
    assert len(commits) == 20
    assert count(conn, "events") == 10_000


def test_prune_deletes_old_events_and_private_rows_but_keeps_the_ledger(conn):
    old = [event(n, ts_ms=1000 + n, private={"fail_body": f"b{n}"}) for n in range(7)]
    new = [event(n, ts_ms=5000 + n, private={"fail_body": f"b{n}"}) for n in range(7, 10)]
    store.insert_batch(conn, old + new, origin="test")
    store.insert_batch(conn, [Rejected("r", b"x")], origin="test", now_ms=10)
    store.insert_batch(conn, [Rejected("r", b"y")], origin="test", now_ms=9000)
    assert store.prune(conn, 5000, batch=3) == 7
    assert conn.execute("SELECT min(ts_ms), count(*) FROM events").fetchone() == (5000 + 7, 3)
    assert count(conn, "event_private") == 3
    assert count(conn, "event_ledger") == 10
    assert conn.execute("SELECT payload FROM dead_letters").fetchall() == [(b"y",)]
    again = store.insert_batch(conn, old, origin="test")
    assert (again.inserted, again.duplicates) == (0, 7)


def test_prune_rejects_a_non_positive_batch(conn):
    with pytest.raises(ValueError, match="batch must be positive"):
        store.prune(conn, 1, batch=0)


def test_backup_is_a_complete_readable_copy(conn, tmp_path):
    store.insert_batch(conn, [event(n) for n in range(25)], origin="test")
    dest = str(tmp_path / "copy.db")
    store.backup(conn, dest)
    copy = open_database(dest)
    assert count(copy, "events") == 25
    assert count(copy, "event_ledger") == 25
    assert copy.execute("PRAGMA integrity_check").get == "ok"


def test_backup_refuses_to_overwrite_the_database_itself(conn, db_path):
    with pytest.raises(ValueError, match="destination is the database itself"):
        store.backup(conn, db_path)


def test_export_rows_filter_and_order(conn):
    store.insert_batch(conn, [
        event(1, ts_ms=300, row={"instance": "a", "api_key_hash": "h1", "account_key": "k1"}),
        event(2, ts_ms=100, row={"instance": "a", "model": "m(high)", "analytics_model": "m"}),
        event(3, ts_ms=200, row={"instance": "b", "api_key_masked": "sk******01"}),
        event(4, ts_ms=400, row={"instance": "a"}),
    ], origin="test")
    def hashes(**filters):
        rows = store.iter_export_rows(conn, 100, 400, filters)
        return [r["input_tokens"] for r in rows]
    assert hashes() == [20, 30, 10]
    assert hashes(instance="a") == [20, 10]
    assert hashes(model="m") == [20]
    assert hashes(model="m(high)") == [20]
    assert hashes(api_key="h1") == [10]
    assert hashes(api_key="sk******01") == [30]
    assert hashes(account="k1") == [10]
    assert hashes(provider="codex", instance=None) == [20, 30, 10]
    with pytest.raises(ValueError, match="unknown export filters: colour"):
        list(store.iter_export_rows(conn, 0, 1, {"colour": "x"}))


def test_table_columns_only_for_store_tables(conn):
    assert "event_hash" in store.table_columns(conn, "events")
    with pytest.raises(ValueError):
        store.table_columns(conn, "accounts")


def test_deferred_rollups_are_the_rows_a_later_apply_adds(conn, tmp_path):
    from datasource import rollup

    hour = 3_600_000
    batches = [[event(n, ts_ms=1_778_000_000_000 + n * 600_000, row={"latency_ms": 100 * n, "ttft_ms": 7})
                for n in range(b * 4, b * 4 + 4)] for b in range(3)]
    pending: list = []
    for batch in batches:
        store.insert_batch(conn, batch, origin="test", rollup_rows=pending)
    # a duplicate is not deferred twice
    assert store.insert_batch(conn, batches[0][:1], origin="test", rollup_rows=pending).duplicates == 1
    assert [row["id"] for row in pending] == list(range(1, 13))
    assert count(conn, "rollup_traffic_hour") == 0  # nothing applied yet
    with conn:
        rollup.apply(conn, pending)
    # 12 events 10 minutes apart from 1_778_000_000_000 (16:53:20 UTC): hours 16, 17 and 18 hold 1, 6, 5
    assert conn.execute("SELECT bucket_ms, requests, input_tokens, latency_sum_ms FROM rollup_traffic_hour "
                        "ORDER BY bucket_ms").fetchall() == [
        (1_777_996_800_000, 1, 0, 0),
        (1_777_996_800_000 + hour, 6, 10 * (1 + 2 + 3 + 4 + 5 + 6), 100 * (1 + 2 + 3 + 4 + 5 + 6)),
        (1_777_996_800_000 + 2 * hour, 5, 10 * (7 + 8 + 9 + 10 + 11), 100 * (7 + 8 + 9 + 10 + 11)),
    ]
    # the same batches stored the usual way give the same rollup rows, sketches included
    other = open_database(str(tmp_path / "per-batch.db"))
    for batch in batches:
        store.insert_batch(other, batch, origin="test")
    for spec in rollup.SPECS:
        query = f"SELECT * FROM {spec.table} ORDER BY " + ", ".join(("bucket_ms",) + spec.dims)
        assert conn.execute(query).fetchall() == other.execute(query).fetchall(), spec.table
    other.close()


def test_prune_step_stops_at_its_budget_or_stop_and_finishes_with_dead_letters(conn):
    old, new = 1_000_000, 2_000_000
    store.insert_batch(conn, [event(i, ts_ms=old + i) for i in range(5)] + [event(9, ts_ms=new)], origin="test")
    store.insert_batch(conn, [Rejected("bad", b"x")], origin="test", now_ms=old)
    # a zero budget ends after one transaction of 2; so does stop()
    assert store.prune_step(conn, new, batch=2, budget_s=0) == (2, False)
    assert store.prune_step(conn, new, batch=2, stop=lambda: True) == (2, False)
    assert count(conn, "dead_letters") == 1  # kept until the prune finishes
    assert store.prune_step(conn, new, batch=2, budget_s=0) == (1, True)
    assert count(conn, "dead_letters") == 0
    assert conn.execute("SELECT ts_ms FROM events").fetchall() == [(new,)]
    assert store.prune_step(conn, new, batch=2) == (0, True)
    with pytest.raises(ValueError):
        store.prune_step(conn, new, batch=0)


def test_step_10_keys_the_ledger_by_time_and_keeps_every_key(tmp_path):
    from datasource.db import SCHEMA_VERSION, migrate
    from test_interned import database_at_step

    old = database_at_step(str(tmp_path / "step9.db"), 9)
    batch = [event(3, ts_ms=3_000), event(1, ts_ms=1_000), event(2, ts_ms=2_000)]
    assert store.insert_batch(old, batch, origin="test").inserted == 3  # ledger keyed by hash alone
    before = sorted(old.execute("SELECT ts_ms, hash FROM event_ledger").fetchall())
    assert migrate(old) == SCHEMA_VERSION >= 10
    pk = [(row[1], row[5]) for row in old.execute("PRAGMA table_info(event_ledger)") if row[5]]
    assert sorted(pk, key=lambda c: c[1]) == [("ts_ms", 1), ("hash", 2)]
    # every key kept, and a WITHOUT ROWID scan now walks them in time order
    assert old.execute("SELECT ts_ms, hash FROM event_ledger").fetchall() == before
    again = store.insert_batch(old, batch + [event(4, ts_ms=4_000)], origin="test")
    assert (again.inserted, again.duplicates) == (1, 3)
    old.close()


def test_step_11_keys_the_request_and_trace_id_indexes_by_hour(tmp_path):
    from datasource.db import SCHEMA_VERSION, migrate
    from test_interned import database_at_step

    old = database_at_step(str(tmp_path / "step10.db"), 10)
    hour = 3_600_000
    batch = [event(1, ts_ms=5 * hour, row={"request_id": "q1", "trace_id": "t1"}),
             event(2, ts_ms=6 * hour - 1, row={"request_id": "q2"}),
             event(3, ts_ms=6 * hour, row={"trace_id": "t3"})]
    assert store.insert_batch(old, batch, origin="test").inserted == 3
    assert migrate(old) == SCHEMA_VERSION >= 11
    indexes = {name: sql for name, sql in old.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'event_rows'")}  # step 12
    assert "events_request_id" not in indexes and "events_trace_id" not in indexes
    assert "(ts_ms / 3600000, request_id) WHERE request_id IS NOT NULL" in indexes["events_request_hour"]
    assert "(ts_ms / 3600000, trace_id) WHERE trace_id IS NOT NULL" in indexes["events_trace_hour"]
    # analysed in the step: two rows in the request id index (q1, q2), two in the trace id one
    stats = dict(old.execute("SELECT idx, stat FROM sqlite_stat1 WHERE idx LIKE 'events_%_hour'"))
    assert stats["events_request_hour"].split()[0] == "2" and stats["events_trace_hour"].split()[0] == "2"
    # each id is found in its hour: (hour, id) pairs, in key order
    assert old.execute("SELECT ts_ms / 3600000, request_id FROM event_rows INDEXED BY events_request_hour "
                       "WHERE request_id IS NOT NULL ORDER BY 1, 2").fetchall() == [(5, "q1"), (5, "q2")]
    assert old.execute("SELECT ts_ms / 3600000, trace_id FROM event_rows INDEXED BY events_trace_hour "
                       "WHERE trace_id IS NOT NULL ORDER BY 1, 2").fetchall() == [(5, "t1"), (6, "t3")]
    old.close()


# --- the garbage collector threshold of a writing process ---------------------------------

@pytest.fixture
def gc_threshold():
    import gc
    saved = gc.get_threshold()
    yield gc
    gc.set_threshold(*saved)


def test_raise_gc_threshold_raises_a_default_young_threshold(gc_threshold):
    gc_threshold.set_threshold(700, 10, 10)  # CPython's default
    assert store.raise_gc_threshold() is True
    assert gc_threshold.get_threshold() == (50_000, 20, 10) == store.WRITER_GC_THRESHOLD
    assert store.raise_gc_threshold() is False  # already there
    assert gc_threshold.get_threshold() == (50_000, 20, 10)


@pytest.mark.parametrize("threshold", [(100_000, 5, 5), (0, 10, 10)])
def test_raise_gc_threshold_leaves_a_higher_or_disabled_threshold(gc_threshold, threshold):
    """An operator's higher threshold stays, and a young threshold of 0 (collection off) is not
    switched back on."""
    gc_threshold.set_threshold(*threshold)
    assert store.raise_gc_threshold() is False
    assert gc_threshold.get_threshold() == threshold


def test_the_collector_ingestor_and_the_ingest_command_raise_the_threshold(gc_threshold, db_path):
    import io
    from datasource.cmd_store import ingest_stream
    from datasource.ingest import Ingestor

    conn = open_database(db_path)
    try:
        gc_threshold.set_threshold(700, 10, 10)
        Ingestor(conn, "default").close()
        assert gc_threshold.get_threshold() == (50_000, 20, 10)
        gc_threshold.set_threshold(700, 10, 10)
        result = ingest_stream(conn, io.BytesIO(b""), origin="test")
        assert (result.inserted, gc_threshold.get_threshold()) == (0, (50_000, 20, 10))
    finally:
        conn.close()
