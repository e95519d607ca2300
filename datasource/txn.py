"""Write transactions that let the rest of the process run while SQLite waits.

APSW's `with conn:` runs its BEGIN, COMMIT and RELEASE without releasing the GIL. Under
`transaction_mode = "IMMEDIATE"` the BEGIN waits out the busy timeout while another process
holds the write lock, and a COMMIT runs the WAL auto-checkpoint; for that long every other
thread of the process stood still: gunicorn's request threads, which share the process with
the collector thread (measured: a 4.06 s freeze of a 5 ms ticker thread while another process
held the lock for 4 s; a 2.1 s freeze during a commit that checkpointed a 200 MB WAL). Issued as
statements through `execute`, the same waits release the GIL (0.02 s worst gap in both cases).
tests/test_txn.py holds both measurements as tests.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from typing import Iterator

import apsw

logger = logging.getLogger(__name__)
_savepoints = itertools.count(1)


@contextmanager
def write(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception; a savepoint when already inside one."""
    if conn.in_transaction:
        name = f"cpm_sp{next(_savepoints)}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield conn
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: apsw.Connection) -> None:
    """Undo an open transaction; the exception that got us here is the one the caller sees."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except apsw.Error as exc:  # e.g. the connection is closing; SQLite rolls back on close
        logger.warning("ROLLBACK failed: %s", exc)
