"""`cpa-monitor compact`: free pages back to the filesystem, the events kept, never beside a collector."""

from __future__ import annotations

import os

from click.testing import CliRunner

from datasource import store
from datasource.cli import cli
from datasource.db import open_database
from datasource.lock import CollectorLock
from test_interned import T0, event


def filled(db_path: str) -> None:
    """400 events with 4 KB failure summaries (overflow pages), the older 300 of them pruned."""
    conn = open_database(db_path)
    store.insert_batch(conn, [event(n, fail_summary=f"{n:04d}" * 1000) for n in range(1, 401)], origin="test")
    assert store.prune(conn, T0 + 301 * 1000) == 300
    conn.close()


def test_compact_returns_the_free_pages_and_keeps_every_event(db_path):
    filled(db_path)
    conn = open_database(db_path)
    free_before = conn.pragma("freelist_count")
    kept = conn.execute("SELECT id, account_key, fail_summary FROM events ORDER BY id").fetchall()
    conn.close()
    before = os.path.getsize(db_path)
    assert free_before > 300  # the pruned summaries' pages at least

    result = CliRunner().invoke(cli, ["compact", "--db", db_path])
    assert result.exit_code == 0, result.output
    after = os.path.getsize(db_path)
    assert result.output.splitlines()[-1] == (f"compacted {db_path}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
                                              f"({free_before * 4096 / 1e6:.1f} MB of free pages)")
    assert after < before - 300 * 4096
    conn = open_database(db_path)
    assert conn.pragma("freelist_count") == 0
    assert conn.execute("SELECT id, account_key, fail_summary FROM events ORDER BY id").fetchall() == kept
    assert len(kept) == 100 and kept[0][0] == 301
    assert conn.execute("PRAGMA integrity_check").get == "ok"
    conn.close()


def test_compact_refuses_while_a_collector_holds_the_lock(db_path):
    filled(db_path)
    before = os.path.getsize(db_path)
    lock = CollectorLock(db_path)
    assert lock.try_acquire()
    try:
        result = CliRunner().invoke(cli, ["compact", "--db", db_path])
    finally:
        lock.release()
    assert result.exit_code == 1
    assert f"a collector is running on {db_path} (pid {os.getpid()}" in result.output
    assert "stop it first" in result.output
    assert os.path.getsize(db_path) == before
