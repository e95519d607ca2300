"""Write side of the SQLite store: batched inserts behind the dedup ledger, retention, backup.

All SQL here is constant text with bound parameters. The one dynamic part, the
column list of an INSERT, is never taken from input: it is the intersection of
the row's keys with the table's own columns (read from the schema), so a row
key the table does not know is dropped with a warning instead of reaching SQL.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import apsw

from datasource import bulk, interned, rollup, rowpack, txn
from datasource.model import InsertResult, Normalized, Rejected

logger = logging.getLogger(__name__)

# Re-exported so callers above the store layer can type and catch without importing apsw.
Connection = apsw.Connection
StoreError = apsw.Error

INSERT_LEDGER = "INSERT OR IGNORE INTO event_ledger(hash, ts_ms)"  # bulk.execute: VALUES ..., then
LEDGER_RETURNING = "RETURNING hash"
SELECT_MAX_EVENT_ID = "SELECT coalesce(max(id), 0) FROM events"
# The auth files of a batch's accounts in one statement (auth indexes as a JSON array): a lookup
# per account was ~300 executions a batch, each turning APSW's statement-cache ring (datasource.bulk).
SELECT_ACCOUNTS = (
    "SELECT auth_index, name, label, account, provider, project_id FROM accounts "
    "WHERE instance = ? AND auth_index IN (SELECT value FROM json_each(?))"
)
INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters(received_ms, instance, origin, reason, payload) VALUES (?, ?, ?, ?, ?)"
)
SELECT_TABLE_COLUMNS = "SELECT name FROM pragma_table_info(?)"
SELECT_PRUNE_IDS = "SELECT id FROM events WHERE ts_ms < ? ORDER BY ts_ms, id LIMIT ?"
DELETE_PRIVATE = "DELETE FROM event_private WHERE event_id = ?"
DELETE_EVENT = "DELETE FROM {table} WHERE id = ?"  # the rows table: interned.rows_table()
DELETE_DEAD_LETTERS = "DELETE FROM dead_letters WHERE received_ms < ?"

# The tables insert_batch writes rows into, with the column that links a row to its event
# (`events` rows go to event_rows, labels interned: datasource/interned.py).
_TABLES = {"events": "id", "event_private": "event_id"}

# On event_rows, the filters bound to label ids (one text has one id in every column; -1 for a
# text never stored): the rows' labels are mapped back in Python (iter_export_rows), which reads
# ~2.5x the rows a second of the events view, where each of 32 labels is looked up per row.
SELECT_EXPORT = """
SELECT {columns} FROM event_rows
WHERE ts_ms >= :from_ms AND ts_ms < :to_ms
  AND (:instance IS NULL OR instance = :instance)
  AND (:provider IS NULL OR provider = :provider OR payload_provider = :provider)
  AND (:model IS NULL OR analytics_model = :model OR model = :model OR resolved_model = :model)
  AND (:account IS NULL OR account_key = :account OR account = :account OR auth_index = :account)
  AND (:api_key IS NULL OR api_key_hash = :api_key OR api_key_masked = :api_key)
ORDER BY ts_ms, id
"""
EXPORT_FILTERS = ("instance", "provider", "model", "account", "api_key")


def _now_ms() -> int:
    return int(time.time() * 1000)


def table_columns(conn: apsw.Connection, table: str) -> frozenset[str]:
    """The column names of one of the tables insert_batch writes."""
    if table not in _TABLES:
        raise ValueError(f"not a store table: {table}")
    return frozenset(row[0] for row in conn.execute(SELECT_TABLE_COLUMNS, (table,)))


# CPython's garbage collector runs a young collection every 700 net container allocations (its
# default threshold). An insert batch keeps its rows, value tuples and rollup groups (tens of
# thousands of containers) alive until it commits, so young collections traverse them again and
# again and promote them to be traversed once more: with the garbage collector off, insert_batch
# into the 10 M file ran 15,500 fewer instructions per event (3.4 %); at 50,000, 12,000 fewer.
WRITER_GC_THRESHOLD = (50_000, 20, 10)


def raise_gc_threshold() -> bool:
    """Give a process that writes batches WRITER_GC_THRESHOLD; a higher threshold, or a garbage
    collector switched off, is left as it is. Returns whether the threshold changed."""
    young = gc.get_threshold()[0]
    if young == 0 or young >= WRITER_GC_THRESHOLD[0]:
        return False
    gc.set_threshold(*WRITER_GC_THRESHOLD)
    return True


def insert_batch(
    conn: apsw.Connection,
    items: Sequence[Normalized | Rejected],
    *,
    origin: str,
    instance: str = "default",
    now_ms: int | None = None,
    rollup_rows: list[dict[str, Any]] | None = None,
) -> InsertResult:
    """Store one batch in one IMMEDIATE transaction; duplicates (by ledger hash) are skipped.

    Normalized items become events rows (enriched from `accounts`) plus an
    event_private row when they carry a private value; Rejected items become
    dead letters. Returns the counts and the new event ids in input order.

    Rollups are updated in the same transaction, unless `rollup_rows` is given: then the new
    rows are appended to it and the caller must pass them to `rollup.apply` itself (dataset
    building, which applies many batches at once; until it does, the rollups lag the events).
    """
    received_ms = _now_ms() if now_ms is None else now_ms
    result = InsertResult()
    events: list[dict[str, Any]] = []
    privates: list[dict[str, Any]] = []
    dead: list[tuple[Any, ...]] = []
    with txn.write(conn):
        next_id = conn.execute(SELECT_MAX_EVENT_ID).get + 1
        accounts = _accounts(conn, items, instance)
        # one statement for the batch's ledger keys: RETURNING gives the keys it added, so an
        # event whose key was already there (or came earlier in this batch) is a duplicate
        keys = [(item.ledger_hash, item.row["ts_ms"]) for item in items if not isinstance(item, Rejected)]
        fresh = {row[0] for row in bulk.execute(conn, INSERT_LEDGER, keys, LEDGER_RETURNING)}
        for item in items:
            if isinstance(item, Rejected):
                dead.append((received_ms, instance, origin, item.reason, item.payload))
                continue
            if item.ledger_hash not in fresh:
                result.duplicates += 1
                continue
            fresh.discard(item.ledger_hash)
            # compact form (rowpack, a copy); packing leaves alone the account columns _enrich fills
            row = rowpack.pack(item.row)
            _enrich(row, instance, accounts)
            row["id"] = next_id
            events.append(row)
            private = {k: v for k, v in item.private.items() if v is not None}
            if private:
                private["event_id"] = next_id
                privates.append(rowpack.pack_private(private))
            result.inserted_ids.append(next_id)
            next_id += 1
        _insert_rows(conn, "events", events)
        # rollups read no column packing changes (rowpack.PACKED_COLUMNS), so they take the packed rows
        if rollup_rows is None:
            rollup.apply(conn, events)  # rollups see only new rows, so dedup keeps them exact
        else:
            rollup_rows.extend(events)
        _insert_rows(conn, "event_private", privates)
        if dead:
            conn.executemany(INSERT_DEAD_LETTER, dead)
    result.inserted = len(events)
    result.dead_letters = len(dead)
    return result


def _insert_rows(conn: apsw.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """One bulk insert per distinct key set; keys that are not columns of `table` are dropped."""
    if not rows:
        return
    allowed = table_columns(conn, table)
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        keys = tuple(row)
        groups.setdefault(keys, []).append(tuple(row.values()))
    for keys, values in groups.items():
        unknown = [k for k in keys if k not in allowed]
        if unknown:
            logger.warning("dropping unknown %s columns: %s", table, ", ".join(sorted(unknown)))
            index = [i for i, k in enumerate(keys) if k in allowed]
            keys = tuple(keys[i] for i in index)
            values = [tuple(v[i] for i in index) for v in values]
        if table == interned.VIEW and interned.rows_table(conn) == interned.ROWS:  # labels as ids, no trigger per row
            keys, encoded = interned.encode_rows(conn, keys, values)
            bulk.execute(conn, f"INSERT INTO {interned.ROWS}({', '.join(keys)})", encoded)
        else:
            bulk.execute(conn, f"INSERT INTO {table}({', '.join(keys)})", values)


def _accounts(conn: apsw.Connection, items: Sequence[Normalized | Rejected],
              instance: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    """(instance, auth_index) -> the auth file's (name, label, account, provider, project_id), for
    the accounts the batch's events name that the accounts table has."""
    wanted: dict[str, set[str]] = {}
    for item in items:
        if isinstance(item, Rejected):
            continue
        key = _account_key(item.row, instance)
        if key is not None:
            wanted.setdefault(key[0], set()).add(key[1])
    found: dict[tuple[str, str], tuple[Any, ...]] = {}
    for inst, indexes in wanted.items():
        for auth_index, *fields in conn.execute(SELECT_ACCOUNTS, (inst, json.dumps(sorted(indexes)))):
            found[(inst, auth_index)] = tuple(fields)
    return found


def _account_key(row: Mapping[str, Any], instance: str) -> tuple[str, str] | None:
    """(instance, auth_index) of the account an events row names; None when it names none."""
    auth_index = row.get("auth_index")
    return (row.get("instance") or instance, str(auth_index)) if auth_index else None


def _enrich(
    out: dict[str, Any],
    instance: str,
    accounts: Mapping[tuple[str, str], tuple[Any, ...]],
) -> None:
    """Fill `out`'s account fields from CPA's auth files (the accounts table), in place.

    The auth file's account, else its label, names the account when the event has none or only
    the fallback normalize puts there (the masked `source`): reference 3.5 precedence is
    account, label, then source. An account the event brought itself (an imported export line)
    is kept; auth file, project and provider fill only empty fields.
    """
    key = _account_key(out, instance)
    found = None if key is None else accounts.get(key)
    if found is None:
        return
    name, label, account, provider, project_id = found
    current_account = out.get("account")
    if (account or label) and (not current_account or current_account == out.get("source")):
        out["account"] = account or label
    if not out.get("auth_file") and name:
        out["auth_file"] = name
    if not out.get("project_id") and project_id:
        out["project_id"] = project_id
    current = out.get("provider")
    if provider and (not current or current == "unknown" or current == out.get("payload_provider")):
        out.setdefault("payload_provider", current)
        out["provider"] = provider


def prune(conn: apsw.Connection, older_than_ms: int, *, batch: int = 5000) -> int:
    """Delete events (and their private rows) with ts_ms < older_than_ms, `batch` per transaction.

    The dedup ledger is kept, so a pruned event is never stored again; dead
    letters received before the cutoff go too. Returns the events deleted.
    """
    deleted, _ = prune_step(conn, older_than_ms, batch=batch)
    logger.info("pruned %d events older than %d", deleted, older_than_ms)
    return deleted


def prune_step(
    conn: apsw.Connection,
    older_than_ms: int,
    *,
    batch: int = 5000,
    budget_s: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[int, bool]:
    """Part of `prune`: transactions of `batch` events until none are left, `budget_s` has passed
    or `stop()` is true (checked after each transaction, so at least one runs).

    Returns (events deleted, finished); dead letters are pruned when it finishes. The collector
    prunes this way a second per supervisor tick, so a large first prune (~15,000 events/s on the
    10 M file) neither holds up its other work nor a stop.
    """
    if batch <= 0:
        raise ValueError("batch must be positive")
    deadline = None if budget_s is None else time.monotonic() + budget_s
    deleted = 0
    while True:
        with txn.write(conn):
            ids = [(row[0],) for row in conn.execute(SELECT_PRUNE_IDS, (older_than_ms, batch))]
            conn.executemany(DELETE_PRIVATE, ids)
            conn.executemany(DELETE_EVENT.format(table=interned.rows_table(conn)), ids)
        deleted += len(ids)
        if len(ids) < batch:
            break
        if (stop is not None and stop()) or (deadline is not None and time.monotonic() >= deadline):
            return deleted, False
    with txn.write(conn):
        conn.execute(DELETE_DEAD_LETTERS, (older_than_ms,))
    return deleted, True


def compact(conn: apsw.Connection) -> int:
    """VACUUM: rewrite the file without its free pages; returns the bytes of free pages it had.

    The new content goes through the WAL, which a TRUNCATE checkpoint then writes back, cutting
    the file to its new size. Needs free disk of about the compacted size twice over (SQLite's
    temporary copy and the WAL); on any error the file is as it was."""
    page = conn.pragma("page_size")
    free = conn.pragma("freelist_count") * page
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return free


def backup(conn: apsw.Connection, dest_path: str, *, busy_timeout_ms: int = 5000) -> None:
    """Copy the live database to dest_path with SQLite's online backup API."""
    if os.path.abspath(dest_path) == os.path.abspath(conn.filename):
        raise ValueError("backup destination is the database itself")
    dest = apsw.Connection(dest_path)
    deadline = time.monotonic() + max(busy_timeout_ms, 1000) / 1000
    try:
        # One step copies every page under one read snapshot of the source: in WAL mode writers
        # carry on meanwhile, and the copy is a consistent point in time. Smaller steps restart
        # from scratch whenever the collector commits in between, so under ingest they may never
        # finish. A step can still meet SQLITE_BUSY (a checkpoint resetting the WAL): retried.
        with dest.backup("main", conn, "main") as job:
            while not job.done:
                try:
                    job.step(-1)
                except (apsw.BusyError, apsw.LockedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    finally:
        dest.close()
    logger.info("backed up %s to %s", conn.filename, dest_path)


def iter_export_rows(
    conn: apsw.Connection, from_ms: int, to_ms: int, filters: Mapping[str, str | None]
) -> Iterator[dict[str, Any]]:
    """Events with from_ms <= ts_ms < to_ms matching the filters, oldest first, as full dicts (unpacked)."""
    unknown = set(filters) - set(EXPORT_FILTERS)
    if unknown:
        raise ValueError(f"unknown export filters: {', '.join(sorted(unknown))}")
    wanted = {name: filters.get(name) or None for name in EXPORT_FILTERS}
    ids = interned.lookup(conn, [v for v in wanted.values() if v is not None])
    params: dict[str, Any] = {name: None if v is None else ids.get(v, -1) for name, v in wanted.items()}
    params.update(from_ms=from_ms, to_ms=to_ms)
    columns = [r[0] for r in conn.execute(SELECT_TABLE_COLUMNS, (interned.ROWS,))]
    labels = [c for c in columns if c in interned.INTERNED]
    names = labels + [c for c in columns if c not in interned.INTERNED]  # the labels first
    width = len(labels)
    texts = interned.texts(conn)
    text = texts.__getitem__
    for row in conn.execute(SELECT_EXPORT.format(columns=", ".join(names)), params):
        try:
            shown = tuple(map(text, row[:width]))
        except KeyError:  # a label the collector added since the export started
            texts.update(interned.texts(conn))
            shown = tuple(map(text, row[:width]))
        yield rowpack.unpack(dict(zip(names, shown + row[width:])))
