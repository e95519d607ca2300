"""Pure, tolerant reading of one decoded CPA payload (reference 3.1, 3.3, 3.7).

Alias keys, Go-compatible number and boolean coercion, timestamps rendered
exactly as Go's RFC3339Nano in UTC, model names and the event hash.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Mapping, Sequence

MAX_ABS_INT = 10**15  # larger "counts" are treated as garbage (0); keeps SQLite sums in range
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_NUMERIC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?\s*([Zz]|[+-]\d{2}:?\d{2})?$")
_ENDPOINT = re.compile(r"^(GET|POST|PUT|PATCH|DELETE|OPTIONS|HEAD)\s+(\S+)")
_GO_ATOI = re.compile(r"^[+-]?\d+$")
_EFFORTS = frozenset({"none", "auto", "-1", "minimal", "low", "medium", "high", "xhigh", "max"})
_INT64_MAX = 2**63 - 1

TIMESTAMP_KEYS = ("timestamp", "time", "created_at", "createdAt", "created", "request_time", "requestTime")
ENDPOINT_KEYS = ("endpoint", "api", "request", "operation")
METHOD_KEYS = ("method", "http_method", "httpMethod")
PATH_KEYS = ("path", "url_path", "urlPath", "request_path", "requestPath")
REQUESTED_MODEL_KEYS = ("alias", "requested_model", "requestedModel")
RESOLVED_MODEL_KEYS = ("resolved_model", "resolvedModel", "model", "model_name", "modelName")
PROVIDER_KEYS = ("provider", "type", "auth_type", "authType")
SOURCE_KEYS = ("source", "api_key", "apiKey", "key", "account", "email")
API_KEY_KEYS = ("api_key", "apiKey", "key")
REQUEST_ID_KEYS = ("request_id", "requestId", "id")
PROJECT_KEYS = ("auth_project_id_snapshot", "authProjectIdSnapshot", "project_id", "projectId")


def first_present(obj: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """The value of the first key present (even when it is ""); None when no key is present."""
    for key in keys:
        if key in obj and obj[key] is not None:
            return obj[key]
    return None


def as_text(value: Any) -> str:
    """A scalar as Go would print it; containers and null become ""."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value)
    return ""


def text_of(obj: Mapping[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        value = obj.get(key)
        if value is not None:
            return value.strip() if type(value) is str else as_text(value).strip()
    return ""


def as_number(value: Any) -> float | None:
    """A finite JSON number or numeric string; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) <= MAX_ABS_INT * 1000 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and _NUMERIC.match(value.strip()):
        number = float(value.strip())
        return number if math.isfinite(number) else None
    return None


def as_int(value: Any) -> int:
    """Truncate to int; numeric strings parsed; absurd magnitudes, negatives and non-numbers are 0."""
    if type(value) is int:  # the common case, exact below 2**53 (MAX_ABS_INT is 1e15)
        return value if 0 <= value <= MAX_ABS_INT else 0
    if value is None:
        return 0
    number = as_number(value)
    if number is None or not -MAX_ABS_INT <= number <= MAX_ABS_INT:
        return 0
    return max(int(number), 0)


def as_bool(value: Any) -> bool | None:
    """A JSON boolean, a number (non-zero is true) or Go's ParseBool spellings; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "t", "true", "yes"):
            return True
        if low in ("0", "f", "false", "no"):
            return False
    return None


# --- timestamps ----------------------------------------------------------------


def render_ts(ms: int, nanos: str | None = None) -> str:
    """Go's RFC3339Nano in UTC: up to 9 fraction digits, trailing zeros dropped, Z suffix.

    `nanos` (9 digits) carries sub-millisecond precision; without it the fraction comes from `ms`.
    """
    fraction = (nanos if nanos is not None else f"{ms % 1000:03d}000000").rstrip("0")
    return second_text(ms // 1000) + (f".{fraction}Z" if fraction else "Z")


def second_text(seconds: int) -> str:
    """'YYYY-MM-DDTHH:MM:SS' of an epoch second (UTC)."""
    minute, second = divmod(seconds % 3600, 60)
    return f"{_hour_text(seconds // 3600)}:{minute:02d}:{second:02d}"


@lru_cache(maxsize=4096)
def _hour_text(hours: int) -> str:
    """'YYYY-MM-DDTHH' of an epoch hour (timestamps repeat the same hours constantly)."""
    return (_EPOCH + timedelta(hours=hours)).strftime("%Y-%m-%dT%H")


@lru_cache(maxsize=4096)
def _hour_epoch_s(year: str, month: str, day: str, hour: str, zone: str | None) -> int | None:
    """Epoch seconds of a local date and hour with an RFC 3339 zone; None when invalid."""
    try:
        offset = timedelta(0)
        if zone and zone not in ("Z", "z"):
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            offset = -offset if zone[0] == "-" else offset
        local = datetime(int(year), int(month), int(day), int(hour), tzinfo=timezone(offset))
    except (ValueError, OverflowError):
        return None
    return int((local - _EPOCH).total_seconds())


def _parse_string_ts(text: str) -> tuple[int, str] | None:
    match = _TIMESTAMP.match(text)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if int(minute) > 59 or int(second) > 59:
        return None
    base = _hour_epoch_s(year, month, day, hour, zone)
    if base is None:
        return None
    nanos = ((fraction or "")[:9]).ljust(9, "0")
    seconds = base + int(minute) * 60 + int(second)
    ms = seconds * 1000 + int(nanos[:3])
    return (ms, render_ts(ms, nanos)) if 0 <= ms <= _MAX_MS else None


def parse_timestamp(value: Any, now_ms: int) -> tuple[int, str]:
    """(epoch ms, Go RFC3339Nano UTC string). Numbers below 1e10 are seconds; junk means now."""
    if isinstance(value, str):  # CPA's RFC 3339 text first: no numeric string matches its pattern
        parsed = _parse_string_ts(value.strip())
        if parsed:
            return parsed
    number = as_number(value)
    if number is not None:
        ms = int(number * 1000) if abs(number) < 1e10 else int(number)
        return (ms, render_ts(ms)) if 0 <= ms <= _MAX_MS else (now_ms, render_ts(now_ms))
    return now_ms, render_ts(now_ms)


# --- endpoint and models ----------------------------------------------------------


def endpoint_parts(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """(endpoint, method, path): endpoint built from method + path when missing, else '-'."""
    endpoint = text_of(obj, ENDPOINT_KEYS)
    method = text_of(obj, METHOD_KEYS)
    path = text_of(obj, PATH_KEYS)
    if not endpoint:
        endpoint = " ".join(p for p in (method, path) if p)
    match = _ENDPOINT.match(endpoint)
    if match:
        method = method or match.group(1)
        path = path or match.group(2)
    return endpoint or "-", method, path


def _go_atoi_nonnegative(text: str) -> bool:
    if not _GO_ATOI.match(text):
        return False
    value = int(text)
    return 0 <= value <= _INT64_MAX


def analytics_model(model: str) -> str:
    """The model without a final reasoning suffix `(x)` (reference 3.7, Go Atoi semantics)."""
    if not model.endswith(")"):
        return model
    open_at = model.rfind("(")
    if open_at <= 0:
        return model
    inner = model[open_at + 1:-1]
    if inner.lower() in _EFFORTS or _go_atoi_nonnegative(inner):
        return model[:open_at]
    return model


def event_hash(parts: Sequence[str]) -> str:
    """sha256 hex of the '|'-joined identity parts, whitespace-trimmed (reference 3.3)."""
    joined = "|".join(parts).strip()
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()
