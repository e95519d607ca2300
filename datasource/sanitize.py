"""Pure redaction and masking: what may leave the raw payload, and in which form.

Reference section 3.4 (identities) and 3.6 (fail summaries, raw JSON, request
metadata). Nothing here does I/O; every function returns a new value.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from typing import Any

REDACTED = "[redacted]"
SUMMARY_MAX_BYTES = 4096
CLIENT_IP_MAX_BYTES = 64
XFF_MAX_BYTES = 2048
USER_AGENT_MAX_BYTES = 1024
HEADER_VALUE_MAX_BYTES = 1024
LABEL_MAX_BYTES = 512

_I = re.IGNORECASE
# A key/value separator as it appears in headers, query strings and JSON text.
_SEP = r"""(["']?\s*[:=]\s*\[?\s*["']?\s*)"""
_VALUE = r"""[^\s"',;&}\]]+"""

# Order matters: the passes of reference 3.6, applied one after the other.
_PASSES: tuple[tuple[re.Pattern[str], str], ...] = (
    # 1. authorization: <scheme> <value>
    (re.compile(r"\b(authorization)" + _SEP + r"((?:bearer|basic|token|digest)\s+)?" + _VALUE, _I),
     r"\1\2\3" + REDACTED),
    # 2. bare bearer tokens
    (re.compile(r"\bbearer\s+[A-Za-z0-9\-._~+/=]{8,}", _I), "Bearer " + REDACTED),
    # 3. OAuth token fields
    (re.compile(r"\b(access_token|refresh_token|id_token)" + _SEP + _VALUE, _I), r"\1\2" + REDACTED),
    # 4. API-key fields
    (re.compile(r"\b(x-api-key|api[-_ ]?key)" + _SEP + _VALUE, _I), r"\1\2" + REDACTED),
    # 5. token-shaped strings
    (re.compile(
        r"\b(?:sk-proj-[A-Za-z0-9_\-]{4,}|sk-ant-[A-Za-z0-9_\-]{4,}|sk-[A-Za-z0-9_\-]{6,}"
        r"|sess-[A-Za-z0-9_\-]{6,}|ghp_[A-Za-z0-9]{6,}|github_pat_[A-Za-z0-9_]{20,}"
        r"|AIza[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{6,}|pk_[A-Za-z0-9_]{6,}|rk_[A-Za-z0-9_]{6,})"),
     REDACTED),
    # 6. JSON cookie / set-cookie string values (and arrays of strings)
    (re.compile(r'("(?:set-)?cookie"\s*:\s*)(?:"(?:[^"\\]|\\.)*"|\[(?:\s*"(?:[^"\\]|\\.)*"\s*,?)*\])', _I),
     r'\1"' + REDACTED + '"'),
    # 7. header-style cookie lines
    (re.compile(r"\b((?:set-)?cookie\s*:\s*)[^\r\n]*", _I), r"\1" + REDACTED),
    # 8. e-mail addresses
    (re.compile(r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@([A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,})"),
     r"\1***@\2"),
)

_SECRET_KEYS = frozenset({
    "api_key", "apikey", "authorization", "cookie", "set_cookie",
    "access_token", "refresh_token", "id_token", "token", "x_api_key",
})
_META_LIMITS = {"client_ip": CLIENT_IP_MAX_BYTES, "x_forwarded_for": XFF_MAX_BYTES,
                "user_agent": USER_AGENT_MAX_BYTES}
_IDENTITY_KEYS = frozenset({"source", "account", "email"})


# Every pass needs one of these substrings; text without any of them is returned as is.
_MARKERS = r"auth|bearer|token|key|sk-|sess-|ghp_|github_pat_|aiza|hf_|pk_|rk_|cookie|@"
_MAYBE_SECRET = re.compile(_MARKERS, _I)
# For ASCII text, lower-casing and a case-sensitive search find the same: 5-20x faster than
# IGNORECASE (which also folds non-ASCII letters such as the Kelvin sign, so other text keeps it).
_MAYBE_SECRET_LOWER = re.compile(_MARKERS)


def redact_text(text: str) -> str:
    """Apply the eight redaction passes of reference 3.6 to free text."""
    if not (_MAYBE_SECRET_LOWER.search(text.lower()) if text.isascii() else _MAYBE_SECRET.search(text)):
        return text
    for pattern, replacement in _PASSES:
        text = pattern.sub(replacement, text)
    return text


def truncate_bytes(text: str, limit: int, marker: str = "...") -> str:
    """Cut `text` to at most `limit` UTF-8 bytes (never inside a character), then add `marker`."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore") + marker


def fail_summary(text: str | None) -> str | None:
    """A failure body made safe to show: redacted, trimmed, at most 4096 bytes plus '...'."""
    if not text:
        return None
    summary = redact_text(text).strip()
    return truncate_bytes(summary, SUMMARY_MAX_BYTES) or None


def _is_blank_rune(ch: str) -> bool:
    if ch.isspace():
        return True
    category = unicodedata.category(ch)
    return category[0] == "C" or category in ("Zl", "Zp")


# Pure per-value work is memoized: real traffic repeats the same user agents, labels, models,
# keys and header values constantly. Bounded, so unique values (request ids) cannot grow memory.
CACHE_SIZE = 8192


def clean_text(value: str | None, limit: int) -> str | None:
    """Whitespace and non-graphic characters become one space; trimmed; capped at `limit` bytes.

    An over-long value is cut to limit-3 bytes and '...' is appended (reference 3.6).
    """
    if not value:
        return None
    return _clean_text(value, limit)


def clean_unique(value: str | None, limit: int) -> str | None:
    """clean_text for values that never repeat (request ids): the cache would only churn."""
    return _clean(value, limit) if value else None


@functools.lru_cache(maxsize=CACHE_SIZE)
def clean_label(value: str) -> str | None:
    """clean_text(value, LABEL_MAX_BYTES) for a non-empty value, in one cached call."""
    return _clean(value, LABEL_MAX_BYTES)


def _clean(value: str, limit: int) -> str | None:
    if value.isprintable():  # fast path: the only blank rune is the ASCII space
        cleaned = " ".join(part for part in value.split(" ") if part)
    else:
        cleaned = _clean_slow(value)
    if len(cleaned.encode("utf-8")) > limit:
        cleaned = truncate_bytes(cleaned, max(limit - 3, 0))
    return cleaned or None


_clean_text = functools.lru_cache(maxsize=CACHE_SIZE)(_clean)


def _clean_slow(value: str) -> str:
    out: list[str] = []
    pending_space = False
    for ch in value:
        if _is_blank_rune(ch):
            pending_space = bool(out)
            continue
        if pending_space:
            out.append(" ")
            pending_space = False
        out.append(ch)
    return "".join(out)


@functools.lru_cache(maxsize=CACHE_SIZE)
def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def api_key_hash(key: str | None) -> str | None:
    """sha256 hex of the trimmed caller key, or None when there is no key."""
    key = (key or "").strip()
    return sha256_hex(key) if key else None


def mask_api_key(key: str | None) -> str | None:
    """Display form of a caller key: first 2 + 6 stars + last 2 (1 + 8 + 1 below 4 chars)."""
    key = (key or "").strip()
    if not key:
        return None
    if len(key) < 4:
        return key[0] + "*" * 8 + key[-1]
    return key[:2] + "*" * 6 + key[-2:]


def looks_secret(value: str) -> bool:
    """A source that may be a raw credential (reference 3.4)."""
    if any(c in value for c in (" ", "/", "\\")):
        return False
    return value.startswith(("sk-", "AIza")) or len(value) >= 32


def mask_email(value: str) -> str:
    local, _, domain = value.partition("@")
    head = local.encode("utf-8")[:3].decode("utf-8", "ignore")
    return f"{head}***@{domain}"


def mask_source(source: str | None) -> str | None:
    """Stored form of `source`: e-mails as abc***@domain, secret-looking values as m:abcd...wxyz."""
    if not source:
        return None
    return _mask_source(source)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _mask_source(source: str) -> str | None:
    if "@" in source:
        masked = mask_email(source)
    elif looks_secret(source):
        masked = "m:****" if len(source) <= 8 else f"m:{source[:4]}...{source[-4:]}"
    else:
        masked = source
    return clean_text(masked, LABEL_MAX_BYTES)


@functools.lru_cache(maxsize=1024)
def _normal_key(key: str) -> str:
    return key.lower().replace("-", "_").replace(" ", "_")


@functools.lru_cache(maxsize=1024)
def _is_secret_key(key: str) -> bool:
    normal = _normal_key(key)
    return normal in _SECRET_KEYS or "secret" in normal


def redact_payload(value: Any, _key: str = "") -> Any:
    """The payload re-encodable as raw_json: secret keys redacted, bodies summarised, metadata cleaned."""
    if isinstance(value, dict):
        return {k: _redact_member(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_payload(v) for v in value]
    return value


def _redact_member(key: str, value: Any) -> Any:
    normal = _normal_key(key)
    if _is_secret_key(key):
        return REDACTED
    if isinstance(value, str):
        if normal in ("body", "fail_body"):
            return fail_summary(value) or ""
        if normal in _META_LIMITS:
            return clean_text(value, _META_LIMITS[normal]) or ""
        if normal in _IDENTITY_KEYS:
            return mask_source(value) or ""
    return redact_payload(value, key)
