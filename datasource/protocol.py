"""Pure Grafana JSON-datasource wire format (simpod-json-datasource and legacy SimpleJSON).

`parse_*` functions turn decoded request bodies into typed requests and raise
`ProtocolError` (a 400) on bad input; `*_response` functions turn query results
into JSON-ready lists and dicts. No Flask, no I/O: web.py does the HTTP.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from datasource import filters
from datasource.model import Clause, Frame, TargetSpec

MAX_DEPTH = 64
DEFAULT_MAX_DATA_POINTS = 1000
MIN_INTERVAL_MS = 1000
DEFAULT_QUERY_WINDOW_MS = 6 * 3600 * 1000
DEFAULT_LOOKUP_WINDOW_MS = 7 * 24 * 3600 * 1000
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z; SQLite integers must not overflow
MAX_COUNT = 2**53  # intervalMs and maxDataPoints (exact in a float)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


class ProtocolError(ValueError):
    """The request body does not follow the protocol: a 400 with `code`."""

    def __init__(self, message: str, code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class QueryTarget:
    ref_id: str
    spec: TargetSpec


@dataclass(frozen=True, slots=True)
class LookupRequest:
    """A /variable or /tag-values request: one dimension within a window and filter."""

    name: str
    from_ms: int
    to_ms: int
    clauses: tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class PayloadOptionsRequest:
    metric: str
    name: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AnnotationRequest:
    annotation: dict[str, Any]
    spec: TargetSpec


# --- JSON ----------------------------------------------------------------------


def json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON text (brackets inside strings ignored)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def decode_json(raw: bytes | str, what: str = "request body") -> Any:
    """Decode JSON text; empty means `{}`; too deep or invalid raises ProtocolError."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8", "INVALID_JSON") from None
    if not text.strip(" \t\n\r"):  # JSON's whitespace only: a lone form feed is not an empty body
        return {}
    if json_depth(text) > MAX_DEPTH:
        raise ProtocolError(f"{what} is nested deeper than {MAX_DEPTH} levels", "TOO_DEEP")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {_short(exc)}", "INVALID_JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _short(exc: BaseException) -> str:
    return str(exc).split("\n")[0][:120]


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _request(body: Any) -> dict[str, Any]:
    """The top-level body: an object (an empty body was already read as `{}`); JSON null is refused."""
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    return body


def _payload(value: Any, what: str) -> dict[str, Any]:
    """A payload given as an object, a JSON string (code mode) or nothing."""
    if isinstance(value, str):
        value = decode_json(value, what)
    return _object(value, what)


def _string(value: Any, what: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ProtocolError(f"{what} must be a non-empty string")
    return value.strip()


# --- time ----------------------------------------------------------------------


def parse_time(value: Any, what: str) -> int:
    """Epoch ms from an ISO-8601 string, epoch-ms number or numeric string."""
    if isinstance(value, bool) or value is None:
        raise ProtocolError(f"{what} must be an ISO time or epoch milliseconds", "BAD_RANGE")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{what} must be finite", "BAD_RANGE")
        if not -MAX_TIME_MS <= value <= MAX_TIME_MS:  # compared before int(): a huge int stays exact
            raise ProtocolError(f"{what} is out of range (epoch ms of the years 1 to 9999)", "BAD_RANGE")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            if len(text) > 24:
                raise ProtocolError(f"{what} is out of range (epoch ms of the years 1 to 9999)", "BAD_RANGE")
            return parse_time(float(text) if "." in text else int(text), what)
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ProtocolError(f"{what} is not an ISO-8601 time: {text[:40]!r}", "BAD_RANGE") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return int(moment.timestamp() * 1000)
    raise ProtocolError(f"{what} must be an ISO time or epoch milliseconds", "BAD_RANGE")


def parse_range(value: Any, now_ms: int, default_ms: int) -> tuple[int, int]:
    """(from_ms, to_ms) of a `range`; missing means the last `default_ms`."""
    if value is None:
        return now_ms - default_ms, now_ms
    rng = _object(value, "range")
    from_ms = parse_time(rng.get("from"), "range.from")
    to_ms = parse_time(rng.get("to"), "range.to")
    if from_ms >= to_ms:
        raise ProtocolError("range.from must be before range.to", "BAD_RANGE")
    return from_ms, to_ms


def _now(now_ms: int | None) -> int:
    return int(time.time() * 1000) if now_ms is None else now_ms


def _positive_int(value: Any, what: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ProtocolError(f"{what} must be a positive number")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise ProtocolError(f"{what} must be a positive number up to {MAX_COUNT}") from None
    if not math.isfinite(number) or number < 1 or number > MAX_COUNT:
        raise ProtocolError(f"{what} must be a positive number up to {MAX_COUNT}")
    return int(number)


# --- requests ------------------------------------------------------------------


def adhoc_filters(body: Mapping[str, Any]) -> tuple[Clause, ...]:
    """Ad hoc filters from `filters` (Grafana >= 10.2) or `adhocFilters` (older); both are
    checked, the first non-empty one applies."""
    found: list[tuple[Clause, ...]] = []
    for name in ("filters", "adhocFilters"):
        items = body.get(name)
        if items is not None and not isinstance(items, list):
            raise ProtocolError(f"{name} must be a list of {{key, operator, value}}")
        found.append(tuple(filters.clauses_from_adhoc(items or [])))
    return found[0] or found[1]


def parse_query(body: Any, *, now_ms: int | None = None) -> list[QueryTarget]:
    """The targets of a /query body, hidden and metric-less ones skipped."""
    obj = _request(body)
    now = _now(now_ms)
    from_ms, to_ms = parse_range(obj.get("range"), now, DEFAULT_QUERY_WINDOW_MS)
    max_points = _positive_int(obj.get("maxDataPoints"), "maxDataPoints", DEFAULT_MAX_DATA_POINTS)
    default_interval = max(MIN_INTERVAL_MS, -(-(to_ms - from_ms) // max_points))
    interval = _positive_int(obj.get("intervalMs"), "intervalMs", default_interval)
    adhoc = adhoc_filters(obj)
    targets = obj.get("targets", [])
    if not isinstance(targets, list):
        raise ProtocolError("targets must be a list")
    out: list[QueryTarget] = []
    for index, item in enumerate(targets):
        if not isinstance(item, dict):
            raise ProtocolError(f"targets[{index}] must be a JSON object")
        target = item
        for key in ("payload", "data"):  # type-checked even on skipped targets; decoded on visible ones
            if not isinstance(target.get(key), (dict, str, type(None))):
                raise ProtocolError(f"targets[{index}].{key} must be a JSON object or its JSON text")
        name = target.get("target")
        if target.get("hide") is True or name is None or name == "":
            continue
        name = _string(name, f"targets[{index}].target")
        raw = target["payload"] if target.get("payload") is not None else target.get("data")
        payload = _payload(raw, f"targets[{index}].payload")
        clauses = tuple(filters.clauses_from_payload(payload)) + adhoc
        spec = TargetSpec(name, payload, from_ms, to_ms, interval, max_points, clauses, now)
        ref_id = target.get("refId")
        out.append(QueryTarget(ref_id if isinstance(ref_id, str) and ref_id else "A", spec))
    return out


def parse_variable(body: Any, *, now_ms: int | None = None) -> LookupRequest:
    """A /variable body: `payload.target` names the dimension; other payload keys filter."""
    obj = _request(body)
    payload = dict(_payload(obj.get("payload"), "payload"))
    name = _string(payload.pop("target", None), "payload.target")
    from_ms, to_ms = parse_range(obj.get("range"), _now(now_ms), DEFAULT_LOOKUP_WINDOW_MS)
    return LookupRequest(name, from_ms, to_ms, tuple(filters.clauses_from_payload(payload)))


def parse_tag_values(body: Any, *, now_ms: int | None = None) -> LookupRequest:
    """A /tag-values body: `key`, the other ad hoc filters and `timeRange` (or `range`)."""
    obj = _request(body)
    name = _string(obj.get("key"), "key")
    window = obj.get("timeRange") if obj.get("timeRange") is not None else obj.get("range")
    from_ms, to_ms = parse_range(window, _now(now_ms), DEFAULT_LOOKUP_WINDOW_MS)
    return LookupRequest(name, from_ms, to_ms, adhoc_filters(obj))


def parse_object(body: Any) -> dict[str, Any]:
    """Bodies whose content does not change the answer (/metrics, /search, /tag-keys)."""
    return _request(body)


def parse_payload_options(body: Any) -> PayloadOptionsRequest:
    obj = _request(body)
    return PayloadOptionsRequest(
        _string(obj.get("metric"), "metric"),
        _string(obj.get("name"), "name"),
        _payload(obj.get("payload"), "payload"),
    )


def parse_annotations(body: Any, *, now_ms: int | None = None) -> AnnotationRequest:
    """A SimpleJSON /annotations body; `annotation.query` is a kind or a JSON payload."""
    obj = _request(body)
    annotation = _object(obj.get("annotation"), "annotation")
    query = annotation.get("query")
    query = query.strip() if isinstance(query, str) else ""
    if query.startswith("{"):
        payload = _payload(query, "annotation.query")
    else:
        payload = {"kind": query} if query else {}
    now = _now(now_ms)
    from_ms, to_ms = parse_range(obj.get("range"), now, DEFAULT_QUERY_WINDOW_MS)
    interval = max(MIN_INTERVAL_MS, (to_ms - from_ms) // DEFAULT_MAX_DATA_POINTS)
    clauses = tuple(filters.clauses_from_payload(payload))
    spec = TargetSpec("annotations", payload, from_ms, to_ms, interval, DEFAULT_MAX_DATA_POINTS, clauses, now)
    return AnnotationRequest(annotation, spec)


# --- responses -----------------------------------------------------------------


def _clean(values: Iterable[Any]) -> list[Any]:
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def frames_response(ref_id: str, frames: Iterable[Frame]) -> list[dict[str, Any]]:
    """Data frames for one target, each tagged with the target's refId."""
    out = []
    for frame in frames:
        fields = [
            {"name": f.name, "type": f.type, "values": _clean(f.values),
             "config": dict(f.config or {}), "labels": dict(f.labels or {})}
            for f in frame.fields
        ]
        item: dict[str, Any] = {"refId": ref_id, "name": frame.name, "fields": fields}
        if frame.meta:
            item["meta"] = dict(frame.meta)
        out.append(item)
    return out


def frame_rows(frames: Iterable[Frame]) -> list[dict[str, Any]]:
    """Frames turned into row objects (column name -> value)."""
    rows: list[dict[str, Any]] = []
    for frame in frames:
        columns = [(f.name, _clean(f.values)) for f in frame.fields]
        length = min((len(values) for _, values in columns), default=0)
        rows.extend({name: values[i] for name, values in columns} for i in range(length))
    return rows


def variable_response(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"__text": text, "__value": value} for text, value in pairs]


def tag_keys_response(keys: Iterable[str]) -> list[dict[str, str]]:
    return [{"type": "number" if k.endswith("_ms") else "string", "text": k} for k in keys]


def tag_values_response(values: Iterable[str]) -> list[dict[str, str]]:
    return [{"text": v} for v in values]


def metrics_response(metrics: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(m) for m in metrics]


def search_response(metrics: Iterable[Mapping[str, Any]]) -> list[str]:
    """SimpleJSON /search: the target names only."""
    return [str(m["value"]) for m in metrics]


def options_response(options: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(o) for o in options]


def annotations_response(annotation: Mapping[str, Any], frames: Iterable[Frame]) -> list[dict[str, Any]]:
    """SimpleJSON annotation objects, one per annotation row."""
    out = []
    for row in frame_rows(frames):
        out.append({
            "annotation": dict(annotation), "time": row.get("time"),
            "timeEnd": row.get("timeEnd", row.get("time")), "title": row.get("title") or "",
            "text": row.get("text") or "", "tags": _tags(row.get("tags")),
        })
    return out


def _tags(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(t) for t in value or []]


_HEALTH_FIELDS = ("instance", "state", "transport", "mode", "last_consumed", "last_inserted", "lag_s")


def health_response(version: str, collectors: list[dict[str, Any]]) -> dict[str, Any]:
    """GET /healthz: liveness plus a collector summary without URLs or error texts."""
    summary = [{k: row.get(k) for k in _HEALTH_FIELDS} for row in collectors]
    return {"ok": True, "version": version, "collectors": summary}


def status_response(collectors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ok": True, "collectors": collectors}


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """The one error shape of every route."""
    return {"ok": False, "status": status, "message": message, "error": {"code": code, "message": message}}
