"""Pure filter handling: payload values and ad hoc filters -> Clause -> SQL with bound parameters.

Nothing here touches a database. `where_sql()` builds a fragment from a fixed dict of
column expressions and `?` parameters only; a value can never change the SQL text.
`regexp()` is the scalar function query.py registers as SQLite's REGEXP.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, Callable, Iterable, Mapping

from datasource.interned import ID_PREFIX, INTERNED, STRINGS
from datasource.model import BadRequest, Clause

FILTER_KEYS: tuple[str, ...] = (
    "instance", "provider", "model", "project", "account", "api_key", "status", "failure_type",
    "request_type", "endpoint", "cache", "min_latency_ms", "max_latency_ms", "trace_id", "search",
)
ALL_VALUES = frozenset({"", "all", "$__all", "__all__", "*", ".*", "{}"})
OPERATORS = ("=", "!=", "=~", "!~", "<", ">")
NUMERIC_KEYS = frozenset({"min_latency_ms", "max_latency_ms"})
MAX_VALUES = 500
MAX_VALUE_LEN = 512
MAX_SEARCH_LEN = 200
MAX_REGEX_LEN = 200
# `trace_id` equality is answered from the (ts_ms / TRACE_BUCKET_MS, id) indexes of schema step 11,
# one seek per hour of the window; the expression must stay the one those indexes are built on.
TRACE_BUCKET_MS = 3_600_000
TRACE_BUCKET_SQL = f"ts_ms / {TRACE_BUCKET_MS}"
# a longer window (over ~2 years of hours) scans the window instead of seeking every hour
MAX_TRACE_BUCKETS = 20_000
# Python's re backtracks: k wide quantifiers cost about len(subject)^(k+1) steps per value
# (`.*.*.*=` on 512 characters: 14 s, `.*a.*b`: 50 ms). Labels are at most 512 bytes.
MAX_SUBJECT_LEN = 512
MAX_WIDE_QUANTIFIERS = 2

# Text columns of `events` per filter key; a value matches when any of them equals it.
EVENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "instance": ("instance",),
    "provider": ("provider", "payload_provider"),
    "model": ("analytics_model", "model", "resolved_model"),
    "project": ("project_id",),
    "account": ("account_key", "account", "auth_index"),
    "api_key": ("api_key_hash", "api_key_masked"),
    "status": ("status_class", "CAST(status_code AS TEXT)"),
    "failure_type": ("failure_type",),
    "request_type": ("request_type",),
    "endpoint": ("endpoint",),
    "cache": ("cache_state",),
    "trace_id": ("trace_id", "request_id"),
}
# Sanitized text columns searched by `search` (never event_private, never raw keys).
SEARCH_COLUMNS: tuple[str, ...] = (
    "request_id", "trace_id", "instance", "provider", "model", "resolved_model", "analytics_model",
    "endpoint", "request_type", "account", "account_key", "auth_file", "project_id", "source",
    "api_key_hash", "api_key_masked", "failure_type", "fail_summary", "error_kind", "error_code",
    "reasoning_effort", "service_tier",
)
# Fixed SQL for the `status` and `cache` words.
STATUS_WORDS: dict[str, str] = {
    "success": "failed = 0",
    "failed": "failed = 1",
    "unusual": "status_class = 'unusual'",
}
CACHE_WORDS: dict[str, str] = {
    "hit": "cache_state = 'hit'",
    "miss": "cache_state = 'miss'",
    "read": "cache_read_tokens > 0",
    "creation": "cache_creation_tokens > 0",
}
_CODE = re.compile(r"^[1-5][0-9]{2}$")
_CODE_CLASS = re.compile(r"^([1-5])xx$")
_REGEX_ESCAPED = re.compile(r"\\([\\^$*+?.()|\[\]{}/])")
# A quantified group that itself repeats or alternates: (a+)+, (x*)*, (a|aa)+ backtrack exponentially.
_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?<[=!]")
# an escape, a character class, or a quantifier (group 1): `*`, `+`, `{m,}`, `{m,n}`
_QUANTIFIER_TOKEN = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\]\\])*\]|([*+]|\{\d*,\d*\})")


_REPEAT = re.compile(r"[*+]|\{\d*,?\d*\}")


def nested_quantifier(pattern: str) -> bool:
    """True when a repeated group (`*`, `+`, `{..}`) holds a quantifier or an alternation at
    any depth: `(a+)+`, `((a)+)+`, `(x|xy)*` backtrack exponentially in Python's re."""
    stack = [False]  # per open group: whether it holds a quantifier or an alternation
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a character class: skip to its closing bracket
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            j += pattern[j:j + 1] == "]"
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            stack.append(False)
        elif c == ")" and len(stack) > 1:
            inner = stack.pop()
            repeated = _REPEAT.match(pattern, i + 1) is not None
            if repeated and inner:
                return True
            stack[-1] = stack[-1] or inner or repeated
        elif c == "|" or _REPEAT.match(pattern, i):
            stack[-1] = True
        i += 1
    return False


def wide_quantifiers(pattern: str) -> int:
    """How many quantifiers may repeat more than 16 times (`*`, `+`, `{m,}`, `{m,n}` with n-m > 16)."""
    count = 0
    for match in _QUANTIFIER_TOKEN.finditer(pattern):
        token = match.group(1)
        if not token:
            continue
        if token in ("*", "+"):
            count += 1
            continue
        low, _, high = token[1:-1].partition(",")
        count += not high or int(high) - int(low or 0) > 16
    return count


# --- values ---------------------------------------------------------------------


def unescape(text: str) -> str:
    """Undo Grafana's regex-format escaping (`b\\.c` -> `b.c`)."""
    return _REGEX_ESCAPED.sub(r"\1", text)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def expand_value(raw: Any, key: str) -> tuple[str, ...]:
    """A payload value -> the alternatives it names; () means no filter."""
    if raw is None:
        return ()
    if isinstance(raw, (list, tuple)):
        out: list[str] = []
        for item in raw:
            if isinstance(item, (list, tuple)):
                raise BadRequest(f"filter {key!r}: nested lists are not a filter value")
            expanded = expand_value(item, key)
            if not expanded:
                return ()  # an All member makes the whole list All
            out.extend(expanded)
        return _dedup(out, key)
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise BadRequest(f"filter {key!r}: expected a string, a number or a list of them")
    text = str(raw).strip()
    if text.lower() in ALL_VALUES:
        return ()
    if len(text) > 2 and text[0] == "(" and text[-1] == ")" and text[-2] != "\\" and "|" in text:
        return expand_value([unescape(p) for p in _split_unescaped(text[1:-1], "|")], key)
    if len(text) > 2 and text[0] == "{" and text[-1] == "}":
        return expand_value([p for p in text[1:-1].split(",")], key)
    return _dedup([unescape(text)], key)


def _dedup(values: Iterable[str], key: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for value in values:
        value = value.strip()
        if len(value) > MAX_VALUE_LEN:
            raise BadRequest(f"filter {key!r}: a value is longer than {MAX_VALUE_LEN} characters")
        seen.setdefault(value, None)
    if len(seen) > MAX_VALUES:
        raise BadRequest(f"filter {key!r}: more than {MAX_VALUES} values")
    return tuple(seen)


def _number(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"filter {key!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise BadRequest(f"filter {key!r}: {value!r} is not a finite number")
    return number


def _check_words(key: str, values: tuple[str, ...]) -> None:
    for value in values:
        low = value.lower()
        if key == "status" and not (low in STATUS_WORDS or _CODE.match(low) or _CODE_CLASS.match(low)):
            raise BadRequest(f"filter 'status': {value!r} is not success, failed, unusual, a code or a class like 4xx")
        if key == "cache" and low not in CACHE_WORDS:
            raise BadRequest(f"filter 'cache': {value!r} is not hit, miss, read or creation")


def check_regex(pattern: str) -> str:
    """Refuse regexes that are too long, malformed or prone to catastrophic backtracking."""
    if len(pattern) > MAX_REGEX_LEN:
        raise BadRequest(f"regex longer than {MAX_REGEX_LEN} characters")
    if nested_quantifier(pattern) or _BACKREFERENCE.search(pattern):
        raise BadRequest("regex with nested quantifiers, backreferences or lookbehind is not allowed")
    if wide_quantifiers(pattern) > MAX_WIDE_QUANTIFIERS:
        raise BadRequest(f"regex with more than {MAX_WIDE_QUANTIFIERS} of * + {{m,}} is not allowed "
                         "(their backtracking cost grows with the value's length to that power)")
    try:
        _compile(pattern)
    except re.error as exc:
        raise BadRequest(f"invalid regex {pattern!r}: {exc}") from None
    return pattern


def _clause(key: str, op: str, values: tuple[str, ...]) -> Clause:
    if key not in FILTER_KEYS:
        raise BadRequest(f"unknown filter key {key!r}; known: {', '.join(FILTER_KEYS)}")
    if op not in OPERATORS:
        raise BadRequest(f"unknown filter operator {op!r}; known: {' '.join(OPERATORS)}")
    if op in ("<", ">"):
        if key not in NUMERIC_KEYS | {"status"}:
            raise BadRequest(f"operator {op!r} applies to min_latency_ms, max_latency_ms and status only")
        _number(key, values[0])
        return Clause(key, op, values[:1])
    if op in ("=~", "!~"):
        if key in NUMERIC_KEYS or key == "search":
            raise BadRequest(f"operator {op!r} does not apply to {key!r}")
        return Clause(key, op, (check_regex(values[0]),))
    if key in NUMERIC_KEYS:
        if len(values) != 1:
            raise BadRequest(f"filter {key!r} takes one number")
        _number(key, values[0])
    elif key == "search" and len(values[0]) > MAX_SEARCH_LEN:
        raise BadRequest(f"search text longer than {MAX_SEARCH_LEN} characters")
    _check_words(key, values)
    return Clause(key, op, values)


def clauses_from_payload(payload: Mapping[str, Any]) -> tuple[Clause, ...]:
    """Filter keys of a target payload -> clauses ('=' with alternatives); other keys are ignored."""
    out: list[Clause] = []
    for key in FILTER_KEYS:
        if key not in payload:
            continue
        raw = payload[key]
        values = (str(raw).strip(),) if key == "search" and isinstance(raw, str) else expand_value(raw, key)
        if key == "search" and values in (("",), ("*",)):
            continue
        if values:
            out.append(_clause(key, "=", values[:1] if key == "search" else values))
    return tuple(out)


def clauses_from_adhoc(filters: Any) -> tuple[Clause, ...]:
    """Grafana ad hoc filters `[{key, operator, value}]` -> clauses; bad keys/operators -> BadRequest."""
    if filters in (None, ""):
        return ()
    if not isinstance(filters, list):
        raise BadRequest("ad hoc filters must be a list of {key, operator, value}")
    out: list[Clause] = []
    for item in filters:
        if not isinstance(item, Mapping):
            raise BadRequest("an ad hoc filter must be an object {key, operator, value}")
        key, op = str(item.get("key", "")).strip(), str(item.get("operator", "=")).strip()
        multi = op in ("=|", "!=|")
        raw = item.get("values") if multi else item.get("value")
        if multi:
            op = op[:-1]
        values = tuple(str(v) for v in raw) if isinstance(raw, list) else (str("" if raw is None else raw),)
        if not values or len(values) > MAX_VALUES or any(len(v) > MAX_VALUE_LEN for v in values):
            raise BadRequest(f"ad hoc filter {key!r}: between 1 and {MAX_VALUES} values of at most {MAX_VALUE_LEN} characters")
        out.append(_clause(key, op, values))
    return tuple(out)


# --- SQL -------------------------------------------------------------------------


def _in_list(columns: tuple[str, ...], values: tuple[str, ...], params: list[Any], interned: bool = False) -> str:
    parts = []
    for column in columns:
        params.append(json.dumps(list(values)))
        if interned and column in INTERNED and "" not in values:  # the labels' ids: index-friendly
            parts.append(f"{ID_PREFIX}{column} IN (SELECT id FROM {STRINGS} WHERE v IN (SELECT value FROM json_each(?)))")
        else:
            parts.append(f"coalesce({column}, '') IN (SELECT value FROM json_each(?))")
    return "(" + " OR ".join(parts) + ")"


def _status_sql(values: tuple[str, ...], params: list[Any], code: str = "status_code") -> str:
    parts = []
    for value in values:
        low = value.lower()
        if low in STATUS_WORDS:
            parts.append(STATUS_WORDS[low])
        elif _CODE_CLASS.match(low):
            params.append(int(low[0]) * 100)
            parts.append(f"({code} >= ? AND {code} < ? + 100)")
            params.append(int(low[0]) * 100)
        else:
            params.append(int(low))
            parts.append(f"{code} = ?")
    return "(" + " OR ".join(parts) + ")"


def _search_sql(text: str, params: list[Any], interned: bool = False) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    parts = []
    for column in SEARCH_COLUMNS:
        params.append(f"%{escaped}%")
        if interned and column in INTERNED:  # LIKE over the few hundred labels, not every row
            parts.append(f"{ID_PREFIX}{column} IN (SELECT id FROM {STRINGS} WHERE v LIKE ? ESCAPE '\\')")
        else:
            parts.append(f"{column} LIKE ? ESCAPE '\\'")
    return "(" + " OR ".join(parts) + ")"


def _trace_sql(values: tuple[str, ...], span: tuple[int, int], params: list[Any]) -> str | None:
    """`trace_id = v` as seeks on the hour-bucketed id indexes, or None when they cannot serve it.

    Same rows as the coalesce form: inside `ts_ms >= from AND ts_ms < to` every row's bucket is
    in the list, and without an empty value `coalesce(c, '') IN vs` is `c IN vs`.
    """
    from_ms, to_ms = span
    if "" in values or from_ms < 0 or to_ms <= from_ms:
        return None
    first, last = from_ms // TRACE_BUCKET_MS, (to_ms - 1) // TRACE_BUCKET_MS
    if last - first >= MAX_TRACE_BUCKETS:
        return None
    buckets, wanted = json.dumps(list(range(first, last + 1))), json.dumps(list(values))
    parts = []
    for column in EVENT_COLUMNS["trace_id"]:
        params.extend((buckets, wanted))
        parts.append(f"({TRACE_BUCKET_SQL} IN (SELECT value FROM json_each(?)) "
                     f"AND {column} IN (SELECT value FROM json_each(?)))")
    return "(" + " OR ".join(parts) + ")"


# (search text, (from_ms, to_ms)) -> the ids of the window's events that match (a JSON array), or None
SearchIds = Callable[[str, tuple[int, int]], "str | None"]


def _positive_sql(clause: Clause, columns: Mapping[str, tuple[str, ...]], params: list[Any],
                  span: tuple[int, int] | None = None, search_ids: SearchIds | None = None,
                  interned: bool = False) -> str:
    key, op = clause.key, clause.op
    if key in NUMERIC_KEYS:
        default_op = ">=" if key == "min_latency_ms" else "<="
        params.append(_number(key, clause.values[0]))
        return f"(latency_ms {default_op if op in ('=', '!=') else op} ?)"
    if key == "search":
        ids = search_ids(clause.values[0], span) if search_ids is not None and span is not None else None
        if ids is not None:  # the same rows within the caller's window, found by one shared scan
            params.append(ids)
            return "(id IN (SELECT value FROM json_each(?)))"
        return _search_sql(clause.values[0], params, interned)
    cols = columns[key]
    if op in ("=~", "!~"):
        parts = []
        for column in cols:
            params.append(clause.values[0])
            if interned and column in INTERNED:  # the pattern runs over the labels, not every row
                params.append(clause.values[0])
                parts.append(f"({ID_PREFIX}{column} IN (SELECT id FROM {STRINGS} WHERE v REGEXP ?) "
                             f"OR ({ID_PREFIX}{column} IS NULL AND '' REGEXP ?))")
            else:
                parts.append(f"coalesce({column}, '') REGEXP ?")
        return "(" + " OR ".join(parts) + ")"
    code = ROLLUP_STATUS_CODE if columns is ROLLUP_COLUMNS else "status_code"
    if key == "status" and op in ("<", ">"):
        params.append(_number(key, clause.values[0]))
        return f"({code} {op} ?)"
    if key == "status" and (columns is EVENT_COLUMNS or columns is ROLLUP_COLUMNS):
        return _status_sql(clause.values, params, code)
    if key == "cache" and (columns is EVENT_COLUMNS or columns is ROLLUP_COLUMNS):
        return "(" + " OR ".join(CACHE_WORDS[v.lower()] for v in clause.values) + ")"
    if key == "trace_id" and columns is EVENT_COLUMNS and span is not None:
        sql = _trace_sql(clause.values, span, params)
        if sql is not None:
            return sql
    return _in_list(cols, clause.values, params, interned)


def where_sql(
    clauses: Iterable[Clause], columns: Mapping[str, tuple[str, ...]] = EVENT_COLUMNS,
    span: tuple[int, int] | None = None, search_ids: SearchIds | None = None, *, interned: bool = False,
) -> tuple[str, list[Any]]:
    """Clauses -> (`a AND b ...`, params). Keys a table lacks (absent from `columns`) are skipped.

    `columns` must be one of this module's fixed dicts; numeric keys and search apply to events only.
    `span` is the caller's `ts_ms >= from AND ts_ms < to` window, when it ANDs one with the
    fragment: trace ids are then looked up through their indexes instead of by scanning it, and
    `search_ids` (when given) may answer a search with the ids of the window's matching events.
    `interned=True` (for a read of the `events` view only, not of rows shaped like it): label
    columns are matched through their ids (`lid_<column>`, datasource/interned.py), so the
    label indexes serve equality and a pattern or search runs over the labels, not every row.
    """
    parts: list[str] = []
    params: list[Any] = []
    for clause in clauses:
        events_only = clause.key in NUMERIC_KEYS or clause.key == "search"
        if (events_only and columns is not EVENT_COLUMNS) or (not events_only and clause.key not in columns):
            continue
        sql = _positive_sql(clause, columns, params, span, search_ids if columns is EVENT_COLUMNS else None,
                            interned and columns is EVENT_COLUMNS)
        parts.append(f"NOT coalesce({sql}, 0)" if clause.op in ("!=", "!~") else sql)
    return (" AND ".join(parts) or "1"), params


# --- REGEXP ------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def regexp(pattern: Any, value: Any) -> int:
    """SQLite `value REGEXP pattern`: search semantics, bounded pattern and subject length."""
    if pattern is None or value is None:
        return 0
    text = str(pattern)
    if len(text) > MAX_REGEX_LEN:
        raise ValueError("regex too long")
    return 1 if _compile(text).search(str(value)[:MAX_SUBJECT_LEN]) else 0


# Rollup tables (datasource/rollup.py) store a NULL status code as 0 and a NULL text as '';
# these expressions give the events' answer back (query_plan.py resolves the other keys).
ROLLUP_STATUS_CODE = "nullif(status_code, 0)"
ROLLUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "instance": ("instance",),
    "status": ("status_class", f"CAST({ROLLUP_STATUS_CODE} AS TEXT)"),
    "failure_type": ("failure_type",),
    "request_type": ("request_type",),
    "cache": ("cache_state",),
}

# Keys the auxiliary tables can answer; any other key is skipped for them (see docs/filters.md).
CREDENTIAL_ERROR_COLUMNS: dict[str, tuple[str, ...]] = {
    "instance": ("instance",),
    "provider": ("provider",),
    "model": ("model",),
    "account": ("account_key", "auth_index"),
}
STATUS_CHANGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "instance": ("instance",),
    "account": ("auth_index", "label"),
}
COLLECTOR_COLUMNS: dict[str, tuple[str, ...]] = {"instance": ("instance",)}
