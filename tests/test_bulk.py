"""datasource.bulk: multi-row VALUES in chunks of 64/16/4/1 rows on a real SQLite file."""

from __future__ import annotations

import apsw
import pytest

from datasource import bulk


@pytest.fixture()
def conn(tmp_path):
    c = apsw.Connection(str(tmp_path / "b.db"), statementcachesize=512)
    c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, n INTEGER NOT NULL, s TEXT)")
    yield c
    c.close()


def _executions(conn: apsw.Connection) -> int:
    stats = conn.cache_stats()
    return stats["hits"] + stats["misses"]


def test_rows_land_in_order_in_chunks_of_64_16_4_1(conn) -> None:
    rows = [(k, k * 10, f"r{k}") for k in range(1, 86)]  # 85 = 64 + 16 + 4 + 1
    before = _executions(conn)
    assert bulk.execute(conn, "INSERT INTO t(k, n, s)", rows) == []
    assert _executions(conn) - before == 4
    assert conn.execute("SELECT k, n, s FROM t ORDER BY k").fetchall() == rows
    before = _executions(conn)
    bulk.execute(conn, "INSERT INTO t(k, n, s)", [(k, 0, None) for k in range(100, 100 + 63)])  # 3 x 16 + 3 x 4 + 3
    assert _executions(conn) - before == 9


def test_returning_gives_one_row_per_row_inserted_in_input_order(conn) -> None:
    conn.execute("INSERT INTO t VALUES (5, 1, 'old')")
    rows = [(k, 1, None) for k in (7, 5, 3, 7, 9)]  # 5 is there; the second 7 meets the first
    got = bulk.execute(conn, "INSERT OR IGNORE INTO t(k, n, s)", rows, "RETURNING k")
    assert got == [(7,), (3,), (9,)]


def test_an_upsert_meets_the_rows_before_it_in_the_same_statement(conn) -> None:
    head, tail = "INSERT INTO t(k, n, s)", "ON CONFLICT(k) DO UPDATE SET n = n + excluded.n"
    bulk.execute(conn, head, [(1, 2, None), (2, 3, None), (1, 4, None)], tail)
    assert conn.execute("SELECT k, n FROM t ORDER BY k").fetchall() == [(1, 6), (2, 3)]


def test_no_rows_runs_nothing_and_bad_rows_are_refused(conn) -> None:
    before = _executions(conn)
    assert bulk.execute(conn, "INSERT INTO t(k, n, s)", []) == []
    assert _executions(conn) == before
    with pytest.raises(ValueError, match="3 values"):  # 3 + 1 + 2 values would bind shifted
        bulk.execute(conn, "INSERT INTO t(k, n, s)", [(1, 1, "a"), (2,), (3, 3)])
    with pytest.raises(ValueError):
        bulk.execute(conn, "INSERT INTO t", [()])
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_a_chunk_whose_text_apsw_would_not_cache_is_not_used() -> None:
    head = "INSERT INTO wide(" + ", ".join(f"c{i}" for i in range(150)) + ")"
    sizes = [size for size, _ in bulk._texts(head, 150, "")]
    # a row is 1 + 150 x 2 = 301 characters: 64 rows (19 KB) are past 16,384 bytes, 16 (4.8 KB) are not
    assert sizes == [16, 4, 1]
    assert all(len(sql) < bulk.MAX_CACHEABLE_BYTES for _, sql in bulk._texts(head, 150, ""))


def test_other_statements_stay_cached_through_a_large_insert(conn) -> None:
    """The reason for the module: executemany hands its statement back to APSW's cache ring after
    every row, evicting one entry each time; a bulk insert executes once per chunk."""
    probe = "SELECT count(*) FROM t WHERE n >= ?"
    conn.execute(probe, (0,)).fetchone()
    conn.executemany("INSERT INTO t(k, n, s) VALUES (?, ?, ?)", [(k, k, None) for k in range(1, 1001)])
    assert probe not in [e["query"] for e in conn.cache_stats(True)["entries"]]
    conn.execute(probe, (0,)).fetchone()
    bulk.execute(conn, "INSERT INTO t(k, n, s)", [(k, k, None) for k in range(1001, 5001)])
    assert probe in [e["query"] for e in conn.cache_stats(True)["entries"]]
    assert conn.execute(probe, (0,)).fetchone()[0] == 5000
