import apsw
import pytest

from datasource.db import SCHEMA_VERSION, Readers, SchemaError, connect, migrate, open_database


def test_fresh_database_is_wal_with_foreign_keys(db_path):
    conn = open_database(db_path)
    assert conn.pragma("journal_mode") == "wal"
    assert conn.pragma("foreign_keys") == 1
    assert conn.pragma("user_version") == SCHEMA_VERSION


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
