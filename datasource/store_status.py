"""SQL for what the collector records besides events: its status, episodes, accounts, credential errors.

Every statement is constant text with bound parameters. `read_status(conn)` is the one read the
web side and `cpa-monitor status` share.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from datasource import txn
from datasource.store import Connection

logger = logging.getLogger(__name__)

STATUS_COLUMNS = (
    "instance", "url", "mode", "transport", "state", "holder", "last_consumed_ms", "last_inserted_ms",
    "inserted", "duplicates", "dead_letters", "last_error", "last_error_stage", "last_error_ms",
    "usage_publishing", "queue_retention_s", "warnings", "started_ms", "updated_ms",
)
UPSERT_STATUS = (
    "INSERT INTO collector_status(instance, url, mode, transport, state, holder, last_consumed_ms, "
    "last_inserted_ms, inserted, duplicates, dead_letters, last_error, last_error_stage, last_error_ms, "
    "usage_publishing, queue_retention_s, warnings, started_ms, updated_ms) VALUES (:instance, :url, :mode, "
    ":transport, :state, :holder, :last_consumed_ms, :last_inserted_ms, :inserted, :duplicates, "
    ":dead_letters, :last_error, :last_error_stage, :last_error_ms, :usage_publishing, :queue_retention_s, "
    ":warnings, :started_ms, :updated_ms) ON CONFLICT(instance) DO UPDATE SET url = excluded.url, "
    "mode = excluded.mode, transport = excluded.transport, state = excluded.state, holder = excluded.holder, "
    "last_consumed_ms = excluded.last_consumed_ms, last_inserted_ms = excluded.last_inserted_ms, "
    "inserted = excluded.inserted, duplicates = excluded.duplicates, dead_letters = excluded.dead_letters, "
    "last_error = excluded.last_error, last_error_stage = excluded.last_error_stage, "
    "last_error_ms = excluded.last_error_ms, usage_publishing = excluded.usage_publishing, "
    "queue_retention_s = excluded.queue_retention_s, warnings = excluded.warnings, "
    "started_ms = excluded.started_ms, updated_ms = excluded.updated_ms"
)
SELECT_STATUS = (
    "SELECT instance, url, mode, transport, state, holder, last_consumed_ms, last_inserted_ms, inserted, "
    "duplicates, dead_letters, last_error, last_error_stage, last_error_ms, usage_publishing, "
    "queue_retention_s, warnings, started_ms, updated_ms FROM collector_status ORDER BY instance"
)
SELECT_TOTALS = "SELECT inserted, duplicates, dead_letters FROM collector_status WHERE instance = ?"
INSERT_STANDBY = (
    "INSERT INTO collector_status(instance, url, state, warnings, updated_ms) VALUES (?, ?, 'standby', ?, ?) "
    "ON CONFLICT(instance) DO NOTHING"
)
INSERT_EPISODE = "INSERT INTO collector_episodes(instance, kind, start_ms, end_ms, detail) VALUES (?, ?, ?, ?, ?)"
CLOSE_EPISODE = "UPDATE collector_episodes SET end_ms = ? WHERE id = ? AND end_ms IS NULL"
SELECT_ACCOUNT_STATUS = "SELECT status FROM accounts WHERE instance = ? AND auth_index = ?"
UPSERT_ACCOUNT = (
    "INSERT INTO accounts(instance, auth_index, name, label, account, provider, project_id, status, "
    "status_message, disabled, unavailable, updated_ms) VALUES (:instance, :auth_index, :name, :label, "
    ":account, :provider, :project_id, :status, :status_message, :disabled, :unavailable, :updated_ms) "
    "ON CONFLICT(instance, auth_index) DO UPDATE SET name = excluded.name, label = excluded.label, "
    "account = excluded.account, provider = excluded.provider, project_id = excluded.project_id, "
    "status = excluded.status, status_message = excluded.status_message, disabled = excluded.disabled, "
    "unavailable = excluded.unavailable, updated_ms = excluded.updated_ms"
)
INSERT_STATUS_CHANGE = (
    "INSERT INTO account_status_changes(ts_ms, instance, auth_index, label, old_status, new_status) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
INSERT_CREDENTIAL_ERROR = (
    "INSERT INTO credential_errors(ts_ms, instance, provider, model, auth_id, auth_index, account_key, "
    "status_code, code, retryable, quota_exceeded, next_retry_after_ms, summary, created_ms) VALUES "
    "(:ts_ms, :instance, :provider, :model, :auth_id, :auth_index, :account_key, :status_code, :code, "
    ":retryable, :quota_exceeded, :next_retry_after_ms, :summary, :created_ms)"
)
INSERT_CREDENTIAL_PRIVATE = "INSERT INTO credential_error_private(error_id, body) VALUES (?, ?)"


@dataclass(slots=True)
class StatusRow:
    """One upstream's collector status, written whole after every change."""

    instance: str
    url: str
    mode: str
    transport: str = ""
    state: str = "starting"
    holder: str = ""
    last_consumed_ms: int | None = None
    last_inserted_ms: int | None = None
    inserted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    last_error_stage: str | None = None
    last_error_ms: int | None = None
    usage_publishing: bool | None = None
    queue_retention_s: int | None = None
    warnings: list[str] = field(default_factory=list)
    started_ms: int | None = None
    updated_ms: int | None = None


SIDECAR_SUFFIX = ".collector-status.json"
SIDECAR_BYTES = 16384


def sidecar_path(db_path: str) -> str:
    return db_path + SIDECAR_SUFFIX


class StatusSidecar:
    """Status rows the database refused (disk full, read-only file), kept in `<db>.collector-status.json`.

    The file is reserved (filled with spaces) while the disk can still take it, and later
    rewritten in place at the same length, so a full disk does not refuse it (no new blocks on
    ext4/xfs/tmpfs; a copy-on-write filesystem may still refuse). Readers prefer a sidecar row
    that is newer than the database row (`read_status`, the `collector` target, GET /status).
    """

    def __init__(self, db_path: str) -> None:
        self.path = sidecar_path(db_path)
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}
        try:
            if not os.path.exists(self.path) or os.path.getsize(self.path) < SIDECAR_BYTES:
                with open(self.path, "wb") as fh:
                    fh.write(b"{}".ljust(SIDECAR_BYTES, b" "))
        except OSError as exc:
            logger.warning("cannot reserve %s (%s): status during store faults goes to the log only", self.path, exc)

    def put(self, row: StatusRow) -> bool:
        with self._lock:
            self._rows[row.instance] = asdict(row)
            return self._write()

    def clear(self, instance: str) -> None:
        with self._lock:
            if self._rows.pop(instance, None) is not None:
                self._write()

    def _write(self) -> bool:
        data = json.dumps(self._rows, separators=(",", ":")).encode("utf-8")
        try:
            with open(self.path, "r+b") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.write(data.ljust(size, b" "))
            return True
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.path, exc)
            return False


def read_sidecar(db_path: str) -> dict[str, dict[str, Any]]:
    """The sidecar rows by instance ({} when there is none or it is unreadable)."""
    if not db_path:
        return {}
    try:
        with open(sidecar_path(db_path), encoding="utf-8") as fh:
            text = fh.read().strip()
        data = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def newer_sidecar_row(sidecar: dict[str, dict[str, Any]], instance: str, db_updated_ms: Any) -> dict[str, Any] | None:
    row = sidecar.get(instance)
    if row is None or not isinstance(row.get("updated_ms"), int):
        return None
    return row if db_updated_ms is None or row["updated_ms"] > db_updated_ms else None


def write_status(conn: Connection, row: StatusRow) -> None:
    params = asdict(row)
    params["warnings"] = json.dumps(row.warnings) if row.warnings else None
    params["usage_publishing"] = None if row.usage_publishing is None else int(row.usage_publishing)
    with txn.write(conn):
        conn.execute(UPSERT_STATUS, params)


def read_totals(conn: Connection, instance: str) -> tuple[int, int, int]:
    """(inserted, duplicates, dead_letters) recorded for `instance`, zeros when there is no row."""
    found = conn.execute(SELECT_TOTALS, (instance,)).fetchone()
    return (int(found[0]), int(found[1]), int(found[2])) if found else (0, 0, 0)


def write_standby(conn: Connection, instance: str, url: str, warning: str, now_ms: int) -> None:
    """Record a standby row for an upstream nobody has reported on yet (never overwrites the holder's)."""
    with txn.write(conn):
        conn.execute(INSERT_STANDBY, (instance, url, json.dumps([warning]), now_ms))


def read_status(conn: Connection) -> list[dict[str, Any]]:
    """Every upstream's status row; `warnings` as a list, `usage_publishing` as bool or None.

    A sidecar row newer than the database's (written while the store refused writes) wins."""
    out = []
    sidecar = read_sidecar(conn.filename)
    for values in conn.execute(SELECT_STATUS):
        row = dict(zip(STATUS_COLUMNS, values))
        row["warnings"] = json.loads(row["warnings"]) if row["warnings"] else []
        if row["usage_publishing"] is not None:
            row["usage_publishing"] = bool(row["usage_publishing"])
        newer = newer_sidecar_row(sidecar, row["instance"], row["updated_ms"])
        if newer is not None:
            row.update({k: newer[k] for k in STATUS_COLUMNS if k in newer})
        out.append(row)
    return out


def open_episode(conn: Connection, instance: str, kind: str, start_ms: int, detail: str) -> int:
    """A gap / error / dropped_subscription / reconnect episode; returns its id for close_episode."""
    with txn.write(conn):
        conn.execute(INSERT_EPISODE, (instance, kind, start_ms, None, detail))
        return conn.last_insert_rowid()


def add_episode(conn: Connection, instance: str, kind: str, start_ms: int, end_ms: int, detail: str) -> int:
    with txn.write(conn):
        conn.execute(INSERT_EPISODE, (instance, kind, start_ms, end_ms, detail))
        return conn.last_insert_rowid()


def close_episode(conn: Connection, episode_id: int, end_ms: int) -> None:
    with txn.write(conn):
        conn.execute(CLOSE_EPISODE, (end_ms, episode_id))


def upsert_accounts(conn: Connection, instance: str, rows: Sequence[dict[str, Any]], now_ms: int) -> int:
    """Write the auth-file rows for `instance`; record each status change. Returns the changes."""
    changes = 0
    with txn.write(conn):
        for row in rows:
            params = dict(row, instance=instance, updated_ms=now_ms)
            old = conn.execute(SELECT_ACCOUNT_STATUS, (instance, params["auth_index"])).fetchone()
            if old is not None and old[0] != params["status"]:
                conn.execute(INSERT_STATUS_CHANGE, (now_ms, instance, params["auth_index"],
                                                    params.get("label"), old[0], params["status"]))
                changes += 1
            conn.execute(UPSERT_ACCOUNT, params)
    return changes


def insert_credential_error(conn: Connection, row: dict[str, Any], body: str | None) -> int:
    """One credential error event; the raw body goes to credential_error_private only."""
    with txn.write(conn):
        conn.execute(INSERT_CREDENTIAL_ERROR, row)
        error_id = conn.last_insert_rowid()
        if body:
            conn.execute(INSERT_CREDENTIAL_PRIVATE, (error_id, body))
    return error_id
