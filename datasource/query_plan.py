"""Range planner: which rows answer a target - rollup buckets, raw events, or both.

A target's window [from, to) is split into a raw head edge, whole hours, whole days, whole
hours and a raw tail edge (`split_range`); the whole buckets are read from the narrowest
rollup table family (datasource/rollup.py) whose key covers the target's grouping and
filters, the edges from `events`. A filter the rollups cannot answer (project, endpoint,
latency bounds, trace id, search, cache read/creation) sends the whole target to raw events.

Filters are translated, never approximated. Keys stored in a rollup (instance, status,
failure type, request type, cache state) are evaluated on the rollup row with the events'
semantics (filters.ROLLUP_COLUMNS). Keys that match several event columns (provider,
model, account, api key) are resolved through `rollup_aliases`, the catalog of every
(key, alias...) tuple ever stored: the clause is evaluated on each tuple, and it is exact
on the rollup key when, for every key value, either all its tuples match or none do; the
filter then becomes `key IN (matching keys)`. Otherwise the target reads raw events.

Measures are summed the same way on both sides (integer sums; cost in integer nano-USD,
as rollup.py stores it), so a rollup answer equals the raw one exactly; percentiles
merge the rollup sketches and add the raw edges' values to the merged sketch (1 %).
"""

from __future__ import annotations

import json
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from datasource import filters, interned, rollup, sketch
from datasource.flights import Flights
from datasource.model import Clause
from datasource.sketch import Sketch

FIVE_MIN = rollup.FIVE_MIN_MS
HOUR = rollup.HOUR_MS
DAY = rollup.DAY_MS
GRAIN_SUFFIX = {FIVE_MIN: "_5m", HOUR: "_hour", DAY: "_day"}
RAW = ""  # Piece.table for raw events
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Piece:
    table: str  # a rollup table, or RAW
    from_ms: int
    to_ms: int


@dataclass(frozen=True, slots=True)
class Family:
    """Rollup tables sharing one key: grain -> table; rank orders families narrowest first."""

    name: str
    dims: frozenset[str]
    tables: Mapping[int, str]
    sketches: bool
    rank: int
    sets: bool = False  # the API-key set tables: usable only where complete (sets_complete_from)


def _families() -> tuple[Family, ...]:
    by_dims: dict[tuple[str, ...], dict[int, str]] = {}
    sketches: dict[tuple[str, ...], bool] = {}
    sets: dict[tuple[str, ...], bool] = {}
    for spec in rollup.SPECS:
        by_dims.setdefault(spec.dims, {})[spec.grain_ms] = spec.table
        sketches[spec.dims] = spec.sketches
        sets[spec.dims] = spec.sets
    # Rows per bucket measured on the benchmark shape (docs/performance.md): latency total
    # (instance x status) < latency < traffic < account latency < account x model latency
    # < account failure < account < account x model failure (account's key plus status code
    # and failure type) < api key sets (one row per key and bucket) < api key (key x account x model).
    order = ["latency_total", "latency", "traffic", "account_latency", "account_model_latency", "account_failure",
             "account", "account_model_failure", "api_key_sets", "api_key"]
    out = []
    for dims, tables in by_dims.items():
        name = next(iter(tables.values())).removeprefix("rollup_")
        for suffix in GRAIN_SUFFIX.values():
            name = name.removesuffix(suffix)
        rank = order.index(name) if name in order else len(order)
        out.append(Family(name, frozenset(dims), dict(tables), sketches[dims], rank, sets[dims]))
    return tuple(sorted(out, key=lambda f: f.rank))


FAMILIES = _families()

# --- ranges -------------------------------------------------------------------------


def _up(ms: int, grain: int) -> int:
    return -(-ms // grain) * grain


def _down(ms: int, grain: int) -> int:
    return ms - ms % grain


def split_range(from_ms: int, to_ms: int, tables: Mapping[int, str]) -> list[Piece]:
    """[from, to) as raw head / 5 min / hours / whole days / hours / 5 min / raw tail, using the
    grains `tables` has (each edge is cut by the next finer grain; empty pieces dropped)."""
    grains = sorted(tables, reverse=True)

    def cut(lo: int, hi: int, level: int) -> list[Piece]:
        if lo >= hi:
            return []
        if level == len(grains):
            return [Piece(RAW, lo, hi)]
        grain = grains[level]
        a, b = _up(lo, grain), _down(hi, grain)
        if a >= b:
            return cut(lo, hi, level + 1)
        return cut(lo, a, level + 1) + [Piece(tables[grain], a, b)] + cut(b, hi, level + 1)

    return cut(from_ms, to_ms, 0)


# --- filters ------------------------------------------------------------------------

# Keys no rollup stores: a target filtered by one of them reads raw events.
RAW_ONLY_KEYS = frozenset({"project", "endpoint", "min_latency_ms", "max_latency_ms", "trace_id", "search"})
DIRECT_KEYS = {"instance": "instance", "failure_type": "failure_type", "request_type": "request_type"}


@dataclass(frozen=True)
class Translation:
    """The clauses as SQL on rollup rows (`sql`, `params`), the rollup dims they read, and the
    same filter for raw events with alias keys narrowed to their key column (index-friendly)."""

    sql: str
    params: tuple[Any, ...]
    dims: frozenset[str]
    raw_sql: str
    raw_params: tuple[Any, ...]
    # raw_sql with the key columns' terms written `+lid_x`: the same rows, but the planner may not
    # seek the key indexes for them (Plan.where(..., key_indexes=False))
    raw_scan_sql: str = ""


def _status_dims(clause: Clause) -> set[str]:
    if clause.op in ("=~", "!~"):
        return {"status_class", "status_code"}
    if clause.op in ("<", ">"):
        return {"status_code"}
    dims = set()
    for value in clause.values:
        low = value.lower()
        dims.add({"success": "failed", "failed": "failed", "unusual": "status_class"}.get(low, "status_code"))
    return dims


def resolve_alias(conn: Any, clause: Clause) -> list[str] | None:
    """The rollup key values an alias-key clause selects exactly, or None when it is not exact."""
    key_col, a1, a2 = rollup.ALIASES[clause.key]
    match, params = filters.where_sql([clause])
    cols = f"key AS {key_col}, alias1 AS {a1}" + (f", alias2 AS {a2}" if a2 else "")
    sql = (f"SELECT key, min(m), max(m) FROM (SELECT key, coalesce(({match}), 0) AS m FROM "
           f"(SELECT key, {cols} FROM rollup_aliases WHERE dim = ?)) GROUP BY key")
    keys = []
    # placeholders in text order: the clause's (outer select list), then the dim
    for key, lo, hi in conn.execute(sql, (*params, clause.key)):
        if lo != hi:
            return None
        if hi:
            keys.append(key)
    return keys


def translate(conn: Any, clauses: Iterable[Clause]) -> Translation | None:
    """Clauses -> Translation, or None when some clause cannot be answered from rollups."""
    parts: list[str] = []
    params: list[Any] = []
    raw_parts: list[str] = []
    raw_params: list[Any] = []
    scan_parts: list[str] = []
    dims: set[str] = set()
    for clause in clauses:
        key = clause.key
        if key in RAW_ONLY_KEYS:
            return None
        if key in rollup.ALIASES:
            keys = resolve_alias(conn, clause)
            if keys is None:
                return None
            column = rollup.ALIASES[key][0]
            dims.add(column)
            parts.append(f"{column} IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(keys))
            # on the events view, the key column's label ids (interned.py), bound: the key indexes
            # apply, weighed with their statistics. A key without an id was never stored in events.
            if column == "api_key_hash" and "" in keys:
                raw_parts.append(f"coalesce({column}, '') IN (SELECT value FROM json_each(?))")
                scan_parts.append(raw_parts[-1])
                raw_params.append(json.dumps(keys))
                continue
            ids = interned.lookup(conn, keys)
            found = sorted(ids[k] for k in keys if k in ids)
            if len(found) == 1:
                term, value = "= ?", found[0]
            else:
                term, value = "IN (SELECT value FROM json_each(?))", json.dumps(found)
            raw_parts.append(f"{interned.ID_PREFIX}{column} {term}")
            scan_parts.append(f"+{interned.ID_PREFIX}{column} {term}")
            raw_params.append(value)
            continue
        if key == "cache":
            if clause.op not in ("=~", "!~") and any(v.lower() in ("read", "creation") for v in clause.values):
                return None
            dims.add("cache_state")
        elif key == "status":
            dims |= _status_dims(clause)
        elif key in DIRECT_KEYS:
            dims.add(DIRECT_KEYS[key])
        else:  # pragma: no cover - every FILTER_KEY is handled above
            return None
        sql, p = filters.where_sql([clause], filters.ROLLUP_COLUMNS)
        parts.append(sql)
        params.extend(p)
        sql, p = filters.where_sql([clause], interned=True)
        raw_parts.append(sql)
        scan_parts.append(sql)
        raw_params.extend(p)
    return Translation(" AND ".join(parts) or "1", tuple(params), frozenset(dims),
                       " AND ".join(raw_parts) or "1", tuple(raw_params), " AND ".join(scan_parts) or "1")


# --- plans ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    pieces: list[Piece]
    translation: Translation | None
    conn: Any = field(default=None, compare=False, repr=False)  # for search_ids; None: scan

    @property
    def uses_rollups(self) -> bool:
        return any(p.table != RAW for p in self.pieces)

    def where(self, piece: Piece, clauses: Iterable[Clause], key_indexes: bool = True) -> tuple[str, list[Any]]:
        """WHERE text and parameters for one piece (rollup bucket range or events ts range).
        `key_indexes=False`: the raw form without seeks on the key indexes (account, model, key,
        provider), for a read a time-keyed index serves better."""
        if piece.table == RAW:
            if self.translation is None:
                resolve = None if self.conn is None else (lambda text, span: search_ids(self.conn, text, span))
                sql, params = filters.where_sql(clauses, span=(piece.from_ms, piece.to_ms), search_ids=resolve,
                                                interned=True)
            else:
                sql = self.translation.raw_sql if key_indexes else self.translation.raw_scan_sql
                params = list(self.translation.raw_params)
            return f"ts_ms >= ? AND ts_ms < ? AND {sql}", [piece.from_ms, piece.to_ms, *params]
        assert self.translation is not None
        return (f"bucket_ms >= ? AND bucket_ms < ? AND {self.translation.sql}",
                [piece.from_ms, piece.to_ms, *self.translation.params])


def plan(conn: Any, clauses: Sequence[Clause], from_ms: int, to_ms: int, dims: Iterable[str] = (), *,
         sketches: bool = False, step: int | None = None, rollups: bool = True,
         translation: Translation | None | bool = False) -> Plan:
    """The cheapest exact way to read [from, to) with these clauses, grouped by `dims`.

    Family choice: every family whose key holds the dims and the filters' dims (and
    sketches when asked); grains limited to those dividing `step` (time buckets must not
    straddle); the least raw time wins, then the narrowest family.
    """
    tr = translate(conn, clauses) if translation is False else translation
    raw = Plan([Piece(RAW, from_ms, to_ms)], tr if isinstance(tr, Translation) else None, conn)
    if not rollups or not isinstance(tr, Translation) or from_ms >= to_ms:
        return raw
    needed = set(dims) | tr.dims
    options: list[tuple[int, int, list[Piece], Family]] = []
    for fam in FAMILIES:
        if not needed <= fam.dims or (sketches and not fam.sketches):
            continue
        tables = {g: t for g, t in fam.tables.items() if step is None or step % g == 0}
        if not tables:
            continue
        pieces = split_range(from_ms, to_ms, tables)
        raw_ms = sum(p.to_ms - p.from_ms for p in pieces if p.table == RAW)
        if raw_ms < to_ms - from_ms:
            options.append((raw_ms, fam.rank, pieces, fam))
    for _, _, pieces, fam in sorted(options, key=lambda o: o[:2]):
        if fam.sets:  # checked only when it would be chosen (two small reads)
            cut = sets_complete_from(conn)
            if cut is not None and cut > from_ms:
                continue
        return Plan(pieces, tr)
    return raw


def sets_complete_from(conn: Any) -> int | None:
    """Where the API-key set tables (schema step 8) are complete: None for everywhere, else a UTC
    day boundary from which on they are.

    Step 8 backfilled them from the events present; days retention had already pruned
    (wholly, or the first day in part) stay empty there but are whole in the older rollups.
    Compared on the first day: rollup_traffic_day (every event since step 2) against
    rollup_api_key_sets_day (its first day and requests).
    """
    old = conn.execute("SELECT bucket_ms, sum(requests) FROM rollup_traffic_day "
                       "WHERE bucket_ms = (SELECT min(bucket_ms) FROM rollup_traffic_day)").fetchone()
    first_old, n_old = old if old else (None, None)
    if first_old is None:
        return None
    new = conn.execute("SELECT bucket_ms, sum(requests) FROM rollup_api_key_sets_day "
                       "WHERE bucket_ms = (SELECT min(bucket_ms) FROM rollup_api_key_sets_day)").fetchone()
    first_new, n_new = new if new else (None, None)
    if first_new is None:
        return 1 << 62  # set tables empty while older rollups hold events: not usable
    if first_new == first_old and n_new == n_old:
        return None
    return first_new + DAY


# --- reading --------------------------------------------------------------------------

# The measures of one group, in order; both sides produce the same integers.
SUMS: tuple[str, ...] = (
    "requests", "successes", "failures", "unusual", "norm_input_tokens", "output_tokens",
    "reasoning_tokens", "norm_cache_read_tokens", "cache_read_tokens", "cache_creation_tokens",
    "total_tokens", "cost_nusd", "latency_sum_ms", "latency_samples", "ttft_sum_ms", "ttft_samples",
)
MAXES = ("last_ms", "last_failure_ms")
ALL = SUMS + MAXES
IDX = {name: i for i, name in enumerate(ALL)}
_RAW_SUM = {
    "requests": "count(*)", "successes": "sum(failed = 0)", "failures": "sum(failed)",
    # the label's id, found once per statement: a text comparison would look the label up per row
    "unusual": f"sum({interned.ID_PREFIX}status_class IS {interned.label_id_sql(repr('unusual'))})",
    "cost_nusd": "sum(CAST(round(est_cost_usd * 1e9) AS INTEGER))",
    "latency_sum_ms": "sum(CASE WHEN latency_ms > 0 THEN latency_ms ELSE 0 END)",
    "latency_samples": "sum(latency_ms > 0)",
    "ttft_sum_ms": "sum(CASE WHEN ttft_ms > 0 THEN ttft_ms ELSE 0 END)",
    "ttft_samples": "sum(ttft_ms > 0)",
}
RAW_EXPR = {m: f"coalesce({_RAW_SUM.get(m, f'sum({m})')}, 0)" for m in SUMS}
RAW_EXPR.update({"last_ms": "max(ts_ms)", "last_failure_ms": "max(CASE WHEN failed = 1 THEN ts_ms END)"})
ROLLUP_EXPR = {m: f"coalesce(sum({m}), 0)" for m in SUMS}
ROLLUP_EXPR.update({m: f"max({m})" for m in MAXES})
# Group expressions: (events, rollup); events values mapped to what a rollup key stores.
GROUPS: dict[str, tuple[str, str]] = {
    "instance": ("instance", "instance"),
    "provider": ("provider", "provider"),
    "analytics_model": ("analytics_model", "analytics_model"),
    "account_key": ("account_key", "account_key"),
    "api_key_hash": ("coalesce(api_key_hash, '')", "api_key_hash"),
    "status_class": ("status_class", "status_class"),
    "status_code": ("coalesce(status_code, 0)", "status_code"),
    "failed": ("failed", "failed"),
    "failure_type": ("failure_type", "failure_type"),
    "request_type": ("coalesce(request_type, '')", "request_type"),
    "cache_state": ("cache_state", "cache_state"),
}


def key_equals_sql(column: str) -> str:
    """`<key column> = ?` on the events view for one key other than '' of a LABELS column (all
    interned), bound to its id from `key_ids`: events(key, ts_ms) serves it as one index seek."""
    return f"{interned.ID_PREFIX}{column} = ?"


def key_ids(conn: Any, keys: Iterable[str]) -> dict[str, int]:
    """key -> the label id to bind in `key_equals_sql`; a key absent was never stored ('' never is:
    it stands for NULL too)."""
    return interned.lookup(conn, [k for k in keys if k != ""])


def empty(measures: Sequence[str] = ALL) -> list[Any]:
    return [None if m in MAXES else 0 for m in measures]


def add_into(into: list[Any], row: Sequence[Any], measures: Sequence[str] = ALL) -> None:
    for i, m in enumerate(measures):
        if m in MAXES:
            if row[i] is not None and (into[i] is None or row[i] > into[i]):
                into[i] = row[i]
        else:
            into[i] += row[i]


def raw_group_terms(group: Sequence[str], first: int = 1) -> list[str]:
    """GROUP BY terms on the events view for GROUPS dims selected from result column `first` on:
    a label dim by its id (`lid_x`, the same groups: one text per id), the others by position.
    Grouping by the text would look each row's label up; by the id it is looked up per group
    (3 h of the 10 M file by instance and account: 30 -> 15.5 ms)."""
    return [f"{interned.ID_PREFIX}{g}" if GROUPS[g][0] == g and g in interned.INTERNED else str(first + i)
            for i, g in enumerate(group)]


def _select(piece: Piece, group: Sequence[str], step: int | None, fold: bool = False) -> tuple[str, str]:
    side = 0 if piece.table == RAW else 1
    exprs = [GROUPS[g][side] for g in group]
    if fold:  # the last group column keeps the listed values; every other value becomes NULL
        e = exprs[-1]
        exprs[-1] = f"CASE WHEN {e} IN (SELECT value FROM json_each(?)) THEN {e} END"
    lead = 1 if step is not None else 0
    if step is not None:
        exprs.insert(0, "ts_ms - (ts_ms % ?)" if side == 0 else "bucket_ms - (bucket_ms % ?)")
    by = [str(i + 1) for i in range(len(exprs))]
    if side == 0:
        keyed = group[:-1] if fold else group  # the folded column groups by its CASE, by position
        by[lead:lead + len(keyed)] = raw_group_terms(keyed, lead + 1)
    return ", ".join(exprs), ", ".join(by)


STANDARD_PCTS = (50, 95, 99)

# Results kept per connection for MEMO_TTL_S, keyed also by the connection's own change count
# and PRAGMA data_version (which moves when another connection commits): never stale data.
MEMO_TTL_S = 2.0
_memo: dict[tuple, tuple[float, Any]] = {}
_memo_lock = threading.Lock()


def _memo_key(conn: Any, key: tuple) -> tuple:
    return (id(conn), conn.filename, conn.total_changes(), conn.pragma("data_version"), *key)


def _memo_get(conn: Any, key: tuple) -> Any:
    hit = _memo.get(_memo_key(conn, key))
    if hit is None or time.monotonic() - hit[0] > MEMO_TTL_S:
        return None
    return hit[1]


def _memo_put(conn: Any, key: tuple, value: Any) -> None:
    """Keep `value`; entries past MEMO_TTL_S go now (they used to stay until 64 were held: ~17 MB
    of merged sketches at 10 M after a refresh), and all of them when 64 are still fresh."""
    now = time.monotonic()
    with _memo_lock:
        gone = [k for k, (t, _) in _memo.items() if now - t > MEMO_TTL_S]
        if not gone and len(_memo) >= 64:
            gone = list(_memo)
        for k in gone:
            del _memo[k]
        _memo[_memo_key(conn, key)] = (now, value)


# Time series read from raw events and grouped by status dims only (Monitoring's requests by
# status class, success rate, failures by failure type and by status code: at 24 h filtered by
# account and model, each scanned the same ~31 k events of the 10 M dataset, ~50 ms a scan) share
# one read grouped by all four dims with every measure (~1.2x one scan), folded in Python: the
# same integers (sums add, maxes take the max). Shared only while it is being read, like
# identical targets in query.execute: nothing is kept once it is answered.
STATUS_DIMS = ("status_class", "status_code", "failed", "failure_type")
_STATUS_SET = frozenset(STATUS_DIMS)
SHARE_STATUS_SERIES = True


# Readers asking for the same status superset at the same moment share one read (flights.py).
STATUS_FLIGHTS = Flights()
SHARED_WAIT_S = 60.0


def shared(key: tuple, compute: Callable[[], T]) -> T:
    """compute(), or the result of the same key's computation already running in another thread."""
    return STATUS_FLIGHTS.run(key, compute, SHARED_WAIT_S)


# A search (a LIKE over 22 columns, no index) costs a scan of its window per read: ~1 s a day
# at 10 M events / 30 days, and a dashboard refresh makes ~15 such reads. The first read of a
# (text, window) scans for the matching ids once, the concurrent ones wait for it (flights),
# and for SEARCH_IDS_TTL_S the others read those ids; keyed by the newest event id, so a new
# event starts a new scan. More than SEARCH_IDS_MAX matches: every read scans, as before.
SEARCH_IDS_MAX = 20_000
SEARCH_IDS_TTL_S = 10.0
_search_cache: dict[tuple, tuple[float, str | None]] = {}
_search_lock = threading.Lock()


def search_ids(conn: Any, text: str, span: tuple[int, int]) -> str | None:
    """Ids of the events in [from, to) that `search` text matches, as a JSON array (the bound
    parameter the reads pass to json_each, and compact to keep), or None past SEARCH_IDS_MAX."""
    newest = conn.execute("SELECT max(id) FROM events").fetchone()[0]
    key = ("search", conn.filename, text, span, newest)
    now = time.monotonic()
    with _search_lock:
        hit = _search_cache.get(key)
        if hit is not None and now - hit[0] < SEARCH_IDS_TTL_S:
            return hit[1]

    def scan() -> str | None:
        like, params = filters.where_sql([Clause("search", "=", (text,))], interned=True)
        # Read the table in id order between the window's lowest and highest id (ids follow
        # arrival, so a window's events are one stretch of the table), not row by row through
        # events_ts: 242 against 700-890 ms a day at 10 M events. Only when the stretch is at
        # most twice the window's events (an import of old events can spread them out).
        first, last, count = conn.execute("SELECT min(id), max(id), count(*) FROM events "
                                          "WHERE ts_ms >= ? AND ts_ms < ?", span).fetchone()
        if not count:
            return "[]"
        if last - first + 1 <= 2 * count:
            # +ts_ms: no index for the time terms, so the rows are read by id (NOT INDEXED
            # cannot be said of a view)
            sql = ("SELECT id FROM events WHERE id >= ? AND id <= ? AND +ts_ms >= ? AND +ts_ms < ? "
                   f"AND {like} LIMIT ?")
            args: tuple = (first, last, *span, *params, SEARCH_IDS_MAX + 1)
        else:
            sql = f"SELECT id FROM events WHERE ts_ms >= ? AND ts_ms < ? AND {like} LIMIT ?"
            args = (*span, *params, SEARCH_IDS_MAX + 1)
        rows = conn.execute(sql, args).fetchall()
        return None if len(rows) > SEARCH_IDS_MAX else json.dumps([r[0] for r in rows])

    ids = shared(key, scan)
    with _search_lock:
        if len(_search_cache) >= 32:  # at most ~6 MB of id lists
            _search_cache.clear()
        _search_cache[key] = (time.monotonic(), ids)
    return ids


# A raw piece up to this long is scanned for distinct keys; longer ones seek per key.
SCAN_DISTINCT_MS = 2 * HOUR


@dataclass
class Reader:
    """Reads one target's pieces: grouped sums, sketches/values, distinct keys."""

    conn: Any
    clauses: Sequence[Clause]
    rollups: bool = True
    _translation: Any = field(default=False, repr=False)
    used_rollups: bool = False

    def translation(self) -> Translation | None:
        if self._translation is False:
            self._translation = translate(self.conn, self.clauses)
        return self._translation

    def selective(self, span: tuple[int, int] | None = None) -> bool:
        """A trace id equality, or (over `span`) a search whose matching ids are known: a few rows,
        found without a scan, so reading them beats one seek per stored key (each of which would
        repeat the trace id's seeks, or test every one of the ids)."""
        for c in self.clauses:
            if c.key == "trace_id" and c.op == "=" and "" not in c.values:
                return True
            if c.key == "search" and c.op == "=" and span is not None and search_ids(self.conn, c.values[0], span):
                return True
        return False

    def raw_where(self, from_ms: int, to_ms: int, shared_search: bool = True,
                  key_indexes: bool = True) -> tuple[str, list[Any]]:
        """WHERE text and parameters for the events of [from_ms, to_ms) under the clauses, alias keys
        narrowed to their key column when exact (`lid_account_key = ?`: the key indexes apply;
        with `key_indexes=False` they may not, Plan.where).
        `shared_search=False` scans for a search instead of reading its shared ids (a LIMIT read
        that stops at its first rows)."""
        p = Plan([Piece(RAW, from_ms, to_ms)], self.translation(), self.conn if shared_search else None)
        return p.where(p.pieces[0], self.clauses, key_indexes)

    def plan(self, from_ms: int, to_ms: int, dims: Iterable[str] = (), *, sketches: bool = False,
             step: int | None = None) -> Plan:
        p = plan(self.conn, self.clauses, from_ms, to_ms, dims, sketches=sketches, step=step,
                 rollups=self.rollups, translation=self.translation())
        self.used_rollups = self.used_rollups or p.uses_rollups
        return p

    def sums(self, from_ms: int, to_ms: int, group: Sequence[str] = (), *, step: int | None = None,
             measures: Sequence[str] = ALL, keep: Sequence[Any] | None = None) -> dict[tuple, list[Any]]:
        """Group key (bucket first when `step`) -> the `measures` (default ALL, IDX order).

        `keep`: values of the last group column to keep; the others are folded into one
        group whose value is None (the timeseries `other` series), in SQL.
        """
        out: dict[tuple, list[Any]] = {}
        raw_measures = ", ".join(RAW_EXPR[m] for m in measures)
        rollup_measures = ", ".join(ROLLUP_EXPR[m] for m in measures)
        p = self.plan(from_ms, to_ms, group, step=step)
        for piece in p.pieces:
            where, params = p.where(piece, self.clauses)
            if (piece.table == RAW and step is not None and keep is None and SHARE_STATUS_SERIES
                    and self.conn.filename and set(group) <= _STATUS_SET):
                self._fold_status(out, where, params, group, step, measures)
                continue
            sel, by = _select(piece, group, step, keep is not None)
            table = "events" if piece.table == RAW else piece.table
            chosen = raw_measures if piece.table == RAW else rollup_measures
            head = [step] if step is not None else []
            if keep is not None:
                head.append(json.dumps(list(keep)))
            if sel:
                sql = f"SELECT {sel}, {chosen} FROM {table} WHERE {where} GROUP BY {by}"
            else:
                sql = f"SELECT count(*), {chosen} FROM {table} WHERE {where}"
            width = len(group) + (1 if step is not None else 0)
            for row in self.conn.execute(sql, (*head, *params)):
                if not sel:
                    if row[0] == 0:
                        continue  # an aggregate without GROUP BY yields a row even when empty
                    row = row[1:]
                key = tuple(row[:width])
                have = out.get(key)
                if have is None:
                    out[key] = list(row[width:])
                else:
                    add_into(have, row[width:], measures)
        return out

    def _fold_status(self, out: dict[tuple, list[Any]], where: str, params: list[Any], group: Sequence[str],
                     step: int, measures: Sequence[str]) -> None:
        """A raw piece's time buckets grouped by status dims only, from the status superset
        (every measure by bucket x STATUS_DIMS), read once for the panels asking at the same time."""
        key = (self.conn.filename, where, tuple(params), step)
        rows = shared(key, lambda: self._status_superset(where, params, step))
        pick = [1 + STATUS_DIMS.index(g) for g in group]
        at = [IDX[m] for m in measures]
        for full, values in rows.items():
            k = (full[0], *(full[i] for i in pick))
            sel = [values[i] for i in at]
            have = out.get(k)
            if have is None:
                out[k] = sel
            else:
                add_into(have, sel, measures)

    def _status_superset(self, where: str, params: list[Any], step: int) -> dict[tuple, tuple]:
        exprs = ", ".join(GROUPS[d][0] for d in STATUS_DIMS)
        by = ", ".join(["1", *raw_group_terms(STATUS_DIMS, 2)])
        measures = ", ".join(RAW_EXPR[m] for m in ALL)
        sql = f"SELECT ts_ms - (ts_ms % ?), {exprs}, {measures} FROM events WHERE {where} GROUP BY {by}"
        width = len(STATUS_DIMS) + 1
        return {tuple(row[:width]): tuple(row[width:]) for row in self.conn.execute(sql, (step, *params))}

    def distribution(self, column: str, from_ms: int, to_ms: int, group: Sequence[str] = (), *,
                     step: int | None = None) -> "Distributions":
        """Latency or TTFT samples per group: merged rollup sketches plus raw edge values.

        Kept for a moment (`_memo`): the p50/p95/p99 targets of one panel merge the same sketches.
        """
        memo_key = ("dist", column, from_ms, to_ms, tuple(group), step, tuple(self.clauses), self.rollups)
        found = _memo_get(self.conn, memo_key)
        if found is not None:
            self.used_rollups = self.used_rollups or found.approximate
            return found
        out = self._distribution(column, from_ms, to_ms, group, step=step)
        _memo_put(self.conn, memo_key, out)
        return out

    def _distribution(self, column: str, from_ms: int, to_ms: int, group: Sequence[str] = (), *,
                      step: int | None = None) -> "Distributions":
        out = Distributions()
        p = self.plan(from_ms, to_ms, group, sketches=True, step=step)
        out.approximate = p.uses_rollups
        width = len(group) + (1 if step is not None else 0)
        # the longest rollup piece first: its cached bins are copied whole, later pieces merge in
        for piece in sorted(p.pieces, key=lambda pc: (pc.table == RAW, pc.from_ms - pc.to_ms)):
            where, params = p.where(piece, self.clauses)
            sel, sel_by = _select(piece, group, step)
            head = [step] if step is not None else []
            lead = f"{sel}, " if sel else ""
            if piece.table == RAW:
                # Grouped in SQL, so few rows cross into Python: by sketch bucket when the
                # answer is a sketch anyway (the same ceil(ln(v) / ln(gamma)) as Sketch.add),
                # else by exact value.
                by = f"{sel_by}, {width + 1}" if sel_by else "1"
                value = f"CAST(ceil(ln({column}) / ?) AS INTEGER)" if out.approximate else column
                extra = [sketch._LOG_GAMMA] if out.approximate else []
                sql = (f"SELECT {lead}{value}, count(*) FROM events WHERE {where} AND {column} > 0 "
                       f"GROUP BY {by}")
                for row in self.conn.execute(sql, (*head, *extra, *params)):
                    key = tuple(row[:width])
                    if out.approximate:
                        target = out.sketches.get(key)
                        if target is None:
                            target = out.sketches[key] = Sketch()
                        target.bins[row[width]] = target.bins.get(row[width], 0) + row[width + 1]
                        target.count = -1
                    else:
                        vals = out.values.setdefault(key, [])
                        if row[width + 1] == 1:
                            vals.append(row[width])
                        else:
                            vals.extend([row[width]] * row[width + 1])
            else:
                for key, (indexes, counts) in self._piece_bins(piece, where, params, column, lead, head,
                                                               width).items():
                    target = out.sketches.get(key)
                    if target is None:
                        target = out.sketches[key] = Sketch()
                        target.bins = dict(zip(indexes, counts))
                    else:
                        into = target.bins
                        for i, c in zip(indexes, counts):
                            into[i] = into.get(i, 0) + c
                    target.count = -1  # recomputed in finish()
        out.finish()
        return out

    def _piece_bins(self, piece: Piece, where: str, params: list[Any], column: str, lead: str,
                    head: list[Any], width: int) -> dict[tuple, Bins]:
        """Group key -> merged sketch bins of one rollup piece (indexes, counts); not to be modified.

        Kept across requests (`PIECES`) while the piece's rows are unchanged, which a fingerprint
        read with them checks: a row's sketch only ever changes by gaining samples, which also
        moves its `*_samples` count, so equal (rows, samples, requests, first and last time)
        sums over the same rows mean equal sketches. Whole past hours and days rarely change, so
        a 30-day refresh merges its ~5,000 account x day blobs once, not on every refresh.
        """
        blob, samples = (("latency_sketch", "latency_samples") if column == "latency_ms"
                         else ("ttft_sketch", "ttft_samples"))
        cache_key = (self.conn.filename, piece.table, blob, lead, where, *head, *params)
        fingerprint = tuple(self.conn.execute(
            f"SELECT count(*), total({samples}), total(requests), min(first_ms), max(last_ms) "
            f"FROM {piece.table} WHERE {where}", params).fetchone())
        hit = PIECES.get(cache_key, fingerprint)
        if hit is not None:
            return hit
        merged: dict[tuple, dict[int, int]] = {}
        sql = f"SELECT {lead}{blob} FROM {piece.table} WHERE {where} AND {blob} IS NOT NULL"
        for row in self.conn.execute(sql, (*head, *params)):
            key = tuple(row[:width])
            into = merged.get(key)
            if into is None:
                into = merged[key] = {}
            for i, c in zip(*decoded(row[width])):
                into[i] = into.get(i, 0) + c
        packed = {key: _bins(bins) for key, bins in merged.items()}
        PIECES.put(cache_key, fingerprint, packed)
        return packed

    def exact_series(self, column: str, from_ms: int, to_ms: int, step: int, pct: int) -> dict[int, Any] | None:
        """Nearest-rank percentile per time bucket computed inside SQLite (one row per bucket and
        percentile), when the whole window reads raw events anyway; None when rollups would
        answer part. p50, p95 and p99 are ranked together and kept for a moment
        (`_memo`): a latency panel asks for the three as separate targets of one request.
        """
        p = self.plan(from_ms, to_ms, (), sketches=True, step=step)
        if p.uses_rollups:
            return None
        pcts = STANDARD_PCTS if pct in STANDARD_PCTS else (pct,)
        key = ("series", column, from_ms, to_ms, step, tuple(self.clauses), pcts)
        found = _memo_get(self.conn, key)
        if found is None:
            where, params = p.where(p.pieces[0], self.clauses)
            ranks = " OR ".join("rn = max(1, (n * ? + 99) / 100)" for _ in pcts)
            sql = (f"SELECT b, rn, n, v FROM (SELECT ts_ms - (ts_ms % ?) AS b, {column} AS v, "
                   f"row_number() OVER (PARTITION BY ts_ms - (ts_ms % ?) ORDER BY {column}) AS rn, "
                   f"count(*) OVER (PARTITION BY ts_ms - (ts_ms % ?)) AS n "
                   f"FROM events WHERE {where} AND {column} > 0) WHERE {ranks}")
            found = {q: {} for q in pcts}
            for b, rn, n, v in self.conn.execute(sql, (step, step, step, *params, *pcts)):
                for q in pcts:
                    if rn == max(1, (n * q + 99) // 100):
                        found[q][b] = v
            _memo_put(self.conn, key, found)
        return found[pct]

    def distinct(self, column: str, from_ms: int, to_ms: int, skip: str) -> set[str]:
        """Distinct values of a key column (`skip`, the 'none' value, excluded), exact.

        Unfiltered, raw events answer from their first event on (an index seek per key
        known to the alias catalog) and rollups only for what retention has pruned.
        """
        found: set[str] = set()
        if not self.clauses:
            oldest = self.conn.execute("SELECT min(ts_ms) FROM events").fetchone()[0]
            if oldest is not None and oldest < to_ms:
                found = self._seek_keys(column, skip, Plan([Piece(RAW, max(from_ms, oldest), to_ms)], None, self.conn),
                                        found)
                if from_ms >= oldest:
                    return found
                to_ms = oldest
        p = self.plan(from_ms, to_ms, (column,))
        return self._seek_keys(column, skip, p, found)

    def _seek_keys(self, column: str, skip: str, p: Plan, found: set[str]) -> set[str]:
        found = set(found)
        candidates: list[str] | None = None
        for piece in p.pieces:
            where, params = p.where(piece, self.clauses)
            if (piece.table != RAW or piece.to_ms - piece.from_ms <= SCAN_DISTINCT_MS
                    or self.selective((piece.from_ms, piece.to_ms))):
                table = "events" if piece.table == RAW else piece.table
                if piece.table == RAW:  # distinct labels by their ids (raw_group_terms)
                    sql = f"SELECT {GROUPS[column][0]} FROM events WHERE {where} GROUP BY {raw_group_terms([column])[0]}"
                else:
                    sql = f"SELECT DISTINCT {column} FROM {table} WHERE {where}"
                found.update(r[0] for r in self.conn.execute(sql, params))
                continue
            if candidates is None:
                # every key ever stored (the alias catalog): one index seek on events(key, ts_ms) each
                dim = LABELS[column][0]
                candidates = [r[0] for r in self.conn.execute(
                    "SELECT DISTINCT key FROM rollup_aliases WHERE dim = ?", (dim,)) if r[0] not in (skip, "")]
            sql = f"SELECT 1 FROM events WHERE {where} AND {key_equals_sql(column)} LIMIT 1"
            if not self.clauses:
                # the window alone: event_rows itself. A statement on the events view is prepared
                # again at each run (new time bounds, which the planner's STAT4 estimates read),
                # and preparing the view's 99 columns costs ~35 us, 5x the seek (Monitoring's
                # summary made ~300 such seeks per panel)
                sql = f"SELECT 1 FROM {interned.ROWS} WHERE {where} AND {column} = ? LIMIT 1"
            ids = key_ids(self.conn, candidates)
            for key in candidates:
                if key not in found and key in ids and self.conn.execute(sql, (*params, ids[key])).fetchone():
                    found.add(key)
        found.discard(skip)
        found.discard(None)
        return found


@dataclass
class Distributions:
    """Per group: a Sketch (when rollups took part) or the exact sorted values."""

    values: dict[tuple, list[float]] = field(default_factory=dict)
    sketches: dict[tuple, Sketch] = field(default_factory=dict)
    approximate: bool = False
    # p50/p95/p99 of a sketch, computed together: a latency panel's three targets each ask one
    # of them for every bucket of the same (memoised) distributions.
    _standard: dict[tuple, dict[int, float | None]] = field(default_factory=dict, repr=False)

    def finish(self) -> None:
        for sk in self.sketches.values():
            sk.count = sum(sk.bins.values())
        if self.approximate:
            for key, vals in self.values.items():
                target = self.sketches.setdefault(key, Sketch())
                target.extend(vals)
            self.values = {}
        else:
            for vals in self.values.values():
                vals.sort()

    def keys(self) -> set[tuple]:
        return set(self.values) | set(self.sketches)

    def merged(self, keys: Iterable[tuple]) -> "Distributions":
        """One group from several (the timeseries `other` series)."""
        out = Distributions(approximate=self.approximate)
        for key in keys:
            if key in self.sketches:
                out.sketches.setdefault((), Sketch()).merge(self.sketches[key])
            if key in self.values:
                out.values.setdefault((), []).extend(self.values[key])
        for vals in out.values.values():
            vals.sort()
        return out

    def percentiles(self, key: tuple, pcts: Sequence[int]) -> list[float | None]:
        if key in self.sketches:
            sk = self.sketches[key]
            if not sk.count:
                return [None] * len(pcts)
            if not all(p in STANDARD_PCTS for p in pcts):
                return sk.quantiles([p / 100 for p in pcts])
            found = self._standard.get(key)
            if found is None:
                found = self._standard[key] = dict(zip(STANDARD_PCTS, sk.quantiles([p / 100 for p in STANDARD_PCTS])))
            return [found[p] for p in pcts]
        vals = self.values.get(key)
        if not vals:
            return [None] * len(pcts)
        n = len(vals)
        return [vals[max(1, (n * p + 99) // 100) - 1] for p in pcts]


# Sketch bins held by the read caches: (bucket indexes, counts) as two int64 arrays, 16 bytes a
# bin; as a dict of Python ints a bin took ~80 bytes (the decoded-blob cache alone held 46 MB
# after one 30-day refresh of every dashboard at 10 M, 586,190 bins in 3,570 blobs).
Bins = tuple[array, array]


def _bins(bins: Mapping[int, int]) -> Bins:
    return array("q", bins.keys()), array("q", bins.values())


# Decoded sketch blobs, keyed by content: whole-day and past-hour blobs never change, so a
# dashboard refresh merges cached bins instead of decoding ~1,500 blobs (30 days) again.
_DECODED: dict[bytes, Bins] = {}
DECODED_MAX = 4096


class PieceCache:
    """Merged sketch bins per rollup piece (Reader._piece_bins): key -> (fingerprint, bins by group).

    Bounded by the bins held (16 bytes a bin, see `Bins`); the oldest entries go first, and one
    piece may take at most a quarter of the budget.
    """

    def __init__(self, max_bins: int) -> None:
        self.max_bins = max_bins
        self._items: dict[tuple, tuple[tuple, dict[tuple, Bins], int]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, fingerprint: tuple) -> dict[tuple, Bins] | None:
        hit = self._items.get(key)
        return hit[1] if hit is not None and hit[0] == fingerprint else None

    def put(self, key: tuple, fingerprint: tuple, merged: dict[tuple, Bins]) -> None:
        size = sum(len(b[0]) for b in merged.values())
        if size > self.max_bins // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._held -= old[2]
            while self._items and self._held + size > self.max_bins:
                self._held -= self._items.pop(next(iter(self._items)))[2]
            self._items[key] = (fingerprint, merged, size)
            self._held += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._held = 0


PIECES = PieceCache(300_000)


def decoded(blob: bytes) -> Bins:
    """The bins of a sketch blob, (indexes, counts), from the cache when it holds them."""
    bins = _DECODED.get(blob)
    if bins is None:
        bins = _bins(sketch.decode(blob))
        if len(_DECODED) >= DECODED_MAX:
            _DECODED.clear()
        _DECODED[blob] = bins
    return bins


def cost_usd(nusd: int) -> float:
    return nusd / 1e9


# --- labels ------------------------------------------------------------------------------

# dim -> (rollup_aliases dim, events label column)
LABELS = {"account_key": ("account", "account"), "api_key_hash": ("api_key", "api_key_masked")}


def labels(reader: Reader, column: str, keys: Iterable[str], from_ms: int, to_ms: int) -> dict[str, str | None]:
    """max(label) per key over the window's matching events, like a GROUP BY on events would give.

    A key whose events have only ever carried one label (rollup_aliases) has that label
    whatever the window; the others are read from events (an index seek per key).
    """
    dim, label_col = LABELS[column]
    wanted = sorted({str(k) for k in keys})
    out: dict[str, str | None] = {}
    if not wanted:
        return out
    ambiguous = []
    sql = ("SELECT key, count(DISTINCT alias1), max(alias1) FROM rollup_aliases "
           "WHERE dim = ? AND key IN (SELECT value FROM json_each(?)) GROUP BY key")
    for key, n, label in reader.conn.execute(sql, (dim, json.dumps(wanted))):
        if n == 1:
            out[key] = label or None
        else:
            ambiguous.append(key)
    ambiguous += [k for k in wanted if k not in out and k not in ambiguous]
    if ambiguous:
        where, params = reader.raw_where(from_ms, to_ms)
        by_id = f"SELECT max({label_col}) FROM events WHERE {where} AND {key_equals_sql(column)}"
        by_text = f"SELECT max({label_col}) FROM events WHERE {where} AND {GROUPS[column][0]} = ?"
        ids = key_ids(reader.conn, ambiguous)
        for key in ambiguous:  # '' stands for NULL too (GROUPS' coalesce): no label id for it
            if key == "":
                out[key] = reader.conn.execute(by_text, (*params, key)).fetchone()[0]
            else:  # a key never stored in events has no id and no label
                out[key] = reader.conn.execute(by_id, (*params, ids[key])).fetchone()[0] if key in ids else None
    return out
