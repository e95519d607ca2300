"""Read side entry point: every target, variable and tag lookup, each under a query limit.

`execute()` answers one parsed Grafana target with data frames. Every statement runs
under a time and row limit (`_limited`); a limit hit or `apsw.BusyError` becomes
`model.Unavailable` (a 503), a bad payload value `model.BadRequest` (a 400).
The computations live in query_*.py modules; this module owns apsw.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from typing import Any, Callable, Iterable, Mapping, TypeVar

import apsw

from datasource import filters, query_catalog
from datasource.flights import Flights
from datasource.model import BadRequest, Clause, Frame, TargetSpec, Unavailable
from datasource.query_actions import account_actions
from datasource.query_annotations import annotations, collector
from datasource.query_breakdown import breakdown, usage
from datasource.query_common import Ctx
from datasource.query_requests import requests
from datasource.query_series import timeseries
from datasource.query_summary import summary
from datasource.query_tables import accounts, api_keys

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
ROW_LIMIT = 5_000_000

TARGETS: dict[str, Callable[[Ctx], list[Frame]]] = {
    "summary": summary,
    "timeseries": timeseries,
    "accounts": accounts,
    "api_keys": api_keys,
    "requests": requests,
    "breakdown": breakdown,
    "account_actions": account_actions,
    "usage": usage,
    "collector": collector,
    "annotations": annotations,
}

_registered: "weakref.WeakSet[apsw.Connection]" = weakref.WeakSet()
T = TypeVar("T")


class QueryTimeout(Exception):
    """A query ran longer than its time limit."""


class QueryTooLarge(Exception):
    """A query produced more rows than ROW_LIMIT."""


def prepare(conn: apsw.Connection) -> None:
    """Register the bounded REGEXP function on a connection, once."""
    if conn not in _registered:
        conn.create_scalar_function("regexp", filters.regexp, 2, deterministic=True)
        _registered.add(conn)


# VM instructions between two looks at the clock. apsw.ext.query_limit looked every 100 and
# counted rows with a trace_v2 callback: each look and each row took the GIL from inside
# sqlite3_step, so a statement running while another thread ran Python waited for the GIL
# again and again (a 24 h Monitoring refresh: ~60 k progress calls and ~30 k trace events).
# At 20 000 a look comes every few hundred microseconds of SQLite work, far finer than any
# timeout, and rows are counted as they reach Python, where the GIL is held anyway.
PROGRESS_STEPS = 20_000


class _Limit:
    """The time and row limits of one `_limited` block: a progress handler and a row tracer."""

    __slots__ = ("deadline", "rows_left", "previous")

    def __init__(self, timeout_s: float, row_limit: int, previous: Any = None) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.rows_left = row_limit
        self.previous = previous  # a row tracer already set on the connection keeps working

    def progress(self) -> bool:
        if time.monotonic() >= self.deadline:
            raise QueryTimeout("query time limit hit")
        return False

    def row(self, _cursor: apsw.Cursor, row: T) -> T:
        self.rows_left -= 1
        if self.rows_left < 0:
            raise QueryTooLarge("query row limit hit")
        return row if self.previous is None else self.previous(_cursor, row)


def _limited(conn: apsw.Connection, timeout_s: float, work: Callable[[], T]) -> T:
    prepare(conn)
    previous = conn.row_trace
    limit = _Limit(timeout_s, ROW_LIMIT, previous)
    conn.set_progress_handler(limit.progress, PROGRESS_STEPS, id=_Limit)
    conn.row_trace = limit.row
    try:
        return work()
    except QueryTimeout:
        raise Unavailable(f"query took longer than {timeout_s:g} s; narrow the time range or filters") from None
    except QueryTooLarge:
        raise Unavailable(f"query read more than {ROW_LIMIT} rows; narrow the time range or filters") from None
    except apsw.BusyError:
        raise Unavailable("the database is busy; try again") from None
    except apsw.SQLError as exc:
        if "regex" in str(exc).lower():
            raise BadRequest(f"regex filter failed: {exc}") from None
        raise
    finally:
        conn.set_progress_handler(None, id=_Limit)
        conn.row_trace = previous


# Targets whose answer depends only on the spec's window, filters and payload (not on now):
# identical requests in flight at the same time share one computation (a dashboard's stat
# panels all send the same `summary` target at once).
SHAREABLE = frozenset({"summary", "timeseries", "accounts", "api_keys", "breakdown", "usage"})


_FLIGHTS = Flights()


def _flight_key(conn: apsw.Connection, spec: TargetSpec, aliases: Mapping[str, str], mask_emails: bool,
                rollups: bool) -> tuple | None:
    if spec.target not in SHAREABLE or not conn.filename:
        return None
    try:
        payload = json.dumps(spec.payload, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return (conn.filename, spec.target, payload, spec.from_ms, spec.to_ms, spec.interval_ms,
            spec.max_data_points, spec.clauses, tuple(sorted(aliases.items())), mask_emails, rollups)


def execute(conn: apsw.Connection, spec: TargetSpec, *, aliases: Mapping[str, str] = {},
            mask_emails: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
            rollups: bool = True) -> list[Frame]:
    """Frames answering one target; BadRequest for a bad target/payload, Unavailable when busy.

    `rollups=False` reads raw events only (the reference the rollup path is tested against).
    A request identical to one being computed right now waits for that answer instead of
    computing it again (nothing is kept once it is answered).
    """
    key = _flight_key(conn, spec, aliases, mask_emails, rollups)
    if key is None:
        return _execute(conn, spec, aliases, mask_emails, timeout_s, rollups)
    return list(_FLIGHTS.run(key, lambda: _execute(conn, spec, aliases, mask_emails, timeout_s, rollups),
                             timeout_s + 1.0) or [])


def _execute(conn: apsw.Connection, spec: TargetSpec, aliases: Mapping[str, str], mask_emails: bool,
             timeout_s: float, rollups: bool) -> list[Frame]:
    handler = TARGETS.get(spec.target)
    if handler is None:
        raise BadRequest(f"unknown target {spec.target!r}; known: {', '.join(TARGETS)}")
    if spec.to_ms <= spec.from_ms:
        raise BadRequest("range: `to` must be after `from`")
    ctx = Ctx(conn, spec, aliases, mask_emails, rollups)
    return _limited(conn, timeout_s, lambda: handler(ctx))


def metrics() -> list[dict[str, Any]]:
    return query_catalog.metrics()


def payload_options(metric: str, name: str, payload: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    return query_catalog.payload_options(metric, name, payload)


def variable_values(conn: apsw.Connection, name: str, from_ms: int, to_ms: int, clauses: Iterable[Clause], *,
                    aliases: Mapping[str, str] | None = None, mask_emails: bool = False,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> list[tuple[str, str]]:
    return _limited(conn, timeout_s, lambda: query_catalog.variable_values(
        conn, name, from_ms, to_ms, tuple(clauses), aliases=aliases, mask_emails=mask_emails))


def tag_keys() -> list[str]:
    return query_catalog.tag_keys()


def tag_values(conn: apsw.Connection, key: str, from_ms: int, to_ms: int, clauses: Iterable[Clause], *,
               mask_emails: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    return _limited(conn, timeout_s, lambda: query_catalog.tag_values(
        conn, key, from_ms, to_ms, tuple(clauses), mask_emails=mask_emails))
