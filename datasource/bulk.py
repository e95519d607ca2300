"""Many rows per statement: multi-row VALUES in a few fixed sizes, instead of executemany.

APSW's statement cache is a ring: a statement is taken out of it while it runs and put back
after, into the next slot, evicting whatever was there. `executemany` puts its statement back
after every row, so one executemany of 4,000 rows turned the ring (200 slots) twenty times and
evicted every other statement: each insert_batch prepared its ~30 statements again, the 22 rollup
upserts among them (7 % of insert_batch in the 10 M store, py-spy).

Here a statement carries up to 64 rows (`VALUES (?,?),(?,?),...`), and the rows left over go in
chunks of 16, 4 and 1, so a table's rows take at most rows/64 + 9 executions and its texts are
four fixed strings. SQLite runs a multi-row VALUES row by row, as executemany did: an
upsert meets the rows before it, RETURNING gives one row per row inserted.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Sequence

import apsw

# Rows per statement, largest first; the smaller sizes take what is left (at most 3 of each).
# Fewer sizes than every power of two: fewer texts to keep cached, each used in nearly every batch.
CHUNKS = (64, 16, 4, 1)
# APSW does not cache a statement text this long or longer (Connection.cache_stats()
# "max_cacheable_bytes"); a chunk size whose text would be is not used.
MAX_CACHEABLE_BYTES = 16384

_SQL: dict[tuple[str, int, str], tuple[tuple[int, str], ...]] = {}


def _texts(head: str, width: int, tail: str) -> tuple[tuple[int, str], ...]:
    """(rows, SQL text) per chunk size whose text APSW caches, largest first (1 always)."""
    key = (head, width, tail)
    found = _SQL.get(key)
    if found is None:
        if width <= 0:
            raise ValueError("a row needs at least one column")
        row = "(" + ",".join("?" * width) + ")"
        texts = []
        for size in CHUNKS:
            sql = f"{head} VALUES {','.join([row] * size)}{' ' + tail if tail else ''}"
            if size == 1 or len(sql.encode()) < MAX_CACHEABLE_BYTES:
                texts.append((size, sql))
        found = _SQL[key] = tuple(texts)
    return found


def execute(conn: apsw.Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = "",
            width: int | None = None) -> list[tuple[Any, ...]]:
    """`head VALUES (...),(...) tail` over `rows` (each a sequence of `width` values, the width of
    the first row by default); returns what a RETURNING in `tail` gives, in row order."""
    if not rows:
        return []
    width = len(rows[0]) if width is None else width
    if any(len(row) != width for row in rows):  # rows of mixed widths would bind shifted values
        raise ValueError(f"every row needs {width} values")
    texts = _texts(head, width, tail)
    out: list[tuple[Any, ...]] = []
    done, total = 0, len(rows)
    for size, sql in texts:
        while total - done >= size:
            out.extend(conn.execute(sql, tuple(chain.from_iterable(rows[done:done + size]))))
            done += size
    return out
