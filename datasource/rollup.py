"""Rollups: 5-minute, hourly and daily aggregates of events, kept exact by the store's dedup.

Each rollup table is described by a `RollupSpec` (grain and dimension columns);
every table carries the same measures: counts, token sums, cost (integer
nano-USD, `cost_nusd`, so sums are exact), latency and
TTFT sums/samples (values > 0 only, like the raw averages) and, where the spec
asks for them, serialized latency/TTFT sketches (datasource.sketch, 1 %).

`apply(conn, rows)` is called by store.insert_batch inside its transaction with
the rows it has just inserted (never duplicates), so a rollup always equals the
aggregate of the raw events it has seen. `rebuild(conn, from_ms, to_ms)`
recomputes whole buckets from raw events, leaving alone any bucket that raw
retention has already (partly) pruned: rollups outlive raw rows.

Dimension values are stored NOT NULL (a missing text becomes '', a missing
status code 0) so that upserts find their row; readers map '' back to NULL.
A `sets` spec also keeps the distinct analytics models and accounts (not '-') seen per
key, as sorted JSON arrays merged by union in SQL (`cpm_set_merge`): exact, idempotent
and order-free, so a rebuild reproduces the incremental rows byte for byte.
The table DDL lives in db.py (schema steps 2, 6, 7, 8 and 9); a test checks it matches SPECS.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any, Iterable, Mapping, Sequence

import apsw

from datasource import bulk, sketch, txn

logger = logging.getLogger(__name__)

FIVE_MIN_MS = 300_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MERGE_FUNCTION = "cpm_sketch_merge"
SET_MERGE_FUNCTION = "cpm_set_merge"


@dataclass(frozen=True, slots=True)
class RollupSpec:
    table: str
    grain_ms: int
    dims: tuple[str, ...]
    sketches: bool
    sets: bool = False  # `models` and `accounts` columns: the distinct values seen (SET_COLUMNS)


# Chosen by measuring the benchmark shape (see docs/performance.md): a key with
# account x api key x model is nearly one row per event even per day, so the
# identities are split: accounts (x model) hourly and daily, api keys daily.
# Sketches live only in narrow tables (few keys per batch to merge on write,
# few blobs to merge on read): per model, and per account by day.
_TRAFFIC = ("instance", "provider", "analytics_model", "request_type", "status_class",
            "status_code", "failed", "failure_type", "cache_state")
_ACCOUNT = ("instance", "account_key", "analytics_model", "provider", "status_class", "failed")
_API_KEY = ("instance", "api_key_hash", "account_key", "analytics_model", "failed")
_LATENCY = ("instance", "provider", "analytics_model", "failed")
_ACCOUNT_LATENCY = ("instance", "account_key", "provider")
_ACCOUNT_MODEL_LATENCY = ("instance", "account_key", "analytics_model", "provider", "failed")
_LATENCY_TOTAL = ("instance", "failed")
_ACCOUNT_FAILURE = ("instance", "account_key", "provider", "failed", "failure_type")
_API_KEY_SETS = ("instance", "api_key_hash")
_ACCOUNT_MODEL_FAILURE = ("instance", "account_key", "analytics_model", "provider", "status_class", "status_code",
                          "failed", "failure_type")

SPECS: tuple[RollupSpec, ...] = (
    RollupSpec("rollup_traffic_hour", HOUR_MS, _TRAFFIC, False),
    RollupSpec("rollup_traffic_day", DAY_MS, _TRAFFIC, False),
    RollupSpec("rollup_account_hour", HOUR_MS, _ACCOUNT, False),
    RollupSpec("rollup_account_day", DAY_MS, _ACCOUNT, False),
    RollupSpec("rollup_api_key_day", DAY_MS, _API_KEY, False),
    RollupSpec("rollup_latency_hour", HOUR_MS, _LATENCY, True),
    RollupSpec("rollup_latency_day", DAY_MS, _LATENCY, True),
    RollupSpec("rollup_account_latency_day", DAY_MS, _ACCOUNT_LATENCY, True),
    # Schema step 6: 5-minute grains so that the 5-minute buckets a dashboard asks at 24 h
    # (and raw edges under 5 minutes) come from rollups; a latency family with only instance
    # and status (one or two sketches per bucket, so an unfiltered latency panel merges few
    # blobs); hourly account latency (Account Overview p95 at 24 h) and account x model
    # latency (percentiles filtered by account and model).
    RollupSpec("rollup_traffic_5m", FIVE_MIN_MS, _TRAFFIC, False),
    RollupSpec("rollup_latency_5m", FIVE_MIN_MS, _LATENCY, True),
    RollupSpec("rollup_latency_total_5m", FIVE_MIN_MS, _LATENCY_TOTAL, True),
    RollupSpec("rollup_latency_total_hour", HOUR_MS, _LATENCY_TOTAL, True),
    RollupSpec("rollup_latency_total_day", DAY_MS, _LATENCY_TOTAL, True),
    RollupSpec("rollup_account_latency_hour", HOUR_MS, _ACCOUNT_LATENCY, True),
    RollupSpec("rollup_account_model_latency_hour", HOUR_MS, _ACCOUNT_MODEL_LATENCY, True),
    # Schema step 7: accounts by failure type (Account Overview's top failure type without
    # reading the window's failed events; ~1.5 rows per account and bucket).
    RollupSpec("rollup_account_failure_hour", HOUR_MS, _ACCOUNT_FAILURE, False),
    RollupSpec("rollup_account_failure_day", DAY_MS, _ACCOUNT_FAILURE, False),
    # Schema step 8: API keys keyed by instance and key only (~one row per key and bucket),
    # carrying the distinct models and accounts seen as sets (API Key Summary without
    # rollup_api_key_day's key x account x model rows, nor raw edges over 5 minutes).
    RollupSpec("rollup_api_key_sets_5m", FIVE_MIN_MS, _API_KEY_SETS, False, True),
    RollupSpec("rollup_api_key_sets_hour", HOUR_MS, _API_KEY_SETS, False, True),
    RollupSpec("rollup_api_key_sets_day", DAY_MS, _API_KEY_SETS, False, True),
    # Schema step 9: accounts x models by status code and failure type, hourly and daily (the
    # failure breakdowns and Account Overview's top failure type filtered by account and model,
    # which otherwise read every raw event of the account's model in the window).
    RollupSpec("rollup_account_model_failure_hour", HOUR_MS, _ACCOUNT_MODEL_FAILURE, False),
    RollupSpec("rollup_account_model_failure_day", DAY_MS, _ACCOUNT_MODEL_FAILURE, False),
)
# The tables each schema step created (db.py); a step's backfill fills only its own.
STEP6_TABLES = ("rollup_traffic_5m", "rollup_latency_5m", "rollup_latency_total_5m", "rollup_latency_total_hour",
                "rollup_latency_total_day", "rollup_account_latency_hour", "rollup_account_model_latency_hour")
STEP7_TABLES = ("rollup_account_failure_hour", "rollup_account_failure_day")
STEP8_TABLES = ("rollup_api_key_sets_5m", "rollup_api_key_sets_hour", "rollup_api_key_sets_day")
STEP9_TABLES = ("rollup_account_model_failure_hour", "rollup_account_model_failure_day")
STEP_TABLES = {6: STEP6_TABLES, 7: STEP7_TABLES, 8: STEP8_TABLES, 9: STEP9_TABLES}
# Set columns of a `sets` spec: column -> (event dimension, value left out).
SET_COLUMNS: dict[str, tuple[str, str | None]] = {"models": ("analytics_model", None),
                                                  "accounts": ("account_key", "-")}
SPEC_BY_TABLE = {spec.table: spec for spec in SPECS}
MAX_GRAIN_MS = max(spec.grain_ms for spec in SPECS)

# Event columns summed into the rollup columns of the same name.
TOKEN_COLUMNS: tuple[str, ...] = (
    "input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens", "cache_read_tokens",
    "cache_creation_tokens", "norm_input_tokens", "norm_uncached_tokens", "norm_cache_read_tokens",
    "compat_cached_tokens", "total_tokens",
)
# Additive measures, in the order of an accumulator's list.
MEASURES: tuple[str, ...] = (
    ("requests", "successes", "failures", "unusual") + TOKEN_COLUMNS
    + ("cost_nusd", "latency_sum_ms", "latency_samples", "ttft_sum_ms", "ttft_samples")
)
_N = len(MEASURES)

# What the events table stores when a row leaves a column out (its DEFAULT), and
# what a NULL dimension becomes in a rollup key.
_DIM_DEFAULTS: dict[str, Any] = {
    "instance": "default", "provider": "unknown", "account_key": "-", "analytics_model": "-",
    "status_class": "success", "failure_type": "none", "cache_state": "miss", "failed": 0,
    "status_code": 0, "request_type": "", "api_key_hash": "",
}
# rollup_aliases (schema step 3): dim -> (key column, alias columns); a NULL alias is ''.
# A filter on `dim` matches events through any of these columns (filters.EVENT_COLUMNS).
ALIASES: dict[str, tuple[str, str, str | None]] = {
    "provider": ("provider", "payload_provider", None),
    "model": ("analytics_model", "model", "resolved_model"),
    "account": ("account_key", "account", "auth_index"),
    "api_key": ("api_key_hash", "api_key_masked", None),
}
_ALIAS_COLUMNS = tuple(c for cols in ALIASES.values() for c in cols if c)
_ALIAS_DEFAULTS = {"model": "-"}  # events.model's DEFAULT; the key columns use _DIM_DEFAULTS
INSERT_ALIAS = "INSERT OR IGNORE INTO rollup_aliases(dim, key, alias1, alias2)"  # bulk.execute: VALUES ...

SOURCE_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(
    ("ts_ms", "failed", "status_class", "est_cost_usd", "latency_ms", "ttft_ms")
    + TOKEN_COLUMNS + tuple(d for spec in SPECS for d in spec.dims) + _ALIAS_COLUMNS
))


# --- SQL (constant text per spec, built once from the fixed SPECS) --------------


def _upsert_sql(spec: RollupSpec) -> tuple[str, str]:
    """(head, tail) of the spec's upsert: `head VALUES (...),(...) tail` (bulk.execute)."""
    key = ("bucket_ms",) + spec.dims
    cols = key + MEASURES + ("first_ms", "last_ms", "last_failure_ms")
    sets = [f"{m} = {m} + excluded.{m}" for m in MEASURES]
    sets += ["first_ms = min(first_ms, excluded.first_ms)", "last_ms = max(last_ms, excluded.last_ms)",
             "last_failure_ms = coalesce(max(last_failure_ms, excluded.last_failure_ms), "
             "last_failure_ms, excluded.last_failure_ms)"]
    if spec.sketches:
        cols += ("latency_sketch", "ttft_sketch")
        sets += [f"{c} = {MERGE_FUNCTION}({c}, excluded.{c})" for c in ("latency_sketch", "ttft_sketch")]
    if spec.sets:
        cols += tuple(SET_COLUMNS)
        sets += [f"{c} = {SET_MERGE_FUNCTION}({c}, excluded.{c})" for c in SET_COLUMNS]
    return (f"INSERT INTO {spec.table}({', '.join(cols)})",
            f"ON CONFLICT({', '.join(key)}) DO UPDATE SET {', '.join(sets)}")


_UPSERT = {spec.table: _upsert_sql(spec) for spec in SPECS}
_DELETE_RANGE = {spec.table: f"DELETE FROM {spec.table} WHERE bucket_ms >= ? AND bucket_ms < ?"
                 for spec in SPECS}
SELECT_EVENTS = (f"SELECT {', '.join(SOURCE_COLUMNS)} FROM events "
                 "WHERE ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms, id")
SELECT_EVENT_SPAN = "SELECT min(ts_ms), max(ts_ms) FROM events"
SELECT_PRUNED_BEFORE = "SELECT max(ts_ms) FROM event_ledger WHERE ts_ms < ?"


# --- aggregation -------------------------------------------------------------------


_ROW_TOKENS = itemgetter(*TOKEN_COLUMNS)


def _row_values(row: Mapping[str, Any], getter: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """`names`' values of a row: by `getter` (an itemgetter of them, in C) when the row has every
    column, as a stored or normalized row does; else one get per name, None where it is missing."""
    try:
        return getter(row)
    except KeyError:
        return tuple(row.get(name) for name in names)


def _measures(row: Mapping[str, Any]) -> tuple[Any, ...]:
    get = row.get
    failed = 1 if get("failed") else 0
    latency = get("latency_ms") or 0
    ttft = get("ttft_ms") or 0
    lat_ok = latency > 0
    ttft_ok = ttft > 0
    tokens = _row_values(row, _ROW_TOKENS, TOKEN_COLUMNS)
    if None in tokens or "" in tokens:  # NULL (or an empty text) counts as 0
        tokens = tuple(t or 0 for t in tokens)
    return (1, 1 - failed, failed, 1 if get("status_class") == "unusual" else 0, *tokens,
            _nano(get("est_cost_usd")), latency if lat_ok else 0, 1 if lat_ok else 0,
            ttft if ttft_ok else 0, 1 if ttft_ok else 0)


def _nano(usd: float | None) -> int:
    """USD to integer nano-USD, rounded half away from zero like SQLite's round().

    Integer sums are exact and order-free, so a rebuild reproduces the
    incremental rollup bit for bit (float sums differ in the last place).
    """
    if not usd:
        return 0
    scaled = usd * 1e9
    return int(scaled + (0.5 if scaled >= 0 else -0.5))


_DIM_NAMES = tuple(_DIM_DEFAULTS)
_DIM_POSITION = {name: i for i, name in enumerate(_DIM_NAMES)}
_ROW_DIMS = itemgetter(*_DIM_NAMES)
_FAILED = _DIM_POSITION["failed"]


def _dims(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """The row's dimension values in _DIM_NAMES order: None as the default, `failed` as 0 or 1."""
    values = _row_values(row, _ROW_DIMS, _DIM_NAMES)
    failed = values[_FAILED]
    if None in values or type(failed) is not int or failed not in (0, 1):
        values = tuple(default if value is None else value for value, default in zip(values, _DIM_DEFAULTS.values()))
        values = values[:_FAILED] + (1 if values[_FAILED] else 0,) + values[_FAILED + 1:]
    return values


def _sample_bucket(value: Any) -> int | None:
    """The sketch bucket of one latency/TTFT value (as Sketch.add); None when it is not a sample."""
    if value is None or value <= 0:
        return None
    return sketch.bucket_index(value)


_ONE_SAMPLE: dict[int | None, bytes | None] = {None: None}  # single-sample blobs by bucket (a few hundred)


def _one_sample_blob(bucket: int | None) -> bytes | None:
    blob = _ONE_SAMPLE.get(bucket, b"")
    if blob == b"":
        blob = sketch.encode({bucket: 1})  # type: ignore[dict-key]
        if len(_ONE_SAMPLE) < 4096:
            _ONE_SAMPLE[bucket] = blob
    return blob


# json.dumps(..., ensure_ascii=False) escapes only these; a set without them encodes as a join.
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')


def encode_set(values: Iterable[str]) -> str:
    """A set of texts as stored in a `sets` column: a JSON array, sorted (code points), no duplicates,
    no spaces. One encoding per set, so merging in any order, or rebuilding, gives the same bytes."""
    ordered = sorted(set(values))
    if not ordered:
        return "[]"
    if _NEEDS_ESCAPE.search("".join(ordered)) is None:  # the text json.dumps gives, without its encoder
        return '["' + '","'.join(ordered) + '"]'
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def _decode_set(encoded: str) -> list[str]:
    """Inverse of encode_set. Without a backslash no value holds '"' (it would be escaped), so the
    values of '["a","b"]' are the text between '["' and '"]' split at '","', when every '"' in it is
    one of those delimiters; anything else (an escape, a corrupt value) goes through json.loads,
    which raises on what is not JSON, so the batch rolls back."""
    if encoded == "[]":
        return []
    if "\\" not in encoded and encoded.startswith('["') and encoded.endswith('"]'):
        values = encoded[2:-2].split('","')
        if encoded.count('"') == 2 * len(values):
            return values
    return json.loads(encoded)


def merge_sets(a: str | None, b: str | None) -> str | None:
    """The union of two encoded sets (the SQL function SET_MERGE_FUNCTION); idempotent, order-free."""
    if a is None or a == b:
        return b if a is None else a
    if b is None or b == "[]":
        return a
    if _holds(a, b):
        return a  # a already holds b's one value: a is the canonical encoding of the union
    left = _decode_set(a)
    merged = set(left)
    merged.update(_decode_set(b))
    if len(merged) == len(left):
        return a
    return encode_set(merged)


def _holds(a: str, b: str) -> bool:
    """Whether encoded set `a` holds the single value of encoded set `b`, by text.

    In encoded JSON a '"' inside a value is escaped (a backslash precedes it), so '[' or ','
    followed by '"' only starts a value, and a value's text ends at '",' or '"]'.
    """
    if b.find('","') >= 0:  # more than one value (or a value holding '","' escaped: decode)
        return False
    inner = b[1:-1]
    return a == b or f"[{inner}," in a or f",{inner}," in a or f",{inner}]" in a


_ONE_VALUE_SETS: dict[str, str] = {}  # encoded one-element sets by value (models, accounts: a few hundred)


def _one_value_set(value: str | None) -> str:
    if value is None:
        return "[]"
    found = _ONE_VALUE_SETS.get(value)
    if found is None:
        found = encode_set((value,))
        if len(_ONE_VALUE_SETS) < 4096:
            _ONE_VALUE_SETS[value] = found
    return found


def _key_getter(dims: tuple[str, ...]) -> Any:
    """The key of `dims` from an event's _dims tuple, as a tuple."""
    get = itemgetter(*(_DIM_POSITION[d] for d in dims))
    return get if len(dims) > 1 else (lambda d: (get(d),))


def _parent(spec: RollupSpec, specs: Sequence[RollupSpec]) -> RollupSpec | None:
    """The spec whose groups `spec`'s groups can be summed from: a grain dividing its own, a
    superset of its dimensions, strictly finer (so no cycles). Of those the narrowest key, then
    the coarsest grain: fewest groups to read (an account dimension multiplies them by ~100)."""
    wanted = set(spec.dims)
    best = None
    for other in specs:
        if (other is spec or spec.grain_ms % other.grain_ms or not wanted <= set(other.dims)
                or (other.grain_ms, -len(other.dims)) >= (spec.grain_ms, -len(spec.dims))):
            continue
        if best is None or (len(other.dims), -other.grain_ms) < (len(best.dims), -best.grain_ms):
            best = other
    return best


def _derivation(specs: Sequence[RollupSpec]) -> list[tuple[RollupSpec, RollupSpec | None, Any]]:
    """(spec, parent or None, key getter) in an order where every parent comes first. A root's
    getter picks its dims from an event's dims; a child's picks them from its parent's key."""
    order: list[tuple[RollupSpec, RollupSpec | None, Any]] = []
    done: set[str] = set()
    pending = list(specs)
    while pending:
        for spec in pending:
            parent = _parent(spec, specs)
            if parent is None:
                order.append((spec, None, _key_getter(spec.dims)))
            elif parent.table in done:
                order.append((spec, parent, itemgetter(*(1 + parent.dims.index(d) for d in spec.dims))))
            else:
                continue
            done.add(spec.table)
            pending.remove(spec)
            break
    return order


_DERIVATIONS: dict[tuple[RollupSpec, ...], list[tuple[RollupSpec, RollupSpec | None, Any]]] = {}

# A group's aggregate: measure sums, first, last and last failure time, member rows (indexes
# into the batch), latency and TTFT sketch bins (sketch specs only) and the set columns' sets of
# values (sets specs only; encoded per parameter tuple).
_SUMS, _FIRST, _LAST, _LAST_FAIL, _MEMBERS, _LAT, _TTFT, _SETS = range(8)


def _count_bins(indexes: Iterable[int | None]) -> dict[int, int]:
    bins: dict[int, int] = {}
    for i in indexes:
        if i is not None:
            bins[i] = bins.get(i, 0) + 1
    return bins


def _merge_bins(parts: Iterable[dict[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for part in parts:
        for i, c in part.items():
            out[i] = out.get(i, 0) + c
    return out


def upsert_params(rows: Sequence[Mapping[str, Any]],
                  specs: Sequence[RollupSpec] = SPECS) -> dict[str, list[tuple[Any, ...]]]:
    """Per rollup table, one upsert parameter tuple per key: (bucket, dims, measures, times, sketches).

    Only the specs no other spec refines (roots: finest grain, widest key) are grouped from the
    rows, one C-level itemgetter key per row; every other spec is summed from its parent's
    groups (hour from 5 minutes, day from hour, accounts from accounts x models, ...), which are
    far fewer than the rows. Sketch bins and sets are merged from the parent's when it has them,
    else counted from the group's member rows. The result is the same as grouping each spec
    from the rows (tests/test_rollup.py checks it).
    """
    key = tuple(specs)
    derivation = _DERIVATIONS.get(key)
    if derivation is None:
        derivation = _DERIVATIONS[key] = _derivation(specs)
    measures = [_measures(row) for row in rows]
    stamps = [row["ts_ms"] for row in rows]
    dims = [_dims(row) for row in rows]
    buckets: list[tuple[int | None, int | None]] | None = None
    if any(spec.sketches for spec in specs):
        buckets = [(_sample_bucket(row.get("latency_ms")), _sample_bucket(row.get("ttft_ms"))) for row in rows]
    set_values: list[tuple[str | None, ...]] | None = None
    if any(spec.sets for spec in specs):
        set_positions = [(_DIM_POSITION[col], skip) for col, skip in SET_COLUMNS.values()]
        set_values = [tuple(None if d[i] == skip else d[i] for i, skip in set_positions) for d in dims]
    groups_of: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
    out: dict[str, list[tuple[Any, ...]]] = {}
    # A group with one part shares its parent's bins (a day of one hour, an hour of one 5-minute
    # bucket): each bins object is encoded once. The blobs are handed to the merge function too.
    blobs: dict[int, tuple[Mapping[int, int], bytes]] = {}
    sketch.new_batch()

    def encoded(bins: Mapping[int, int]) -> bytes:
        seen = blobs.get(id(bins))
        if seen is not None and seen[0] is bins:
            return seen[1]
        blob = sketch.encode_batch(bins)
        blobs[id(bins)] = (bins, blob)
        return blob

    for spec, parent, getter in derivation:
        grain = spec.grain_ms
        groups: dict[tuple[Any, ...], list[Any]] = {}
        if parent is None:
            members_of: dict[tuple[Any, ...], list[int]] = {}
            for n, d in enumerate(dims):
                ts = stamps[n]
                k = (ts - ts % grain,) + getter(d)
                found = members_of.get(k)
                if found is None:
                    members_of[k] = [n]
                else:
                    found.append(n)
            for k, members in members_of.items():
                if len(members) == 1:
                    n = members[0]
                    ts = stamps[n]
                    groups[k] = [measures[n], ts, ts, ts if measures[n][2] else None, members, None, None, None]
                else:
                    times = [stamps[n] for n in members]
                    failed = [stamps[n] for n in members if measures[n][2]]
                    groups[k] = [tuple(map(sum, zip(*(measures[n] for n in members)))), min(times), max(times),
                                 max(failed) if failed else None, members, None, None, None]
        else:
            parts_of: dict[tuple[Any, ...], list[list[Any]]] = {}
            for pk, pg in groups_of[parent.table].items():
                b = pk[0]
                k = (b - b % grain,) + getter(pk)
                found = parts_of.get(k)
                if found is None:
                    parts_of[k] = [pg]
                else:
                    found.append(pg)
            for k, parts in parts_of.items():
                if len(parts) == 1:
                    groups[k] = list(parts[0])
                    continue
                fails = [p[_LAST_FAIL] for p in parts if p[_LAST_FAIL] is not None]
                members = [n for p in parts for n in p[_MEMBERS]]
                merged = [tuple(map(sum, zip(*(p[_SUMS] for p in parts)))), min(p[_FIRST] for p in parts),
                          max(p[_LAST] for p in parts), max(fails) if fails else None, members, None, None, None]
                if parts[0][_LAT] is not None:
                    merged[_LAT] = _merge_bins(p[_LAT] for p in parts)
                    merged[_TTFT] = _merge_bins(p[_TTFT] for p in parts)
                if parts[0][_SETS] is not None:
                    merged[_SETS] = tuple(set().union(*(p[_SETS][i] for p in parts))
                                          for i in range(len(SET_COLUMNS)))
                groups[k] = merged
        groups_of[spec.table] = groups
        params = []
        for k, g in groups.items():
            param = k + g[_SUMS] + (g[_FIRST], g[_LAST], g[_LAST_FAIL])
            if spec.sketches and buckets is not None:
                members = g[_MEMBERS]
                if len(members) == 1:
                    lat, ttft = buckets[members[0]]
                    param += (_one_sample_blob(lat), _one_sample_blob(ttft))
                    g[_LAT] = {} if lat is None else {lat: 1}
                    g[_TTFT] = {} if ttft is None else {ttft: 1}
                else:
                    if g[_LAT] is None:
                        g[_LAT] = _count_bins(buckets[n][0] for n in members)
                        g[_TTFT] = _count_bins(buckets[n][1] for n in members)
                    param += (encoded(g[_LAT]) if g[_LAT] else None, encoded(g[_TTFT]) if g[_TTFT] else None)
            if spec.sets and set_values is not None:
                if g[_SETS] is None:
                    g[_SETS] = tuple({v for n in g[_MEMBERS] if (v := set_values[n][i]) is not None}
                                     for i in range(len(SET_COLUMNS)))
                sets = g[_SETS]
                param += tuple(_one_value_set(next(iter(v))) if len(v) == 1 else encode_set(v) for v in sets)
            params.append(param)
        out[spec.table] = params
    return out


# --- maintenance -------------------------------------------------------------------

_registered: "weakref.WeakKeyDictionary[apsw.Connection, bool]" = weakref.WeakKeyDictionary()


def register_functions(conn: apsw.Connection) -> None:
    """Make the sketch and set merge functions available to SQL on this connection (once)."""
    if conn not in _registered:
        conn.create_scalar_function(MERGE_FUNCTION, sketch.merge_bytes, 2, deterministic=True)
        conn.create_scalar_function(SET_MERGE_FUNCTION, merge_sets, 2, deterministic=True)
        _registered[conn] = True


def apply(conn: apsw.Connection, rows: Sequence[Mapping[str, Any]], specs: Sequence[RollupSpec] = SPECS, *,
          aliases: bool = True) -> int:
    """Add newly inserted event rows to every rollup; call inside the insert transaction.

    Returns the number of rollup rows written (inserted or updated).
    """
    if not rows:
        return 0
    register_functions(conn)
    written = 0
    for table, params in upsert_params(rows, specs).items():
        head, tail = _UPSERT[table]
        bulk.execute(conn, head, params, tail)
        written += len(params)
    if aliases:
        apply_aliases(conn, rows)
    return written


def backfill(conn: apsw.Connection, tables: Sequence[str], *, chunk_ms: int = DAY_MS) -> int:
    """Fill new, empty rollup tables from the events present (a schema step's backfill).

    Runs in the caller's transaction; the days retention has pruned stay empty in these
    tables (raw rows can no longer give them). Returns the number of events read.
    """
    specs = [SPEC_BY_TABLE[t] for t in tables]
    lo, hi = conn.execute(SELECT_EVENT_SPAN).fetchone()
    if lo is None:
        return 0
    total = 0
    for start in range(_align_down(lo, chunk_ms), hi + 1, chunk_ms):
        total += _apply_range(conn, start, start + chunk_ms, specs, aliases=False)
    return total


# Events held in memory at once by backfill/rebuild: a day of a 10 M / 30-day dataset is
# ~333 k rows (1.55 GB peak RSS when a step-8 upgrade held a whole day as dicts).
STREAM_ROWS = 20_000


def _apply_range(conn: apsw.Connection, from_ms: int, to_ms: int, specs: Sequence[RollupSpec] = SPECS, *,
                 aliases: bool = True) -> int:
    """apply() over the events of [from_ms, to_ms) in slices of STREAM_ROWS; the same rollup rows
    as one apply() of them all (upserts add and merge), in bounded memory. Returns the events read."""
    cursor = conn.execute(SELECT_EVENTS, (from_ms, to_ms))
    total = 0
    while True:
        rows = [dict(zip(SOURCE_COLUMNS, values)) for values in islice(cursor, STREAM_ROWS)]
        if not rows:
            return total
        apply(conn, rows, specs, aliases=aliases)
        total += len(rows)


# Per alias dim, its columns' values of a row, in C (ALIASES' None column reads as None).
_ALIAS_GETTERS = {dim: itemgetter(*(c for c in cols if c)) for dim, cols in ALIASES.items()}


def alias_params(rows: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, str, str]]:
    """The distinct rollup_aliases tuples of some event rows (values as the events table stores them)."""
    out: set[tuple[str, str, str, str]] = set()
    for dim, (key, a1, a2) in ALIASES.items():
        try:  # a batch repeats a few dozen values per dim: find them in C, convert each once
            distinct: Iterable[tuple[Any, ...]] = set(map(_ALIAS_GETTERS[dim], rows))
        except (KeyError, TypeError):  # a row without every column, or an unhashable value
            distinct = [(row.get(key), row.get(a1)) + ((row.get(a2),) if a2 else ()) for row in rows]
        for k, v1, *rest in distinct:
            v2 = rest[0] if rest else None
            out.add((dim, _DIM_DEFAULTS[key] if k is None else str(k),
                     _ALIAS_DEFAULTS.get(a1, "") if v1 is None else str(v1),
                     _ALIAS_DEFAULTS.get(a2 or "", "") if v2 is None else str(v2)))
    return out


def apply_aliases(conn: apsw.Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    """Record the alias tuples of newly inserted rows (inside the insert transaction)."""
    params = alias_params(rows)
    if params:
        bulk.execute(conn, INSERT_ALIAS, sorted(params))
    return len(params)


def _align_down(ms: int, grain: int) -> int:
    return ms - ms % grain


def _align_up(ms: int, grain: int) -> int:
    return -(-ms // grain) * grain


def rebuild(conn: apsw.Connection, from_ms: int | None = None, to_ms: int | None = None,
            *, chunk_ms: int = DAY_MS) -> int:
    """Recompute rollups from raw events over whole buckets covering [from_ms, to_ms).

    Buckets that raw retention has pruned (wholly or in part) are kept as they
    are, since raw rows can no longer reproduce them: the range starts after the
    last pruned event (known from the dedup ledger, which outlives events).
    Returns the number of events re-aggregated.
    """
    if chunk_ms <= 0 or chunk_ms % MAX_GRAIN_MS:
        raise ValueError(f"chunk_ms must be a positive multiple of {MAX_GRAIN_MS}")
    register_functions(conn)
    with txn.write(conn):
        lo_raw, hi_raw = conn.execute(SELECT_EVENT_SPAN).fetchone()
        if lo_raw is None:
            return 0
        pruned = conn.execute(SELECT_PRUNED_BEFORE, (lo_raw,)).fetchone()[0]
    lo = _align_down(lo_raw if from_ms is None else from_ms, MAX_GRAIN_MS)
    hi = _align_up(hi_raw + 1 if to_ms is None else to_ms, MAX_GRAIN_MS)
    if pruned is not None:
        lo = max(lo, _align_up(pruned + 1, MAX_GRAIN_MS))
    total = 0
    for start in range(lo, hi, chunk_ms):
        end = min(start + chunk_ms, hi)
        with txn.write(conn):
            for spec in SPECS:
                conn.execute(_DELETE_RANGE[spec.table], (start, end))
            total += _apply_range(conn, start, end)
    logger.info("rebuilt rollups over [%d, %d): %d events", lo, hi, total)
    return total
