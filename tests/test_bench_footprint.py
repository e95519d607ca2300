"""benchmarks.bench_footprint's per-column byte count, on a real SQLite file with hand-sized rows."""

from __future__ import annotations

import apsw
import pytest

from benchmarks.bench_footprint import _int_bytes, column_bytes


@pytest.mark.parametrize(("value", "size"), [
    (0, 0), (1, 0), (2, 1), (127, 1), (128, 2), (-128, 1), (-129, 2), (32767, 2), (32768, 3),
    (2**31 - 1, 4), (2**31, 6), (2**47 - 1, 6), (2**47, 8), (-(2**63), 8),
])
def test_int_bytes_follow_sqlite_record_sizes(value: int, size: int) -> None:
    assert _int_bytes(value) == size


def test_column_bytes_reads_the_middle_rows(tmp_path) -> None:
    path = str(tmp_path / "f.db")
    conn = apsw.Connection(path)
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, a TEXT, n INTEGER, r REAL, b BLOB)")
    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", [
        (1, "abc", 0, 1.5, b"zz"),          # before the middle (max id 3 // 2 = 1): not read
        (2, None, 200, None, None),         # id 1 byte, n 2
        (3, "x" * 60, -129, 2.0, b"\0" * 4),  # id 1, a 60 (a two-byte type), n 2, r 8, b 4
    ])
    conn.close()
    read, header, columns = column_bytes(path, 10)
    assert read == 2
    assert dict(columns) == {"id": 1.0, "a": 30.0, "n": 2.0, "r": 4.0, "b": 2.0}
    assert [name for name, _ in columns] == ["a", "r", "n", "b", "id"]
    # type bytes: row 2 five, row 3 six (the 60-byte text); plus the header-size byte
    assert header == pytest.approx((5 + 6) / 2 + 1)


def test_column_bytes_of_an_empty_table(tmp_path) -> None:
    path = str(tmp_path / "e.db")
    conn = apsw.Connection(path)
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, a TEXT)")
    conn.close()
    assert column_bytes(path, 5) == (0, 1.0, [("id", 0.0), ("a", 0.0)])


def test_footprint_reads_event_rows_and_counts_free_pages_after_schema_step_12(tmp_path) -> None:
    """Since step 12 the rows are in event_rows with labels as small ids: the 64-character key
    hash costs one byte a row there (its id), and pages freed by a prune are counted apart."""
    from benchmarks.bench_footprint import table_bytes
    from datasource import store
    from datasource.db import open_database
    from test_interned import EVENTS, event

    path = str(tmp_path / "s12.db")
    conn = open_database(path)
    store.insert_batch(conn, EVENTS + [event(n, api_key_hash=f"{n:02d}" * 32, fail_summary="x" * 3000)
                                       for n in range(10, 40)], origin="test")
    conn.close()
    read, _, columns = column_bytes(path, 100)
    sizes = dict(columns)
    assert read == 34 // 2  # the rows after the middle id (17 of 34)
    assert sizes["api_key_hash"] == 1.0 and sizes["account_key"] <= 1.0  # ids under 128: one byte or none
    assert sizes["fail_summary"] == 3000.0  # not interned: stored as text
    events, tables, free = table_bytes(path)
    assert events == 34 and "event_rows" in dict(tables) and free == 0
    conn = open_database(path)
    store.prune(conn, 1_778_000_000_000 + 40_000)  # every event: their overflow pages are freed
    conn.close()
    assert table_bytes(path)[2] > 30 * 3000
