"""Accounts from CPA's auth-files list, and credential error events from CPA's `errors` channel.

`account_row(entry)` turns one auth-file entry into an accounts-table row (reference 3.5);
`AccountDirectory` caches the fetched list for `ttl_s` and forgets it on `{"refresh":true}`;
`parse_credential_error(raw, instance)` turns one `errors` channel payload into a
credential_errors row plus the raw body for credential_error_private. Pure apart from the fetch
callable the directory is given.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

from datasource.sanitize import fail_summary, looks_secret, mask_email

logger = logging.getLogger(__name__)

_FRACTION = re.compile(r"(\.\d{6})\d+")


def _text(entry: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _display(value: str, mask_emails: bool) -> str:
    return mask_email(value) if mask_emails and "@" in value else value


def account_row(entry: dict[str, Any], *, mask_emails: bool = False) -> dict[str, Any] | None:
    """One auth-file entry as an accounts row, or None when it has no auth_index to join on."""
    auth_index = _text(entry, "auth_index")
    if not auth_index:
        return None
    account = next((v for v in (_text(entry, "account"), _text(entry, "email")) if v and not looks_secret(v)), "")
    label = _text(entry, "label", "name", "email") or account
    account = account or label or _text(entry, "name")
    return {
        "auth_index": auth_index,
        "name": _text(entry, "name") or None,
        "label": _display(label, mask_emails) or None,
        "account": _display(account, mask_emails) or None,
        "provider": (_text(entry, "provider", "type") or "").lower() or None,
        "project_id": _text(entry, "project_id", "projectId", "gemini_virtual_project",
                            "geminiVirtualProject") or None,
        "status": _text(entry, "status") or ("disabled" if entry.get("disabled") else "active"),
        "status_message": _text(entry, "status_message") or None,
        "disabled": int(bool(entry.get("disabled"))),
        "unavailable": int(bool(entry.get("unavailable"))),
    }


def account_rows(files: list[dict[str, Any]], *, mask_emails: bool = False) -> list[dict[str, Any]]:
    rows = (account_row(f, mask_emails=mask_emails) for f in files)
    return [r for r in rows if r is not None]


class AccountDirectory:
    """The auth-file list of one CPA, fetched at most every `ttl_s` seconds.

    `due()` says whether a fetch is needed; `fetch()` runs it and returns the rows to store
    (None on failure: the last rows stay in the database, the next try waits a full TTL).
    """

    def __init__(self, fetch_files: Callable[[], list[dict[str, Any]]], ttl_s: float, *,
                 mask_emails: bool = False, now: Callable[[], float] = time.time) -> None:
        self._fetch_files = fetch_files
        self.ttl_s = ttl_s
        self.mask_emails = mask_emails
        self._now = now
        self._fetched_at: float | None = None
        self.fetches = 0
        self.last_error: str | None = None

    def invalidate(self) -> None:
        """CPA said its credentials changed (`{"refresh":true}`): fetch again on next use."""
        self._fetched_at = None

    def due(self) -> bool:
        return self._fetched_at is None or self._now() - self._fetched_at >= self.ttl_s

    def fetch(self) -> list[dict[str, Any]] | None:
        self._fetched_at = self._now()
        self.fetches += 1
        try:
            files = self._fetch_files()
        except Exception as exc:  # enrichment is best effort: events are stored either way
            self.last_error = str(exc)
            logger.warning("auth-files fetch failed (keeping the last accounts): %s", exc)
            return None
        self.last_error = None
        return account_rows(files, mask_emails=self.mask_emails)


def parse_time_ms(value: Any) -> int | None:
    """RFC 3339 (any fraction length, Z or offset) or epoch seconds/ms -> epoch ms."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value if value > 1e11 else value * 1000)
    if not isinstance(value, str) or not value.strip():
        return None
    text = _FRACTION.sub(r"\1", value.strip()).replace("Z", "+00:00").replace("z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    if parsed.year <= 1:  # Go's zero time means "not set"
        return None
    return int(parsed.timestamp() * 1000)


def _bool_or_none(value: Any) -> int | None:
    return None if value is None else int(bool(value))


def parse_credential_error(raw: bytes, instance: str, now_ms: int) -> tuple[dict[str, Any], str | None] | None:
    """An `errors` channel payload -> (credential_errors row, raw body); None when not an object."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    status = data.get("auth_status") if isinstance(data.get("auth_status"), dict) else {}
    quota = status.get("quota") if isinstance(status.get("quota"), dict) else {}
    body = data.get("body") if isinstance(data.get("body"), str) else None
    auth_index = str(data.get("auth_index") or "") or None
    code = data.get("status_code")
    retry_at = parse_time_ms(quota.get("next_recover_at")) or parse_time_ms(status.get("next_retry_after"))
    row = {
        "ts_ms": parse_time_ms(data.get("timestamp")) or now_ms,
        "instance": instance,
        "provider": str(data.get("provider") or "") or None,
        "model": str(data.get("model") or "") or None,
        "auth_id": str(data.get("auth_id") or "") or None,
        "auth_index": auth_index,
        "account_key": auth_index or "-",
        "status_code": int(code) if isinstance(code, (int, float)) and not isinstance(code, bool) else None,
        "code": str(data.get("code") or "") or None,
        "retryable": _bool_or_none(data.get("retryable")),
        "quota_exceeded": _bool_or_none(quota.get("exceeded")),
        "next_retry_after_ms": retry_at,
        "summary": fail_summary(body),
        "created_ms": now_ms,
    }
    return row, body
