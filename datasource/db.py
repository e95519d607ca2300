"""Opening SQLite the one right way, and the schema ladder.

`connect()` gives a configured APSW connection (WAL, busy timeout, foreign keys);
`migrate()` brings a database to SCHEMA_VERSION and refuses a newer one, writing nothing when it is
current; `ensure_schema()` readies a database for the read side without a write connection when it is
current; `Readers` hands each thread its own read-only connection, reopened after a fork.
Read-only connections never write: not at open, not after (tests/test_db.py holds a writer's lock
while they open and query).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote
from typing import Callable

import apsw
import apsw.bestpractice
import apsw.ext

APPLICATION_ID = 0x43504D31  # "CPM1"
logger = logging.getLogger(__name__)

_setup_lock = threading.Lock()
_setup_done = False


class SchemaError(RuntimeError):
    """The database file cannot be used by this version of CPA Monitor."""


# APSW's recommended hooks run inside every Connection() constructor. Two of them write on a
# read-write connection: `journal_mode=wal` (when not WAL yet) and `PRAGMA optimize=0x10002`, which
# runs ANALYZE on tables whose statistics are stale. Inside the constructor, with APSW's 100 ms busy
# timeout, the latter raised BusyError while the collector held the write lock, so opening could
# fail. connect() does both itself, on read-write connections only, optimize tolerating a busy or
# read-only database.
_WRITING_HOOKS = ("connection_wal", "connection_optimize")
# SQLite's own log goes to this logger (APSW's best practice sends it to the root logger), which
# keeps WARNING and up: SQLITE_SCHEMA notes ("statement aborts ... database schema has changed",
# logged at INFO) come from statements SQLite prepares again by itself after another connection
# changed the schema, e.g. the first start of a new database, and read like failures in the log.
SQLITE_LOGGER = logging.getLogger("datasource.sqlite")
SQLITE_LOGGER.setLevel(logging.WARNING)
_REPLACED_HOOKS = ("library_logging",)


def setup_sqlite() -> None:
    """Once per process: SQLite's memory statistics off, then APSW's recommended best practice
    minus the hooks that write."""
    global _setup_done
    with _setup_lock:
        if not _setup_done:
            _memory_statistics_off()
            apsw.bestpractice.apply(tuple(hook for hook in apsw.bestpractice.recommended
                                          if hook.__name__ not in _WRITING_HOOKS + _REPLACED_HOOKS))
            apsw.ext.log_sqlite(logger=SQLITE_LOGGER)
            _setup_done = True


def _memory_statistics_off() -> None:
    """SQLITE_CONFIG_MEMSTATUS off: with it on (SQLite's default) every allocation SQLite makes takes
    a process-wide mutex to keep `apsw.memory_used()` and the like, which nothing here reads; off,
    the collector's insert_batch runs 1.7 % fewer instructions (docs/performance.md). SQLite takes
    the setting only while shut down, which needs every connection closed: a process that opened
    one before its first connect() keeps the default."""
    if apsw.connections():
        return
    apsw.shutdown()
    apsw.config(apsw.SQLITE_CONFIG_MEMSTATUS, 0)
    apsw.initialize()


WRITER_CACHE_KIB = 32 * 1024
# Per reader connection, and `serve` keeps one per gunicorn thread (8): with 8 MiB each the worker
# peaked at 316 MB under back-to-back 30 d refreshes of the 10 M file, 258 MB with 4 MiB, at the
# same refresh times (both runs under the retention-prune load docs/performance.md describes;
# without it 226 MB with 4 MiB: benchmarks/bench_memory.py, bench_query).
READER_CACHE_KIB = 4 * 1024


def _on_read_only_fs_without_wal(path: str) -> bool:
    try:
        read_only = bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except OSError:
        return False
    return read_only and os.path.exists(path) and not os.path.exists(path + "-wal")


# APSW's statement cache (a ring; see datasource.bulk). A writer's insert_batch runs ~100 texts (4
# chunk sizes of ~30 statements) in ~370 executions a batch: 512, APSW's largest, keeps the ones
# every batch runs cached from one batch to the next. A reader keeps 200 (gunicorn gives each
# thread one; every statement held costs memory).
WRITER_STATEMENT_CACHE = 512
READER_STATEMENT_CACHE = 200


def connect(path: str, *, readonly: bool = False, busy_timeout_ms: int = 5000,
            optimize: bool = True) -> apsw.Connection:
    """A configured connection; a read-write one runs `PRAGMA optimize=0x10002` at open unless
    `optimize` is False (the collector's: it refreshes statistics an index at a time instead,
    `stale_statistics` / `analyze`)."""
    setup_sqlite()
    if readonly:
        flags = apsw.SQLITE_OPEN_READONLY
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    # WAL mode needs a -shm it can create; on a read-only filesystem with no -wal (the last
    # clean close checkpointed and removed it) the file alone is the whole database, so it is
    # opened as immutable: readers keep answering while the collector cannot write. Checked
    # first (SQLite logs every failed open as an error), and again on CantOpenError (a race).
    if readonly and _on_read_only_fs_without_wal(path):
        return _immutable(path, busy_timeout_ms)
    conn = apsw.Connection(path, flags=flags,
                           statementcachesize=READER_STATEMENT_CACHE if readonly else WRITER_STATEMENT_CACHE)
    conn.set_busy_timeout(busy_timeout_ms)
    try:
        conn.pragma("foreign_keys", True)
        if readonly:
            conn.pragma("schema_version")  # opens the file (and its WAL index) now
    except apsw.CantOpenError:
        if not (readonly and _on_read_only_fs_without_wal(path)):
            raise
        conn.close()
        return _immutable(path, busy_timeout_ms)
    if not readonly:
        _wal(conn, busy_timeout_ms)
        conn.pragma("synchronous", "NORMAL")
        conn.pragma("journal_size_limit", 64 * 1024 * 1024)
        if optimize and not conn.readonly("main"):  # SQLite opens a file it cannot write read-only, silently
            _optimize(conn, busy_timeout_ms)
    # Page cache: 32 MiB for the writer; READER_CACHE_KIB per reader, since gunicorn gives each of its
    # threads a read connection (8 threads x 32 MiB pushed the service past 300 MB RSS).
    conn.pragma("cache_size", -(READER_CACHE_KIB if readonly else WRITER_CACHE_KIB))
    return conn


def _wal(conn: apsw.Connection, busy_timeout_ms: int) -> None:
    """`journal_mode = wal`, retried within the busy timeout.

    On a file still in rollback mode (a brand-new database) the switch needs the exclusive lock,
    and while another connection holds the write lock SQLite answers BUSY at once rather than
    calling the busy handler (it would deadlock: this statement already holds a read lock), so
    two processes opening a new database at once could fail (seen in CI: a second connection
    opened while the service migrated the file it had just created). The statement is retried,
    its read lock released in between. A file already in WAL mode only reads the setting.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.002
    while True:
        try:
            conn.pragma("journal_mode", "wal")
            return
        except apsw.BusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _immutable(path: str, busy_timeout_ms: int) -> apsw.Connection:
    conn = apsw.Connection(f"file:{quote(os.path.abspath(path))}?immutable=1",
                           flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI, statementcachesize=READER_STATEMENT_CACHE)
    conn.set_busy_timeout(busy_timeout_ms)
    conn.pragma("foreign_keys", True)
    conn.pragma("cache_size", -READER_CACHE_KIB)
    return conn


def stale_statistics(conn: apsw.Connection) -> list[str]:
    """The indexes whose planner statistics `PRAGMA optimize=0x10002` would refresh, one by one.

    Asks optimize's debugging mode (0x01: it lists the ANALYZE statements it would run and runs
    none; instant), then splits each table into its indexes (a table without one stays whole).
    An empty table without an index is left out: ANALYZE writes no statistics row for it, so
    optimize would list it again at every check (and each refresh would make the readers reopen
    for nothing); it is listed once it holds a row.
    An ANALYZE holds the write lock until it ends: the whole of a 10 M-event file whose statistics
    were stale took 21 s at open (the collector's store waited all along); one at a time, 41
    indexes and tables in 15.0 s, the longest 2.2 s (`events_api_key_ts`).
    """
    names: list[str] = []
    for (line,) in conn.execute("PRAGMA optimize=0x10003"):
        prefix = 'ANALYZE "main"."'
        if not (line.startswith(prefix) and line.endswith('"')):
            continue
        table = line[len(prefix):-1].replace('""', '"')
        indexes = [row[1] for row in conn.execute("SELECT * FROM pragma_index_list(?)", (table,))]
        if indexes:
            names += indexes
        elif conn.execute('SELECT 1 FROM "main"."' + table.replace('"', '""') + '" LIMIT 1').fetchone():
            names.append(table)
    return names


def analyze(conn: apsw.Connection, name: str) -> None:
    """ANALYZE one index (or table) of the main schema; SQLite loads the new statistics itself."""
    conn.execute('ANALYZE "main"."' + name.replace('"', '""') + '"')


def is_immutable(conn: apsw.Connection) -> bool:
    """A connection connect() opened as immutable (read-only filesystem, no -wal)."""
    return bool(conn.open_flags & apsw.SQLITE_OPEN_URI)


def _optimize(conn: apsw.Connection, busy_timeout_ms: int) -> None:
    """PRAGMA optimize on opening a read-write connection (ANALYZE where statistics are stale,
    bounded by SQLite's analysis limit); skipped when the database is busy (after 100 ms, not the
    whole busy timeout: an open must not wait seconds for statistics), read-only or full."""
    conn.set_busy_timeout(min(100, busy_timeout_ms))
    try:
        conn.pragma("optimize", 0x10002)
    except (apsw.BusyError, apsw.ReadOnlyError, apsw.FullError, apsw.CantOpenError) as exc:
        logger.debug("PRAGMA optimize skipped: %s", exc)
    finally:
        conn.set_busy_timeout(busy_timeout_ms)


# --- schema -----------------------------------------------------------------
# Each entry upgrades from version N-1 to N. Never edit a released step; add one.

_V1 = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    event_hash TEXT NOT NULL,
    instance TEXT NOT NULL DEFAULT 'default',
    ts_ms INTEGER NOT NULL,
    ts TEXT NOT NULL,
    request_id TEXT,
    provider TEXT NOT NULL DEFAULT 'unknown',
    payload_provider TEXT,
    request_type TEXT,
    endpoint TEXT,
    method TEXT,
    path TEXT,
    auth_type TEXT,
    auth_index TEXT,
    account_key TEXT NOT NULL DEFAULT '-',
    account TEXT,
    auth_file TEXT,
    project_id TEXT,
    source TEXT,
    source_hash TEXT,
    api_key_hash TEXT,
    api_key_masked TEXT,
    user_agent TEXT,
    model TEXT NOT NULL DEFAULT '-',
    resolved_model TEXT,
    analytics_model TEXT NOT NULL DEFAULT '-',
    billing_model TEXT NOT NULL DEFAULT '-',
    reasoning_effort TEXT,
    service_tier TEXT,
    request_service_tier TEXT,
    response_service_tier TEXT,
    cache_input_mode TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
    norm_input_tokens INTEGER NOT NULL DEFAULT 0,
    norm_uncached_tokens INTEGER NOT NULL DEFAULT 0,
    norm_cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    compat_cached_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cache_state TEXT NOT NULL DEFAULT 'miss',
    latency_ms INTEGER,
    ttft_ms INTEGER,
    streaming INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,
    status_class TEXT NOT NULL DEFAULT 'success',
    failure_type TEXT NOT NULL DEFAULT 'none',
    fail_summary TEXT,
    quota_plan TEXT,
    quota_used_pct REAL,
    quota_recover_at_ms INTEGER,
    quota_window TEXT,
    error_kind TEXT,
    error_code TEXT,
    trace_id TEXT,
    retry_after_s INTEGER,
    response_meta TEXT,
    action TEXT,
    action_reason TEXT,
    action_detail TEXT,
    est_cost_usd REAL NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE INDEX events_ts ON events(ts_ms);
CREATE INDEX events_account_ts ON events(account_key, ts_ms);
CREATE INDEX events_api_key_ts ON events(api_key_hash, ts_ms);
CREATE INDEX events_model_ts ON events(analytics_model, ts_ms);
CREATE INDEX events_request_id ON events(request_id) WHERE request_id IS NOT NULL;
CREATE INDEX events_trace_id ON events(trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX events_failed_ts ON events(ts_ms) WHERE failed = 1;

-- Never read by any query, API or export: raw failure bodies and client addresses.
CREATE TABLE event_private (
    event_id INTEGER PRIMARY KEY REFERENCES events(id) ON DELETE CASCADE,
    fail_body TEXT,
    client_ip TEXT,
    x_forwarded_for TEXT,
    raw_json TEXT
);

-- Dedup ledger: outlives the event row, so a pruned event is never stored again.
CREATE TABLE event_ledger (
    hash BLOB PRIMARY KEY,
    ts_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    instance TEXT NOT NULL DEFAULT 'default',
    origin TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB
);
CREATE INDEX dead_letters_received ON dead_letters(received_ms);

CREATE TABLE credential_errors (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    instance TEXT NOT NULL DEFAULT 'default',
    provider TEXT,
    model TEXT,
    auth_id TEXT,
    auth_index TEXT,
    account_key TEXT NOT NULL DEFAULT '-',
    status_code INTEGER,
    code TEXT,
    retryable INTEGER,
    quota_exceeded INTEGER,
    next_retry_after_ms INTEGER,
    summary TEXT,
    created_ms INTEGER NOT NULL
);
CREATE INDEX credential_errors_ts ON credential_errors(ts_ms);
CREATE TABLE credential_error_private (
    error_id INTEGER PRIMARY KEY REFERENCES credential_errors(id) ON DELETE CASCADE,
    body TEXT
);

CREATE TABLE accounts (
    instance TEXT NOT NULL,
    auth_index TEXT NOT NULL,
    name TEXT,
    label TEXT,
    account TEXT,
    provider TEXT,
    project_id TEXT,
    status TEXT,
    status_message TEXT,
    disabled INTEGER NOT NULL DEFAULT 0,
    unavailable INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (instance, auth_index)
);
CREATE TABLE account_status_changes (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    instance TEXT NOT NULL,
    auth_index TEXT NOT NULL,
    label TEXT,
    old_status TEXT,
    new_status TEXT
);

CREATE TABLE collector_status (
    instance TEXT PRIMARY KEY,
    url TEXT,
    mode TEXT,
    transport TEXT,
    state TEXT NOT NULL DEFAULT 'stopped',
    holder TEXT,
    last_consumed_ms INTEGER,
    last_inserted_ms INTEGER,
    inserted INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    dead_letters INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_stage TEXT,
    last_error_ms INTEGER,
    usage_publishing INTEGER,
    queue_retention_s INTEGER,
    warnings TEXT,
    started_ms INTEGER,
    updated_ms INTEGER
);
CREATE TABLE collector_episodes (
    id INTEGER PRIMARY KEY,
    instance TEXT NOT NULL,
    kind TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER,
    detail TEXT
);
CREATE INDEX collector_episodes_start ON collector_episodes(start_ms);

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""

# Step 2: rollups, maintained by datasource/rollup.py (tests/test_rollup.py checks these tables
# match rollup.SPECS). Measures are written in full by every upsert, hence no defaults.
_V2 = """
CREATE TABLE rollup_traffic_hour (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, provider TEXT NOT NULL, analytics_model TEXT NOT NULL,
    request_type TEXT NOT NULL, status_class TEXT NOT NULL, status_code INTEGER NOT NULL,
    failed INTEGER NOT NULL, failure_type TEXT NOT NULL, cache_state TEXT NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, provider, analytics_model, request_type, status_class, status_code, failed, failure_type, cache_state)
) WITHOUT ROWID;
CREATE TABLE rollup_traffic_day (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, provider TEXT NOT NULL, analytics_model TEXT NOT NULL,
    request_type TEXT NOT NULL, status_class TEXT NOT NULL, status_code INTEGER NOT NULL,
    failed INTEGER NOT NULL, failure_type TEXT NOT NULL, cache_state TEXT NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, provider, analytics_model, request_type, status_class, status_code, failed, failure_type, cache_state)
) WITHOUT ROWID;
CREATE TABLE rollup_account_hour (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL,
    analytics_model TEXT NOT NULL, provider TEXT NOT NULL, status_class TEXT NOT NULL, failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, account_key, analytics_model, provider, status_class, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_account_day (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL,
    analytics_model TEXT NOT NULL, provider TEXT NOT NULL, status_class TEXT NOT NULL, failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, account_key, analytics_model, provider, status_class, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_api_key_day (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, api_key_hash TEXT NOT NULL, account_key TEXT NOT NULL,
    analytics_model TEXT NOT NULL, failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, api_key_hash, account_key, analytics_model, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_latency_hour (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, provider TEXT NOT NULL, analytics_model TEXT NOT NULL,
    failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, provider, analytics_model, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_latency_day (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, provider TEXT NOT NULL, analytics_model TEXT NOT NULL,
    failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, provider, analytics_model, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_account_latency_day (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL, provider TEXT NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, account_key, provider)
) WITHOUT ROWID;
"""

# Step 3: the alias catalog of the rollup keys, maintained with the rollups (rollup.apply_aliases):
# every distinct (key, alias...) tuple of the events ever stored, so that a filter on a key that
# matches several event columns (model: analytics, requested or resolved model) can be resolved
# to rollup key values exactly, or be known not to be (datasource/query_plan.py). Backfilled
# from the events present at migration; like the rollups it outlives raw retention.
_V3 = """
CREATE TABLE rollup_aliases (
    dim TEXT NOT NULL, key TEXT NOT NULL, alias1 TEXT NOT NULL, alias2 TEXT NOT NULL,
    PRIMARY KEY (dim, key, alias1, alias2)
) WITHOUT ROWID;
INSERT OR IGNORE INTO rollup_aliases
    SELECT DISTINCT 'provider', provider, coalesce(payload_provider, ''), '' FROM events;
INSERT OR IGNORE INTO rollup_aliases
    SELECT DISTINCT 'model', analytics_model, coalesce(model, ''), coalesce(resolved_model, '') FROM events;
INSERT OR IGNORE INTO rollup_aliases
    SELECT DISTINCT 'account', account_key, coalesce(account, ''), coalesce(auth_index, '') FROM events;
INSERT OR IGNORE INTO rollup_aliases
    SELECT DISTINCT 'api_key', coalesce(api_key_hash, ''), coalesce(api_key_masked, ''), '' FROM events;
"""



def _v4(conn: apsw.Connection) -> None:
    """Step 4: compact events rows (datasource/rowpack.py) and compressed private raw JSON.

    Adds `ts_sub_ns` and rewrites the rows already stored into the packed form, in the
    migration's transaction; new rows are packed by store.insert_batch.
    """
    from datasource import rowpack

    conn.create_scalar_function("cpm_ts_sub", rowpack.migrate_ts_sub, 2, deterministic=True)
    conn.create_scalar_function("cpm_endpoint_part", rowpack.migrate_endpoint_part, 2, deterministic=True)
    conn.create_scalar_function("cpm_compress", rowpack.migrate_compress, 1, deterministic=True)
    conn.execute(_V4)


_V4 = """
ALTER TABLE events ADD COLUMN ts_sub_ns INTEGER;
UPDATE events SET
    event_hash = CASE WHEN typeof(event_hash) = 'text' AND length(event_hash) = 64
                       AND event_hash NOT GLOB '*[^0-9a-f]*' THEN unhex(event_hash) ELSE event_hash END,
    source_hash = CASE WHEN typeof(source_hash) = 'text' AND length(source_hash) = 64
                       AND source_hash NOT GLOB '*[^0-9a-f]*' THEN unhex(source_hash) ELSE source_hash END,
    ts_sub_ns = cpm_ts_sub(ts, ts_ms),
    ts = CASE WHEN cpm_ts_sub(ts, ts_ms) IS NULL THEN ts ELSE '' END,
    billing_model = CASE WHEN billing_model <> ''
                          AND billing_model = coalesce(nullif(resolved_model, ''), analytics_model)
                         THEN '' ELSE billing_model END,
    method = CASE WHEN method = cpm_endpoint_part(endpoint, 1) THEN '' ELSE method END,
    path = CASE WHEN path = cpm_endpoint_part(endpoint, 2) THEN '' ELSE path END,
    cache_input_mode = CASE cache_input_mode WHEN 'included_in_input' THEN 'i'
                            WHEN 'separate_from_input' THEN 's' ELSE cache_input_mode END;
UPDATE event_private SET raw_json = cpm_compress(raw_json) WHERE typeof(raw_json) = 'text';
"""

# Step 5: the Account Overview's quota column reads each account's newest event carrying quota
# headers; without this index an account that never carries them (most non-Codex providers)
# is scanned in full over the window. Only quota-carrying rows are indexed.
_V5 = """
CREATE INDEX events_quota_account_ts ON events(account_key, ts_ms)
    WHERE quota_plan IS NOT NULL OR quota_used_pct IS NOT NULL OR quota_recover_at_ms IS NOT NULL;
"""

def _v6(conn: apsw.Connection) -> None:
    """Step 6: 5-minute traffic and latency rollups, a latency family keyed by instance and
    status only, hourly account latency and hourly account x model latency (datasource/rollup.py,
    docs/performance.md). Backfilled from the events present (pruned days stay empty)."""
    from datasource import rollup

    conn.execute(_V6)
    rollup.backfill(conn, rollup.STEP6_TABLES)


_V6 = """
CREATE TABLE rollup_traffic_5m (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, provider TEXT NOT NULL, analytics_model TEXT NOT NULL,
    request_type TEXT NOT NULL, status_class TEXT NOT NULL, status_code INTEGER NOT NULL, failed INTEGER NOT
    NULL, failure_type TEXT NOT NULL, cache_state TEXT NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT
    NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT
    NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, provider, analytics_model, request_type, status_class, status_code,
    failed, failure_type, cache_state)
) WITHOUT ROWID;
CREATE TABLE rollup_latency_5m (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, provider TEXT NOT NULL, analytics_model TEXT NOT NULL,
    failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT
    NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT
    NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, provider, analytics_model, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_latency_total_5m (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT
    NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT
    NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_latency_total_hour (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT
    NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT
    NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_latency_total_day (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT
    NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT
    NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, failed)
) WITHOUT ROWID;
CREATE TABLE rollup_account_latency_hour (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL, provider TEXT NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT
    NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT
    NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, account_key, provider)
) WITHOUT ROWID;
CREATE TABLE rollup_account_model_latency_hour (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL, analytics_model TEXT NOT
    NULL, provider TEXT NOT NULL, failed INTEGER NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT
    NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT
    NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER, latency_sketch BLOB,
    ttft_sketch BLOB,
    PRIMARY KEY (bucket_ms, instance, account_key, analytics_model, provider, failed)
) WITHOUT ROWID;
"""


def _v7(conn: apsw.Connection) -> None:
    """Step 7: accounts by failure type, hourly and daily (Account Overview's top failure type
    without reading a window's failed events). Backfilled from the events present."""
    from datasource import rollup

    conn.execute(_V7)
    rollup.backfill(conn, rollup.STEP7_TABLES)


_V7 = """
CREATE TABLE rollup_account_failure_hour (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL, provider TEXT NOT NULL,
    failed INTEGER NOT NULL, failure_type TEXT NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, account_key, provider, failed, failure_type)
) WITHOUT ROWID;
CREATE TABLE rollup_account_failure_day (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL, provider TEXT NOT NULL,
    failed INTEGER NOT NULL, failure_type TEXT NOT NULL,
    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
    PRIMARY KEY (bucket_ms, instance, account_key, provider, failed, failure_type)
) WITHOUT ROWID;
"""

def _v8(conn: apsw.Connection) -> None:
    """Step 8: API keys by instance and key, 5-minute / hourly / daily, with the distinct models
    and accounts seen as merged sets (API Key Summary, docs/performance.md). Backfilled from the
    events present."""
    from datasource import rollup

    conn.execute(_V8)
    rollup.backfill(conn, rollup.STEP8_TABLES)


# The three step-8 tables differ only in name (and grain, which is in the rows, not the DDL).
# The measure columns every rollup table has (rollup.MEASURES and the first/last times), as the
# DDL of steps 8 and on spells them (earlier steps wrote them out; released steps stay as they are).
_MEASURES_DDL = """    requests INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL, unusual INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL,
    norm_input_tokens INTEGER NOT NULL, norm_uncached_tokens INTEGER NOT NULL,
    norm_cache_read_tokens INTEGER NOT NULL, compat_cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, latency_sum_ms INTEGER NOT NULL,
    latency_samples INTEGER NOT NULL, ttft_sum_ms INTEGER NOT NULL, ttft_samples INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_failure_ms INTEGER,
"""
_V8_TABLE = """CREATE TABLE {table} (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, api_key_hash TEXT NOT NULL,
{measures}    models TEXT NOT NULL, accounts TEXT NOT NULL,
    PRIMARY KEY (bucket_ms, instance, api_key_hash)
) WITHOUT ROWID;
"""
_V8 = "\n" + "".join(_V8_TABLE.format(table=t, measures=_MEASURES_DDL) for t in (
    "rollup_api_key_sets_5m", "rollup_api_key_sets_hour", "rollup_api_key_sets_day"))


def _v9(conn: apsw.Connection) -> None:
    """Step 9: accounts x models by status code and failure type, hourly and daily (failure
    breakdowns filtered by account and model, docs/performance.md), backfilled from the events
    present; an account index on the hourly account tables and rollup_api_key_day; and a partial
    covering index of the events with an action (Account Action Queue)."""
    from datasource import rollup

    conn.execute(_V9)
    rollup.backfill(conn, rollup.STEP9_TABLES)
    for table in ACCOUNT_INDEXED:  # statistics for the new indexes, so the planner weighs them now
        conn.execute(f"ANALYZE {table}")
    conn.execute("ANALYZE events_action_ts")


_V9_TABLE = """CREATE TABLE {table} (
    bucket_ms INTEGER NOT NULL, instance TEXT NOT NULL, account_key TEXT NOT NULL, analytics_model TEXT NOT NULL,
    provider TEXT NOT NULL, status_class TEXT NOT NULL, status_code INTEGER NOT NULL, failed INTEGER NOT NULL,
    failure_type TEXT NOT NULL,
{measures}    PRIMARY KEY (bucket_ms, instance, account_key, analytics_model, provider, status_class, status_code, failed,
                 failure_type)
) WITHOUT ROWID;
"""
# Rollup keys start with bucket_ms, so a read filtered by account walks every row of every
# bucket in the window (the hourly account tables hold ~500 rows an hour at 10 M / 30 days);
# these tables get an (account_key, bucket_ms) index so that it seeks the account's rows instead.
ACCOUNT_INDEXED = ("rollup_account_hour", "rollup_account_latency_hour", "rollup_account_model_latency_hour",
                   "rollup_account_failure_hour", "rollup_account_model_failure_hour", "rollup_api_key_day")
_V9 = "\n" + "".join(_V9_TABLE.format(table=t, measures=_MEASURES_DDL) for t in (
    "rollup_account_model_failure_hour", "rollup_account_model_failure_day")) + "".join(
    f"CREATE INDEX {t}_account ON {t}(account_key, bucket_ms);\n" for t in ACCOUNT_INDEXED) + """
-- Account Action Queue: the grouping columns of the events with an action and the model and
-- provider keys of the common filters, covering (query_actions.EVENT_ACTIONS_SQL counts per
-- account, action and reason from it alone).
CREATE INDEX events_action_ts ON events(ts_ms, instance, account_key, action, action_reason, quota_recover_at_ms,
                                        analytics_model, provider)
    WHERE failed = 1 AND action IS NOT NULL;
"""

# Step 10: the dedup ledger keyed by (ts_ms, hash) instead of hash alone. A new key then lands at
# the end of the tree (live traffic is in time order) instead of on a random page of a tree that
# outgrows the page cache (310 MB at 10 M events). The same event still meets its key: the key
# hashes the event's timestamp text (normalize) or comes with the stored ts_ms (export lines).
_V10 = """
CREATE TABLE event_ledger_by_time (
    ts_ms INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (ts_ms, hash)
) WITHOUT ROWID;
INSERT INTO event_ledger_by_time(ts_ms, hash) SELECT ts_ms, hash FROM event_ledger ORDER BY ts_ms, hash;
DROP TABLE event_ledger;
ALTER TABLE event_ledger_by_time RENAME TO event_ledger;
"""


def _v11(conn: apsw.Connection) -> None:
    """Step 11: the request id and trace id indexes keyed by (hour, id) instead of the id alone.

    The old indexes were never read: the trace filter compares `coalesce(id, '')`, so a lookup
    scanned its whole window (22.7 s at 30 days of the 10 M dataset). And each new event put
    its two random ids on random pages of two trees far larger than the page cache: a 4,000-event
    commit wrote ~15,000 pages to the WAL, half of them for these two indexes. Keyed by hour
    first, the ids of live traffic land in the last hour's few pages, and filters.py seeks each
    hour of the window (10 ms at 30 days). The bucket expression is filters.TRACE_BUCKET_SQL.
    """
    conn.execute(_V11)
    conn.execute("ANALYZE events_request_hour")  # statistics, so the planner weighs them now
    conn.execute("ANALYZE events_trace_hour")


_V11 = """
DROP INDEX IF EXISTS events_request_id;
DROP INDEX IF EXISTS events_trace_id;
CREATE INDEX events_request_hour ON events(ts_ms / 3600000, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX events_trace_hour ON events(ts_ms / 3600000, trace_id) WHERE trace_id IS NOT NULL;
"""

def _v12(conn: apsw.Connection) -> None:
    """Step 12: low-cardinality text columns of events stored once (datasource/interned.py).

    The rows move to `event_rows`, whose label columns hold ids into `event_strings`; `events`
    becomes a view with the same columns and values, so readers are unchanged. One pass over the
    stored rows in the migration's transaction; the indexes keep their names and, where the
    database had statistics, are analysed again (their samples hold ids now).
    """
    from datasource import interned

    interned.convert(conn)


MIGRATIONS: list[str | Callable[[apsw.Connection], None]] = [
    _V1, _V2, _V3, _v4, _V5, _v6, _v7, _v8, _v9, _V10, _v11, _v12]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_state(conn: apsw.Connection) -> tuple[int, int]:
    """(user_version, application_id), read only; SchemaError for a newer or foreign database."""
    current = conn.pragma("user_version")
    if current > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {current} is newer than this CPA Monitor "
            f"understands ({SCHEMA_VERSION}); upgrade cpa-monitor or use another database"
        )
    app_id = conn.pragma("application_id")
    if app_id not in (0, APPLICATION_ID):
        raise SchemaError(f"not a CPA Monitor database (application_id {app_id:#x})")
    return current, app_id


def migrate(conn: apsw.Connection) -> int:
    """Upgrade to SCHEMA_VERSION in one transaction; return the version reached.

    A database already at SCHEMA_VERSION is only read (no lock taken, nothing written), so a
    start-up on a read-only or full disk, or while the collector holds the write lock, does not
    fail here. Otherwise the steps run under BEGIN IMMEDIATE, re-checked inside it (another
    process may have migrated meanwhile).
    """
    if schema_state(conn) == (SCHEMA_VERSION, APPLICATION_ID):
        return SCHEMA_VERSION
    conn.execute("BEGIN IMMEDIATE")
    try:
        current, app_id = schema_state(conn)
        for step in range(current, SCHEMA_VERSION):
            migration = MIGRATIONS[step]
            if callable(migration):  # a step that needs Python (rewriting stored rows)
                migration(conn)
            else:
                conn.execute(migration)
        if current != SCHEMA_VERSION:
            conn.pragma("user_version", SCHEMA_VERSION)
        if app_id != APPLICATION_ID:
            conn.pragma("application_id", APPLICATION_ID)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def open_database(path: str, *, busy_timeout_ms: int = 5000, optimize: bool = True) -> apsw.Connection:
    """A read-write connection to a migrated database (created on first use).

    SQLite opens a file it cannot write read-only without saying so; that is refused here
    (ReadOnlyError), since every caller of this function writes. `optimize`: as connect().
    """
    conn = connect(path, busy_timeout_ms=busy_timeout_ms, optimize=optimize)
    try:
        if conn.readonly("main"):
            raise apsw.ReadOnlyError(f"{path} can only be opened read-only (file or filesystem not writable)")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def ensure_schema(path: str, *, busy_timeout_ms: int = 5000) -> int:
    """Ready `path` for the read side and return its schema version.

    An existing database at SCHEMA_VERSION is checked through a read-only connection: nothing is
    written, so the datasource starts on a read-only file or filesystem, on a full disk, and
    while the collector holds the write lock. A missing or older database is created or
    migrated through a read-write connection (which those conditions refuse).
    """
    if os.path.exists(path):
        conn = connect(path, readonly=True, busy_timeout_ms=busy_timeout_ms)
        try:
            state = schema_state(conn)
        finally:
            conn.close()
        if state == (SCHEMA_VERSION, APPLICATION_ID):
            return SCHEMA_VERSION
    open_database(path, busy_timeout_ms=busy_timeout_ms).close()
    return SCHEMA_VERSION


# How often a reader checks whether the planner statistics changed (see Readers), and where the
# collector notes that it refreshed them.
STATISTICS_RECHECK_S = 5.0
STATISTICS_KEY = "statistics_ms"


class Readers:
    """One read-only connection per thread, reopened when the process has forked, when it was
    opened immutable on a read-only filesystem that has become writable (SQLite takes no locks on
    an immutable file: once the collector writes again, it must not be read that way), and when
    the planner statistics changed (`statistics_mark`, checked at most every STATISTICS_RECHECK_S):
    an open connection keeps planning with the statistics it loaded at open, whatever another
    connection ANALYZEs (tested), and the collector refreshes them after the service has started
    (collector._statistics)."""

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()

    def get(self) -> apsw.Connection:
        local = self._local
        conn = getattr(local, "conn", None)
        if getattr(local, "pid", None) != os.getpid():
            conn = None  # the parent's: never used (nor closed) in a forked child
        elif conn is not None and is_immutable(conn):
            if not _on_read_only_fs_without_wal(self.path):
                conn.close()
                conn = None
        elif conn is not None and time.monotonic() >= local.recheck:
            local.recheck = time.monotonic() + STATISTICS_RECHECK_S
            if statistics_mark(conn) != local.mark:
                conn.close()
                conn = None
        if conn is None:
            conn = connect(self.path, readonly=True, busy_timeout_ms=self.busy_timeout_ms)
            local.conn, local.pid = conn, os.getpid()
            local.mark = statistics_mark(conn)
            local.recheck = time.monotonic() + STATISTICS_RECHECK_S
        return conn


def statistics_mark(conn: apsw.Connection) -> tuple[int, str | None]:
    """What tells a reader the planner statistics changed since it opened: the schema version and
    the time the collector last refreshed them (meta `statistics_ms`). An ANALYZE changes the schema
    version only when it creates sqlite_stat1, so the collector writes the time as well."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (STATISTICS_KEY,)).fetchone()
    return conn.pragma("schema_version"), row[0] if row else None


def mark_statistics(conn: apsw.Connection, now_ms: int) -> None:
    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                 (STATISTICS_KEY, str(now_ms)))
