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
