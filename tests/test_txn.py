"""datasource.txn: write transactions, and the rest of the process keeps running while one waits."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import apsw
import pytest

from datasource import store, txn
from datasource.db import open_database
from tests.test_store import event


@pytest.fixture
def conn(tmp_path):
    c = apsw.Connection(str(tmp_path / "t.db"))
    c.execute("CREATE TABLE t(x INTEGER)")
    yield c
    c.close()


def _values(c) -> list[int]:
    return [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")]


def test_commits_on_success(conn):
    with txn.write(conn):
        conn.execute("INSERT INTO t VALUES (1), (2)")
        assert conn.in_transaction
    assert not conn.in_transaction
    assert _values(conn) == [1, 2]


def test_rolls_back_and_reraises(conn):
    with pytest.raises(RuntimeError, match="boom"):
        with txn.write(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")
    assert not conn.in_transaction
    assert _values(conn) == []


def test_nested_is_a_savepoint(conn):
    with txn.write(conn):
        conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ValueError):
            with txn.write(conn):
                conn.execute("INSERT INTO t VALUES (2)")
                raise ValueError("inner only")
        with txn.write(conn):
            conn.execute("INSERT INTO t VALUES (3)")
    assert _values(conn) == [1, 3]


def test_failed_commit_rolls_back(tmp_path):
    c = apsw.Connection(str(tmp_path / "fk.db"))
    c.pragma("foreign_keys", True)
    c.execute("CREATE TABLE p(id INTEGER PRIMARY KEY);"
              "CREATE TABLE ch(pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(apsw.ConstraintError):
        with txn.write(c):
            c.execute("INSERT INTO ch VALUES (7)")  # checked at COMMIT: no parent 7
    assert not c.in_transaction
    assert c.execute("SELECT count(*) FROM ch").get == 0
    with txn.write(c):  # the connection is usable again
        c.execute("INSERT INTO p VALUES (7)")
        c.execute("INSERT INTO ch VALUES (7)")
    assert c.execute("SELECT count(*) FROM ch").get == 1


HOLD_S = 1.5
HOLDER = """
import sys, time, apsw
c = apsw.Connection(sys.argv[1])
c.set_busy_timeout(5000)
c.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("COMMIT")
"""


def test_other_threads_run_while_insert_batch_waits_for_the_write_lock(tmp_path):
    """Another process holds the write lock for 1.5 s; insert_batch waits it out (busy timeout
    5 s) and stores its events, while a thread of this process ticking every 5 ms never stalls
    (APSW's `with conn:` under IMMEDIATE stalled it for the whole 1.5 s)."""
    path = str(tmp_path / "m.db")
    conn = open_database(path, busy_timeout_ms=5000)
    items = [event(1), event(2), event(3)]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(HOLD_S)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        gaps: list[float] = []
        stop = threading.Event()

        def tick() -> None:
            last = time.monotonic()
            while not stop.is_set():
                time.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = threading.Thread(target=tick)
        ticker.start()
        started = time.monotonic()
        result = store.insert_batch(conn, items, origin="test")
        waited = time.monotonic() - started
        stop.set()
        ticker.join()
    finally:
        holder.wait(timeout=10)
    assert result.inserted == 3
    assert waited >= 1.0  # it did wait for the other writer
    assert max(gaps) < 0.5, f"a thread of this process stalled {max(gaps):.2f} s"
    assert conn.execute("SELECT count(*) FROM events").get == 3
