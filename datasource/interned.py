"""Interned text of events (schema step 12): each label stored once, rows hold its id.

Most text columns of an event are labels drawn from a few hundred values: the account, its
masked source and auth index, the model names, the endpoint, the user agent, the caller key's
hash. Stored in every row they were ~60 % of the row's bytes (552 -> 227 at 10 M events) and
most of its key indexes. Since step 12
the rows live in `event_rows`, where those columns hold an id into `event_strings`, and
`events` is a view that gives every column back as before (same names, same order, same
values). Readers therefore keep reading `events`; the write path (`store.insert_batch`) writes
`event_rows` directly, resolving a batch's labels with one lookup; other writers may insert into
`events`, whose INSTEAD OF trigger interns and applies the old column defaults.

What the view costs: a label read through it is a primary-key lookup in `event_strings` (a few
hundred rows, always in cache). A predicate on a label's text cannot use an index of
`event_rows`, so queries that seek by account, model or key, or that need a partial index whose
condition names a label (`action IS NOT NULL`), compare the view's `lid_<column>` ids instead,
bound as values (`lookup`: SQLite's planner weighs a bound value, not a subquery). And a
statement on the view is prepared again whenever its time bounds change (STAT4 reads them), at
~35 us for the view's 99 columns: a loop of small seeks reads `event_rows` itself.

`event_strings` only grows: an id, once committed, always names the same text, and a label no
row uses any more is kept (pruning events leaves their labels; there are few).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Callable, Iterable, Sequence

import apsw

ROWS = "event_rows"
STRINGS = "event_strings"
VIEW = "events"

# The interned columns: low-cardinality labels. Left as text: the per-event ids and hashes
# (event_hash, request_id, trace_id), the failure texts (fail_summary, response_meta,
# action_detail), and the columns rowpack stores as '' when derivable (ts, method, path,
# billing_model) or as a one-letter code (cache_input_mode): an id would cost more there.
COLUMNS: tuple[str, ...] = (
    "instance", "provider", "payload_provider", "request_type", "endpoint", "auth_type", "auth_index",
    "account_key", "account", "auth_file", "project_id", "source", "source_hash", "api_key_hash",
    "api_key_masked", "user_agent", "model", "resolved_model", "analytics_model", "reasoning_effort",
    "service_tier", "request_service_tier", "response_service_tier", "cache_state", "status_class",
    "failure_type", "quota_plan", "quota_window", "error_kind", "error_code", "action", "action_reason",
)
INTERNED = frozenset(COLUMNS)
# The text defaults the events table declared for interned NOT NULL columns (schema step 1).
DEFAULTS: dict[str, str] = {
    "instance": "default", "provider": "unknown", "account_key": "-", "model": "-",
    "analytics_model": "-", "cache_state": "miss", "status_class": "success", "failure_type": "none",
}

# The view's id columns: `lid_account_key` is event_rows.account_key, the id. A filter written
# on it (`lid_account_key = (SELECT id FROM event_strings WHERE v = ?)`) can use the account
# index, which `account_key = ?` (a lookup per row) cannot. rowpack.unpack drops them.
ID_PREFIX = "lid_"
ID_COLUMNS = tuple(ID_PREFIX + name for name in COLUMNS)

STRINGS_SQL = f"CREATE TABLE {STRINGS} (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)"
_LOOKUP_CHUNK = 500  # values per SELECT ... IN (?, ...)


def text_of(label_id: str) -> str:
    """The text of a label id given as an SQL expression (a column holding an id)."""
    return f"(SELECT v FROM {STRINGS} WHERE id = {label_id})"


def label_text_sql(column: str, alias: str = "r") -> str:
    """The text of an interned column of `alias` (an event_rows row), as the view gives it."""
    return text_of(f"{alias}.{column}")


def label_id_sql(param: str = "?") -> str:
    """The id of a label given as a parameter: compare an event_rows column with it."""
    return f"(SELECT id FROM {STRINGS} WHERE v = {param})"


def labels_id_sql(param: str = "?") -> str:
    """The ids of the labels in a JSON array parameter: `column IN <this>` on event_rows."""
    return f"(SELECT id FROM {STRINGS} WHERE v IN (SELECT value FROM json_each({param})))"


# --- DDL ---------------------------------------------------------------------------------------


def table_sql(columns: Sequence[tuple[str, str, int, str | None, int]]) -> str:
    """event_rows' CREATE TABLE from the events table's `PRAGMA table_info` rows:
    interned columns become INTEGER ids (NOT NULL kept, the text default dropped)."""
    parts = []
    for name, type_, notnull, default, pk in columns:
        if pk:
            parts.append(f"{name} INTEGER PRIMARY KEY")
        elif name in INTERNED:
            parts.append(f"{name} INTEGER" + (" NOT NULL" if notnull else ""))
        else:
            parts.append(f"{name} {type_}" + (" NOT NULL" if notnull else "")
                         + (f" DEFAULT {default}" if default is not None else ""))
    return f"CREATE TABLE {ROWS} (\n    " + ",\n    ".join(parts) + "\n)"


def view_sql(names: Sequence[str]) -> str:
    """The `events` view: every column of event_rows, interned ones as their text, then each
    interned column's id as `lid_<column>` (for index seeks and partial-index conditions)."""
    items = [f"{label_text_sql(n)} AS {n}" if n in INTERNED else f"r.{n} AS {n}" for n in names]
    items += [f"r.{n} AS {ID_PREFIX}{n}" for n in names if n in INTERNED]
    return f"CREATE VIEW {VIEW} AS SELECT\n    " + ",\n    ".join(items) + f"\nFROM {ROWS} r"


def _new_value(name: str, default: str | None) -> str:
    if name in DEFAULTS:
        return f"coalesce(NEW.{name}, {_sql_text(DEFAULTS[name])})"
    if default is not None:
        return f"coalesce(NEW.{name}, {default})"
    return f"NEW.{name}"


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def triggers_sql(columns: Sequence[tuple[str, str, int, str | None, int]]) -> list[str]:
    """INSTEAD OF INSERT and DELETE on the view: an insert interns its labels and applies the
    old defaults (a view has none of its own); a delete removes the row from event_rows."""
    names = [c[0] for c in columns]
    defaults = {c[0]: c[3] for c in columns}
    labels = [n for n in names if n in INTERNED]
    new_labels = ", ".join(f"({_new_value(n, None)})" for n in labels)
    values = []
    for name in names:
        value = _new_value(name, defaults[name])
        values.append(f"(SELECT id FROM {STRINGS} WHERE v = {value})" if name in INTERNED else value)
    insert = (
        f"CREATE TRIGGER {VIEW}_insert INSTEAD OF INSERT ON {VIEW} BEGIN\n"
        f"    INSERT OR IGNORE INTO {STRINGS}(v) SELECT column1 FROM (VALUES {new_labels}) "
        "WHERE column1 IS NOT NULL;\n"
        f"    INSERT INTO {ROWS}({', '.join(names)}) VALUES ({', '.join(values)});\n"
        "END")
    delete = (f"CREATE TRIGGER {VIEW}_delete INSTEAD OF DELETE ON {VIEW} BEGIN\n"
              f"    DELETE FROM {ROWS} WHERE id = OLD.id;\nEND")
    return [insert, delete]


# --- the write path ----------------------------------------------------------------------------


def _label(value: Any) -> Any:
    """A value as the TEXT column it replaces would have held it (numbers become their text)."""
    if value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def lookup(conn: apsw.Connection, labels: Iterable[Any]) -> dict[Any, int]:
    """label -> id for the labels given that are stored (a label never stored has no id, and no
    row holds it). Readers bind the ids themselves rather than a subquery for them: SQLite's
    planner weighs a bound value against the index statistics (STAT4), a subquery it cannot."""
    wanted = list({label for label in labels if label is not None})
    ids: dict[Any, int] = {}
    for start in range(0, len(wanted), _LOOKUP_CHUNK):
        chunk = wanted[start:start + _LOOKUP_CHUNK]
        sql = f"SELECT v, id FROM {STRINGS} WHERE v IN ({', '.join('?' * len(chunk))})"
        ids.update(conn.execute(sql, chunk))
    return ids


def texts(conn: apsw.Connection) -> dict[Any, Any]:
    """id -> text of every label, and None -> None: what a reader of `event_rows` maps its
    label columns with (C-level `map` over the dict's `__getitem__`)."""
    out: dict[Any, Any] = dict(conn.execute(f"SELECT id, v FROM {STRINGS}"))
    out[None] = None
    return out


def resolve(conn: apsw.Connection, labels: Iterable[Any]) -> dict[Any, int]:
    """label -> id for every label given, adding the new ones to event_strings.

    Call inside the write transaction that stores the rows using the ids: an id added by a
    transaction that rolls back goes with it, and nothing here outlives the call."""
    wanted = {label for label in labels if label is not None}
    ids = lookup(conn, wanted)
    # new labels in a fixed order (text, then BLOBs, each sorted): the same batches give the same ids
    for label in sorted((x for x in wanted if x not in ids), key=lambda x: (isinstance(x, bytes), x)):
        ids[label] = conn.execute(f"INSERT INTO {STRINGS}(v) VALUES (?) RETURNING id", (label,)).get
    return ids


def rows_table(conn: apsw.Connection) -> str:
    """The table that holds the events rows: event_rows since schema step 12, else the events
    table itself (a database at an earlier step, as tests build one step by step)."""
    found = conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (ROWS,)).fetchone()
    return ROWS if found else VIEW


def encode_rows(conn: apsw.Connection, keys: Sequence[str],
                rows: Sequence[Sequence[Any]]) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """(keys, value tuples) for event_rows from rows as the events view takes them: the interned
    columns first, each value replaced by its label's id, then the other columns as they are. An
    interned column the rows leave out gets the text default the events table declared (DEFAULTS;
    event_rows cannot declare it: it holds ids). C-level gathers (itemgetter, map over the batch's
    small label dict): 4.8 -> 2.4-2.7 us a row for a 4,000-event batch."""
    missing = tuple(name for name in DEFAULTS if name not in keys)
    if missing:
        keys = (*keys, *missing)
        rows = [(*row, *(DEFAULTS[name] for name in missing)) for row in rows]
    positions = [i for i, key in enumerate(keys) if key in INTERNED]
    if not positions:
        return tuple(keys), [tuple(row) for row in rows]
    rest = [i for i, key in enumerate(keys) if key not in INTERNED]
    pick = _getter(positions)
    keep = _getter(rest)
    picked = list(map(pick, rows))
    labels: set[Any] = set().union(*picked)
    labels.discard(None)
    ids = resolve(conn, {_label(value) for value in labels})
    to_id: dict[Any, Any] = {value: ids[_label(value)] for value in labels}
    to_id[None] = None
    lookup = to_id.__getitem__
    out = [tuple(map(lookup, p)) + keep(row) for p, row in zip(picked, rows)]
    return tuple(keys[i] for i in positions + rest), out


def _getter(indexes: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """A tuple of the values at `indexes` (itemgetter returns a bare value for one index)."""
    if len(indexes) == 1:
        only = indexes[0]
        return lambda row: (row[only],)
    if not indexes:
        return lambda row: ()
    return itemgetter(*indexes)


# --- schema step 12 ----------------------------------------------------------------------------


def convert(conn: apsw.Connection) -> None:
    """Schema step 12, inside the migration's transaction: events (a table) -> event_rows + the
    events view, event_private re-pointed at event_rows, the indexes and their statistics kept."""
    columns = [(r[1], r[2], r[3], r[4], r[5]) for r in conn.execute("PRAGMA table_info(events)")]
    names = [c[0] for c in columns]
    indexes = [sql for (sql,) in conn.execute(
        "SELECT sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events' AND sql IS NOT NULL "
        "ORDER BY name")]
    analysed = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'sqlite_stat1'").fetchone() is not None
    private_sql = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'event_private'").get

    conn.execute(STRINGS_SQL)
    conn.execute(table_sql(columns))
    assigned: dict[Any, int] = {}

    def intern(value: Any) -> int | None:
        if value is None:
            return None
        label = _label(value)
        found = assigned.get(label)
        if found is None:
            found = assigned[label] = len(assigned) + 1
        return found

    conn.create_scalar_function("cpm_intern", intern, 1)
    select = ", ".join(f"cpm_intern({n})" if n in INTERNED else n for n in names)
    conn.execute(f"INSERT INTO {ROWS}({', '.join(names)}) SELECT {select} FROM events ORDER BY id")
    conn.executemany(f"INSERT INTO {STRINGS}(id, v) VALUES (?, ?)", ((i, v) for v, i in assigned.items()))

    conn.execute(private_sql.replace("CREATE TABLE event_private (", "CREATE TABLE event_private_v12 (", 1)
                 .replace("REFERENCES events(id)", f"REFERENCES {ROWS}(id)"))
    conn.execute("INSERT INTO event_private_v12 SELECT * FROM event_private ORDER BY event_id")
    conn.execute("DROP TABLE event_private")
    conn.execute("ALTER TABLE event_private_v12 RENAME TO event_private")
    conn.execute("DROP TABLE events")
    for sql in indexes:
        conn.execute(sql.replace(" ON events(", f" ON {ROWS}(", 1))
    conn.execute(view_sql(names))
    for sql in triggers_sql(columns):
        conn.execute(sql)
    if analysed:  # statistics for the new indexes now (4.4 s at 10 M events): their STAT4 samples
        # hold ids, and the planner needs them to weigh a bound label id (lookup)
        conn.execute(f"ANALYZE {ROWS}")
