"""Pure parsing of CPA's upstream `response_headers` into metadata (reference 3.8).

`parse_headers(raw, event_ms)` returns a `HeaderMeta`: the allow-listed,
sanitized metadata as a nested dict (`meta`, stored as `response_meta` for
failed events) plus the projected values the events row needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Mapping

from datasource.sanitize import CACHE_SIZE, HEADER_VALUE_MAX_BYTES, clean_text, redact_text

_TRACE_ORDER = ("x-oai-request-id", "x-request-id", "x-oneapi-request-id", "x-cloudaicompanion-trace-id",
                "cf-ray", "eagleid", "x-client-request-id", "x-zeabur-request-id")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_QUOTA_SCALARS = ("x-codex-plan-type", "x-codex-active-limit", "x-codex-rate-limit-reached-type",
                  "x-codex-credits-balance", "x-codex-credits-has-credits", "x-codex-credits-unlimited",
                  "x-codex-primary-over-secondary-limit-percent")
_QUOTA_SCALAR_KEYS = tuple((n, n.removeprefix("x-codex-").replace("-", "_")) for n in _QUOTA_SCALARS)
_WINDOW_HEADERS = {w: tuple(f"x-codex-{w}-{part}" for part in
                            ("used-percent", "window-minutes", "reset-at", "reset-after-seconds"))
                   for w in ("primary", "secondary")}
_ROUTING = ("x-openai-proxy-wasm", "x-models-etag", "x-new-api-version", "server", "via", "cf-cache-status",
            "x-site-cache-status", "x-served-by", "x-mife-upstream-status")
_RESPONSE = ("content-type", "content-disposition", "server-timing")
_RATE_LIMITS = tuple(f"x-ratelimit-{a}-{b}" for a in ("limit", "remaining") for b in ("requests", "tokens"))
_AUTH_CODES = frozenset({"token_revoked", "token_invalidated", "account_deactivated", "401"})
_KEPT_TOKEN_HEADERS = frozenset({"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"})
# Every header _errors and _error_class read.
_ERROR_NAMES = frozenset({"retry-after", "x-should-retry", "x-openai-authorization-error", "x-openai-ide-error-code",
                          "x-openai-ide-root-error-code", "x-ratelimit-bypass"})
_INT = re.compile(r"^[+-]?\d{1,18}$")
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


@dataclass(slots=True)
class QuotaWindow:
    name: str  # primary | secondary
    used_pct: float | None
    window_minutes: int | None
    recover_at_ms: int | None

    @property
    def kind(self) -> str:
        minutes = self.window_minutes
        if minutes == 300:
            return "five_hour"
        if minutes == 10080:
            return "weekly"
        if minutes is not None and 28 * 1440 <= minutes <= 31 * 1440:
            return "monthly"
        return "unknown"


@dataclass(slots=True)
class HeaderMeta:
    meta: dict[str, Any] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)  # sanitized, lower-cased names
    quota_plan: str | None = None
    quota_used_pct: float | None = None
    quota_recover_at_ms: int | None = None
    quota_window: str | None = None
    quota_reached: bool = False
    error_kind: str | None = None
    error_code: str | None = None
    trace_id: str | None = None
    retry_after_s: int | None = None
    should_retry: bool | None = None
    content_type: str | None = None

    def to_json(self) -> str | None:
        """Compact JSON of the metadata (keys sorted), None when nothing was kept."""
        return json.dumps(self.meta, separators=(",", ":"), sort_keys=True) if self.meta else None


@lru_cache(maxsize=1024)
def _dropped(name: str) -> bool:
    if "token" in name and name not in _KEPT_TOKEN_HEADERS:
        return True
    if "authorization" in name and name != "x-openai-authorization-error":
        return True
    return any(m in name for m in ("secret", "set-cookie", "api-key", "apikey")) or name == "cookie"


def header_values(raw: object) -> dict[str, str]:
    """Lower-cased header name -> first non-empty value, sanitized and capped; secrets dropped."""
    out: dict[str, str] = {}
    if not isinstance(raw, (dict, Mapping)):  # dict first: a Mapping check alone is slow
        return out
    for name, value in raw.items():
        if type(value) is list and len(value) == 1 and type(value[0]) is str:  # CPA's usual shape
            key, text = _header_item(name, value[0])
            if key and text and key not in out:
                out[key] = text
            continue
        key = _kept_name(name)
        if not key or key in out:
            continue
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, (str, int, float)) and not isinstance(item, bool):
                text = _clean_value(str(item))
                if text:
                    out[key] = text
                    break
    return out


@lru_cache(maxsize=CACHE_SIZE)
def _header_item(name: object, value: str) -> tuple[str, str | None]:
    """(_kept_name(name), the cleaned value) of a header with one string value, in one cached call."""
    key = _kept_name(name)
    return key, (_clean_value(value) if key else None)


@lru_cache(maxsize=1024)
def _kept_name(name: object) -> str:
    """The lower-cased header name, or "" for a header that is dropped (or has no name)."""
    key = str(name).strip().lower()
    return "" if not key or _dropped(key) else key


@lru_cache(maxsize=CACHE_SIZE)
def _clean_value(text: str) -> str | None:
    return clean_text(redact_text(text), HEADER_VALUE_MAX_BYTES)


def safe_headers(raw: object) -> dict[str, list[str]]:
    """The raw header map minus dropped (secret-bearing) names, values as string lists."""
    out: dict[str, list[str]] = {}
    if not isinstance(raw, Mapping):
        return out
    for name, value in raw.items():
        if _dropped(str(name).strip().lower()):
            continue
        items = value if isinstance(value, list) else [value]
        out[str(name)] = [str(v) for v in items if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
    return out


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and _INT.match(value) else None


def _float(value: str | None) -> float | None:
    return float(value) if value is not None and _NUM.match(value) else None


def _bool(value: str | None) -> bool | None:
    low = (value or "").lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    return None


def parse_time_ms(value: str | None) -> int | None:
    """Absolute time: epoch ms (>1e12), epoch s (>1e9), RFC3339 or an HTTP date."""
    if not value:
        return None
    number = _float(value)
    if number is not None:
        if number > 1e12:
            return int(number) if number < 1e15 else None
        return int(number * 1000) if number > 1e9 else None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _window(values: dict[str, str], name: str, event_ms: int) -> QuotaWindow | None:
    used_name, minutes_name, at_name, after_name = _WINDOW_HEADERS[name]
    used = _float(values.get(used_name))
    minutes = _int(values.get(minutes_name))
    recover = parse_time_ms(values.get(at_name))
    after = _float(values.get(after_name))
    if recover is None and after is not None and 0 <= after < 1e10:
        recover = event_ms + int(after * 1000)
    if used is None and minutes is None and recover is None:
        return None
    return QuotaWindow(name, used, minutes, recover)


def _window_dict(w: QuotaWindow) -> dict[str, Any]:
    return {"used_percent": w.used_pct, "window_minutes": w.window_minutes,
            "recover_at_ms": w.recover_at_ms, "window": w.kind}


def _quota(values: dict[str, str], event_ms: int) -> tuple[dict[str, Any], list[QuotaWindow]]:
    section: dict[str, Any] = {}
    if not any(name.startswith("x-codex-") for name in values):  # every quota header is x-codex-*
        return section, []
    for name, key in _QUOTA_SCALAR_KEYS:
        if name in values:
            section[key] = values[name]
    windows = [w for w in (_window(values, n, event_ms) for n in ("primary", "secondary")) if w]
    for w in windows:
        section[w.name] = _window_dict(w)
    return section, windows


def _summary_window(windows: list[QuotaWindow]) -> QuotaWindow | None:
    rated = [w for w in windows if w.used_pct is not None]
    if not rated:
        return None
    return max(rated, key=lambda w: (w.used_pct, w.recover_at_ms or 0))


def _reached_window(windows: list[QuotaWindow], reached_type: str | None) -> QuotaWindow | None:
    named = [w for w in windows if w.name == (reached_type or "").lower()]
    if named:
        return named[0]
    full = [w for w in windows if w.used_pct is not None and w.used_pct >= 100]
    return max(full, key=lambda w: w.recover_at_ms or 0) if full else None


def _error_class(values: dict[str, str]) -> tuple[str | None, str | None]:
    for name in ("x-openai-ide-root-error-code", "x-openai-ide-error-code", "x-openai-authorization-error"):
        code = values.get(name, "").strip().lower()
        if code in _AUTH_CODES:
            return "auth", code
        if code == "identity_edge_internal_error":
            return "identity", code
    if "x-ratelimit-bypass" in values:
        return "rate_limit", values["x-ratelimit-bypass"]
    if "retry-after" in values:
        return "rate_limit", "retry_after"
    return None, None


def _retry_after(value: str | None, event_ms: int) -> tuple[int | None, int | None]:
    seconds = _int(value)
    if seconds is not None:
        seconds = max(seconds, 0)
        return seconds, event_ms + seconds * 1000
    at_ms = parse_time_ms(value) if value and not _NUM.match(value) else None
    if at_ms is None:
        return None, None
    return max((at_ms - event_ms) // 1000, 0), at_ms


def _trace(values: dict[str, str]) -> tuple[dict[str, str], str | None]:
    section = {name: values[name] for name in _TRACE_ORDER if name in values}
    primary = next(iter(section.values()), None)
    parent = values.get("traceparent")
    match = _TRACEPARENT.match(parent) if parent else None
    if match and match.group(1) != "ff" and set(match.group(2)) != {"0"} and set(match.group(3)) != {"0"}:
        section["traceparent"] = match.group(0)
        primary = primary or match.group(2)
    return section, primary


def _simple_sections(values: dict[str, str]) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    routing = {n: values[n] for n in _ROUTING if n in values}
    response: dict[str, Any] = {n: values[n] for n in _RESPONSE if n in values}
    length = _int(values.get("content-length"))
    if length is not None and length >= 0:
        response["content-length"] = length
    limits = {n: v for n in _RATE_LIMITS if (v := _int(values.get(n))) is not None and v >= 0}
    policy: dict[str, Any] = {}
    if "x-data-retention" in values:
        policy["data_retention"] = values["x-data-retention"].lower()
    zdr = _bool(values.get("x-zero-data-retention", values.get("x-zero-retention")))
    if zdr is not None:
        policy["zero_data_retention"] = zdr
    for key, section in (("routing", routing), ("response", response), ("rate_limit", limits),
                         ("data_policy", policy)):
        if section:
            sections[key] = section
    return sections


def _errors(values: dict[str, str], event_ms: int) -> tuple[dict[str, Any], tuple[str | None, str | None],
                                                              int | None, bool | None]:
    section: dict[str, Any] = {}
    if values.keys().isdisjoint(_ERROR_NAMES):  # nothing below would find a header
        return section, (None, None), None, None
    retry_s, retry_at = _retry_after(values.get("retry-after"), event_ms)
    if retry_s is not None:
        section.update(retry_after_seconds=retry_s, retry_after_recover_at_ms=retry_at)
    should_retry = _bool(values.get("x-should-retry"))
    if should_retry is not None:
        section["should_retry"] = should_retry
    for name in ("x-openai-authorization-error", "x-openai-ide-error-code",
                 "x-openai-ide-root-error-code", "x-ratelimit-bypass"):
        if name in values:
            section[name.removeprefix("x-").replace("-", "_")] = values[name]
    kind, code = _error_class(values)
    if kind:
        section.update(kind=kind, code=code)
    return section, (kind, code), retry_s, should_retry


def parse_headers(raw: object, event_ms: int, *, sections: bool = True) -> HeaderMeta:
    """Metadata of one event's upstream response headers; relative times count from `event_ms`.

    `sections=False` leaves the routing, response, rate-limit and data-policy sections out of
    `meta` (normalize stores `meta` only for failures); every other field is the same.
    """
    values = header_values(raw)
    if not values:
        return HeaderMeta()
    meta: dict[str, Any] = {}
    quota, windows = _quota(values, event_ms)
    summary = _summary_window(windows)
    reached = _reached_window(windows, values.get("x-codex-rate-limit-reached-type"))
    if summary:
        quota.update(used_percent=summary.used_pct, recover_at_ms=summary.recover_at_ms)
    if reached:
        quota["reached"] = {"name": reached.name, "window": reached.kind}
    errors, (kind, code), retry_s, should_retry = _errors(values, event_ms)
    trace, trace_id = _trace(values)
    for key, section in (("quota", quota), ("errors", errors), ("trace", trace)):
        if section:
            meta[key] = section
    if sections:
        meta.update(_simple_sections(values))
    window = reached or summary
    return HeaderMeta(
        meta=meta, values=values, quota_plan=values.get("x-codex-plan-type"),
        quota_used_pct=summary.used_pct if summary else None,
        quota_recover_at_ms=summary.recover_at_ms if summary else None,
        quota_window=window.kind if window else None, quota_reached=reached is not None,
        error_kind=kind, error_code=code, trace_id=trace_id, retry_after_s=retry_s,
        should_retry=should_retry, content_type=values.get("content-type"))
