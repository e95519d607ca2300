"""The collector flock: one holder per database, holder info, takeover when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from datasource.lock import CollectorLock, is_locked, lock_path, read_holder

HOLD_SCRIPT = """
import sys, time
from datasource.lock import CollectorLock
lock = CollectorLock(sys.argv[1])
print("held" if lock.try_acquire() else "busy", flush=True)
time.sleep(60)
"""


def test_second_lock_on_same_database_is_refused_until_released(db_path):
    first, second = CollectorLock(db_path), CollectorLock(db_path)
    assert first.try_acquire() is True
    assert first.try_acquire() is True  # idempotent for the holder
    assert second.try_acquire() is False
    assert second.held is False and is_locked(lock_path(db_path)) is True
    first.release()
    first.release()  # idempotent
    assert is_locked(lock_path(db_path)) is False
    assert second.try_acquire() is True
    second.release()


def test_holder_info_is_written_into_the_lock_file(db_path):
    lock = CollectorLock(db_path)
    before = int(time.time() * 1000)
    assert lock.try_acquire()
    holder = CollectorLock(db_path).holder()
    assert holder is not None
    assert holder.pid == os.getpid()
    assert before <= holder.started_ms <= int(time.time() * 1000)
    assert holder.describe().startswith(f"pid {os.getpid()} host ")
    lock.release()
    assert read_holder(lock.path) is None  # emptied on release


def test_lock_held_by_another_process_moves_over_when_it_dies(db_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, db_path], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        mine = CollectorLock(db_path)
        assert mine.try_acquire() is False
        assert mine.holder() is not None and mine.holder().pid == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert mine.try_acquire() is True
        assert mine.holder().pid == os.getpid()
        mine.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
