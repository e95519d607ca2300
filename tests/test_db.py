import threading
import time

import apsw
import pytest

from collector_helpers import store_events
from datasource import txn
from datasource.db import SCHEMA_VERSION, Readers, SchemaError, connect, migrate, open_database


def test_fresh_database_is_wal_with_foreign_keys(db_path):
    conn = open_database(db_path)
    assert conn.pragma("journal_mode") == "wal"
    assert conn.pragma("foreign_keys") == 1
    assert conn.pragma("user_version") == SCHEMA_VERSION


def _hold_write_lock_on_a_new_rollback_file(path: str, seconds: float) -> threading.Thread:
    """A plain connection creates `path` (rollback journal, as SQLite makes new files), takes the
    write lock and keeps it for `seconds` in a thread."""
    holder = apsw.Connection(path)
    holder.execute("CREATE TABLE t(x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
    assert holder.pragma("journal_mode") == "delete"

    def release():
        time.sleep(seconds)
        holder.execute("COMMIT")
        holder.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_switching_a_new_file_to_wal_waits_for_another_writer(db_path):
    """SQLite answers the WAL switch BUSY at once (no busy handler) while another connection
    writes a rollback-mode file; connect() retries within its busy timeout."""
    thread = _hold_write_lock_on_a_new_rollback_file(db_path, 0.3)
    start = time.monotonic()
    conn = connect(db_path, busy_timeout_ms=3000)
    waited = time.monotonic() - start
    thread.join()
    assert conn.pragma("journal_mode") == "wal"
    assert 0.25 <= waited < 2.0
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]  # the other writer's row, committed


def test_switching_to_wal_gives_up_after_the_busy_timeout(db_path):
    thread = _hold_write_lock_on_a_new_rollback_file(db_path, 1.5)
    start = time.monotonic()
    with pytest.raises(apsw.BusyError):
        connect(db_path, busy_timeout_ms=200)
    waited = time.monotonic() - start
    thread.join()
    assert 0.2 <= waited < 1.0


def test_migrate_is_idempotent(db_path):
    conn = open_database(db_path)
    assert migrate(conn) == SCHEMA_VERSION
    assert migrate(conn) == SCHEMA_VERSION


def test_newer_schema_is_refused_with_a_clear_message(db_path):
    conn = connect(db_path)
    conn.pragma("user_version", SCHEMA_VERSION + 5)
    with pytest.raises(SchemaError, match="newer than this CPA Monitor understands"):
        migrate(conn)


def test_foreign_database_is_refused(db_path):
    conn = connect(db_path)
    conn.pragma("application_id", 1234)
    with pytest.raises(SchemaError, match="not a CPA Monitor database"):
        migrate(conn)


def test_readers_are_read_only_and_per_thread(db_path):
    open_database(db_path)
    readers = Readers(db_path)
    conn = readers.get()
    assert readers.get() is conn
    with pytest.raises(apsw.ReadOnlyError):
        conn.execute("INSERT INTO meta(key, value) VALUES ('a', 'b')")


# --- opening never writes what it does not have to (issue 7) ----------------------------------
def _summary(client) -> int:
    body = {"range": {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"},
            "targets": [{"refId": "S", "target": "summary"}]}
    response = client.post("/query", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return {f["name"]: f["values"] for f in response.get_json()[0]["fields"]}["requests"][0]


def test_opening_and_starting_while_a_writer_holds_the_lock(db_path):
    """The collector's transaction holds the write lock: a reader opens and queries, a current schema
    is checked without a write (migrate, ensure_schema), and the datasource starts and answers. Before,
    every read-write open ran APSW's PRAGMA optimize in its constructor and migrate rewrote
    user_version: both raised BusyError here."""
    from datasource.app import create_app
    from datasource.config import Settings
    from datasource.db import ensure_schema
    store_events(db_path, 0, 12)
    writer = connect(db_path)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta(key, value) VALUES ('uncommitted', 'x')")
    try:
        reader = Readers(db_path, busy_timeout_ms=0).get()
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 12
        assert reader.execute("SELECT count(*) FROM meta WHERE key = 'uncommitted'").fetchone()[0] == 0
        assert ensure_schema(db_path, busy_timeout_ms=0) == SCHEMA_VERSION
        other = open_database(db_path, busy_timeout_ms=0)  # a second writer's open (migrate: current, reads only)
        assert migrate(other) == SCHEMA_VERSION
        other.close()
        app = create_app(Settings.from_env({}, db=db_path, collector="off", busy_timeout_ms=0))
        assert _summary(app.test_client()) == 12
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_migrate_writes_only_the_steps_a_database_needs(db_path):
    from datasource.db import APPLICATION_ID, MIGRATIONS
    conn = connect(db_path)
    for step in MIGRATIONS[:2]:  # a database two steps old
        conn.execute(step)
    conn.pragma("user_version", 2)
    conn.pragma("application_id", APPLICATION_ID)
    assert migrate(conn) == SCHEMA_VERSION
    assert conn.pragma("user_version") == SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'rollup_aliases'").fetchone()[0] == 1
    watcher = connect(db_path, readonly=True)
    seen = watcher.pragma("data_version")
    assert migrate(conn) == SCHEMA_VERSION  # current now: nothing written
    assert watcher.pragma("data_version") == seen  # another connection's commit would change it
    watcher.close()



# --- planner statistics: the collector refreshes them an index at a time ---------------------------
def _stat(conn, idx: str):
    row = conn.execute("SELECT stat FROM sqlite_stat1 WHERE idx = ?", (idx,)).fetchone()
    return row[0] if row else None


def test_stale_statistics_lists_each_index_and_analyze_refreshes_it(db_path):
    """What `PRAGMA optimize` would ANALYZE, split by index: 30 events (one account, key, model;
    distinct timestamps and request ids) give the stat rows ANALYZE computes from them."""
    from datasource.db import analyze, stale_statistics
    store_events(db_path, 0, 30, optimize=False)
    conn = open_database(db_path, optimize=False)
    try:
        assert _stat(conn, "events_ts") is None
        stale = stale_statistics(conn)
        event_indexes = {row[1] for row in conn.execute("PRAGMA index_list(event_rows)")}  # schema step 12
        assert len(event_indexes) == 9 and event_indexes <= set(stale)
        assert "event_rows" not in stale  # split into its indexes: one short write lock each
        assert "sqlite_autoindex_event_ledger_1" in stale and "event_private" in stale
        for name in stale:
            analyze(conn, name)
        assert _stat(conn, "events_ts") == "30 1"  # 30 rows, each ts_ms its own
        assert _stat(conn, "events_account_ts") == "30 30 1"  # one account: 30 rows per key
        assert _stat(conn, "events_request_hour") == "30 30 1"  # one hour, 30 ids
        assert _stat(conn, "event_ledger") == "30 1 1"
        assert stale_statistics(conn) == []
    finally:
        conn.close()


def test_stale_statistics_leaves_out_empty_tables_without_an_index_until_they_hold_a_row(db_path):
    """ANALYZE writes no row for an empty table without an index, so optimize lists it at every
    check; stale_statistics leaves it out (the collector would log a refresh every 6 hours and make
    the readers reopen for nothing) and lists it once it holds a row."""
    from datasource.db import analyze, stale_statistics
    store_events(db_path, 0, 5, optimize=False)
    conn = open_database(db_path, optimize=False)
    try:
        empty = [t for (t,) in conn.execute(
            "SELECT name FROM sqlite_schema s WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND NOT EXISTS (SELECT 1 FROM pragma_index_list(s.name))")
            if conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] == 0]
        assert "account_status_changes" in empty
        for name in stale_statistics(conn):
            analyze(conn, name)
        assert stale_statistics(conn) == []
        debug = [line for (line,) in conn.execute("PRAGMA optimize=0x10003")]
        assert 'ANALYZE "main"."account_status_changes"' in debug  # what optimize itself still lists
        with txn.write(conn):
            conn.execute("INSERT INTO account_status_changes(ts_ms, instance, auth_index) VALUES (1, 'default', 'a1')")
        assert "account_status_changes" in stale_statistics(conn)
    finally:
        conn.close()


def test_connect_runs_optimize_unless_told_not_to(db_path):
    store_events(db_path, 0, 12, optimize=False)
    assert _stat(connect(db_path, optimize=False), "events_ts") is None
    assert _stat(connect(db_path, readonly=True), "events_ts") is None  # a reader never writes
    assert _stat(connect(db_path), "events_ts") == "12 1"


def test_a_reader_reopens_once_the_collector_marked_new_statistics(db_path, monkeypatch):
    """An open connection keeps the statistics it loaded: its plan stays as it was after another
    connection's ANALYZE, and the schema version does not move (sqlite_stat1 existed). Readers
    reopens the thread's connection once `statistics_ms` in meta changed (the collector writes it
    after a refresh)."""
    import datasource.db as db_module
    store_events(db_path, 0, 40, optimize=False)
    readers = Readers(db_path)
    first = readers.get()
    q = ("EXPLAIN QUERY PLAN SELECT id FROM events "
         "WHERE lid_account_key = (SELECT id FROM event_strings WHERE v = ?) AND ts_ms > ?")
    before = first.execute(q, ("x", 0)).fetchall()
    version = first.pragma("schema_version")
    writer = open_database(db_path, optimize=False)
    writer.execute("ANALYZE event_rows")  # one account for all 40 rows: its index is no help now
    monkeypatch.setattr(db_module, "STATISTICS_RECHECK_S", 0.0)
    readers._local.recheck = 0.0
    assert readers.get() is first and first.pragma("schema_version") == version
    assert first.execute(q, ("x", 0)).fetchall() == before  # the old statistics, still
    db_module.mark_statistics(writer, 1_700_000_000_000)
    writer.close()
    second = readers.get()
    assert second is not first
    fresh = connect(db_path, readonly=True)
    assert second.execute(q, ("x", 0)).fetchall() == fresh.execute(q, ("x", 0)).fetchall() != before
    assert readers.get() is second  # unchanged since: the same connection


# --- process set-up: SQLite's memory statistics -------------------------------------------

_MEMSTATUS_PROBE = """
import sys, apsw
if sys.argv[2] == "open-first":
    early = apsw.Connection(":memory:")  # a connection opened before datasource's first connect()
from datasource.db import connect
conn = connect(sys.argv[1])
conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(100000))")
print(apsw.memory_used(), apsw.status(apsw.SQLITE_STATUS_MEMORY_USED)[0])
"""


def _memory_used(path: str, mode: str) -> tuple[int, int]:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _MEMSTATUS_PROBE, path, mode], capture_output=True, text=True,
                         check=True, timeout=60)
    used, status = out.stdout.split()
    return int(used), int(status)


def test_the_first_connect_turns_sqlite_memory_statistics_off(tmp_path):
    """With SQLITE_CONFIG_MEMSTATUS off SQLite keeps no allocation totals (and takes no global mutex
    for them): both of the counters it would keep read 0 after a 100,000-byte blob went through."""
    assert _memory_used(str(tmp_path / "off.db"), "connect-first") == (0, 0)


def test_a_connection_opened_earlier_keeps_sqlite_default_statistics(tmp_path):
    """SQLite takes the setting only while shut down, which needs every connection closed: a process
    that opened one itself first is left with the default, and its counters count (a blob of
    100,000 bytes went through, so more than that was allocated)."""
    used, status = _memory_used(str(tmp_path / "on.db"), "open-first")
    assert used > 100_000 and status > 100_000


# --- SQLite's own log -------------------------------------------------------------------------
def _schema_retry_and_error(path: str) -> None:
    """A cached statement run again after another connection changed the schema (SQLite logs
    SQLITE_SCHEMA and prepares it again by itself), then a statement that fails."""
    a, b = connect(path), connect(path)
    a.execute("CREATE TABLE IF NOT EXISTS t(x)")
    a.execute("SELECT * FROM t").fetchall()
    b.execute("CREATE TABLE u(y)")
    assert a.execute("SELECT * FROM t").fetchall() == []
    with pytest.raises(apsw.SQLError):
        a.execute("SELECT * FROM nosuch")
    a.close()
    b.close()


def test_sqlite_log_keeps_errors_and_leaves_out_the_schema_retries(tmp_path, caplog):
    import logging

    from datasource.db import SQLITE_LOGGER
    caplog.set_level(logging.DEBUG)
    _schema_retry_and_error(str(tmp_path / "a.db"))
    sqlite = [r for r in caplog.records if r.name == "datasource.sqlite"]
    assert [(r.levelno, r.sqlite_code) for r in sqlite if "no such table: nosuch" in r.getMessage()] == [
        (logging.ERROR, apsw.SQLITE_ERROR)]
    assert not any("schema has changed" in r.getMessage() for r in caplog.records)
    # the retry is logged by SQLite all the same: at INFO, which the logger's level leaves out
    caplog.clear()
    SQLITE_LOGGER.setLevel(logging.INFO)  # setLevel, not the attribute: it clears logging's cache
    try:
        _schema_retry_and_error(str(tmp_path / "b.db"))
    finally:
        SQLITE_LOGGER.setLevel(logging.WARNING)
    assert any(r.name == "datasource.sqlite" and r.levelno == logging.INFO and "schema has changed" in r.getMessage()
               for r in caplog.records)
