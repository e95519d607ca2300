"""Pure classification of one event's outcome: failure_type, status_class, account action.

The rules and their precedence are documented in docs/failure-types.md; each
branch has a test in tests/test_classify.py.
"""

from __future__ import annotations

import re

from datasource.headers import HeaderMeta

FAILURE_TYPES = ("none", "auth", "quota", "rate_limit", "client", "upstream", "timeout", "other")
STATUS_CLASSES = ("success", "failed", "unusual")
ACTIONS = ("reauth", "review", "delete", "wait_quota_reset")

# Codes CPA emits for failures (design notes section 7); anything else is "unusual".
KNOWN_FAILURE_CODES = frozenset({400, 401, 402, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504, 529})

_I = re.IGNORECASE
_ACCOUNT_DEACTIVATED = re.compile(r"account[_ ]deactivated|deactivated[_ ]workspace", _I)
_TOKEN_REVOKED = re.compile(
    r"token[_ ](?:revoked|invalidated)|token has been (?:revoked|invalidated)"
    r"|(?:revoked|invalidated) (?:oauth |access |refresh )?token", _I)
_INVALID_CREDENTIALS = re.compile(
    r"invalid_token|invalid_grant|no auth context|invalid[_ ](?:api[_ ]?key|credentials?|access token)"
    r"|expired[_ ]token|token[_ ](?:is )?expired|token has expired|refresh token (?:is )?(?:invalid|expired)", _I)
_GENERIC_AUTH = re.compile(r"authentication_error|unauthori[sz]ed|forbidden|permission_denied", _I)
_CREDENTIAL_WORDING = re.compile(r"credential|api[_ ]?key|team|account|subscription|access", _I)
_CHAT_ENDPOINT = re.compile(r"chat|completions|responses", _I)
_QUOTA_WORDING = re.compile(
    r"usage[_ ]limit|quota|credit|insufficient[_ ]balance|limit (?:has been )?reached|limit_reached"
    r"|free[_ -]usage[_ -]exhausted|billing", _I)
_TIMEOUT_WORDING = re.compile(r"time[d ]?[_ -]?out|deadline[_ ]exceeded|deadline exceeded", _I)


def _auth_marked(error_kind: str | None, error_code: str | None, text: str) -> bool:
    if (error_kind or "").lower() == "auth":
        return True
    probe = f"{error_code or ''}\n{text}"
    return bool(_ACCOUNT_DEACTIVATED.search(probe) or _TOKEN_REVOKED.search(probe))


def _quota_marked(error_code: str | None, text: str, headers_meta: HeaderMeta | None) -> bool:
    if _QUOTA_WORDING.search(f"{error_code or ''}\n{text}"):
        return True
    if headers_meta is None:
        return False
    used = headers_meta.quota_used_pct
    return headers_meta.quota_reached or (used is not None and used >= 100)


def failure_type(status_code: int | None, failed: bool, error_kind: str | None, error_code: str | None,
                 body_text: str | None, headers_meta: HeaderMeta | None) -> str:
    """One failure type per event; the first matching rule wins (docs/failure-types.md)."""
    if not failed:
        return "none"
    text = body_text or ""
    code = status_code or 0
    if code in (401, 403) or _auth_marked(error_kind, error_code, text):
        return "auth"
    if code == 402 or (code == 429 and _quota_marked(error_code, text, headers_meta)):
        return "quota"
    if code == 429:
        return "rate_limit"
    if code in (408, 504):
        return "timeout"
    if 400 <= code < 500:
        return "client"
    if _TIMEOUT_WORDING.search(text):
        return "timeout"
    if 500 <= code < 600:
        return "upstream"
    return "other"


def status_class(status_code: int | None, failed: bool) -> str:
    """success / failed, or unusual for a code CPA does not emit or one contradicting `failed`."""
    if not failed:
        return "success" if status_code in (None, 200) else "unusual"
    if status_code is None or status_code in KNOWN_FAILURE_CODES:
        return "failed"
    return "unusual"


def account_action(status_code: int | None, failed: bool, failure_kind: str, error_code: str | None,
                   text: str | None, provider: str = "", should_retry: bool | None = None
                   ) -> tuple[str, str, str] | None:
    """(action, reason_code, reason) an operator should take on the credential, or None.

    401/403 follow reference section 7; 402 naming deactivated_workspace means delete;
    a quota failure means waiting for the quota window to reset.
    """
    if not failed:
        return None
    probe = f"{error_code or ''}\n{text or ''}"
    code = status_code or 0
    if code == 402 and "deactivated_workspace" in probe.lower():
        return "delete", "workspace_deactivated", "the workspace of this account was deactivated"
    if code in (401, 403):
        return _auth_action(probe, provider, should_retry)
    if failure_kind == "quota":
        return "wait_quota_reset", "quota_exhausted", "usage quota exhausted; wait for the window to reset"
    return None


def _auth_action(probe: str, provider: str, should_retry: bool | None) -> tuple[str, str, str]:
    if re.search(r"account[_ ]deactivated", probe, _I):
        return "delete", "account_deactivated", "the upstream account was deactivated"
    if _TOKEN_REVOKED.search(probe):
        return "reauth", "token_revoked", "the OAuth token was revoked or invalidated; sign in again"
    if _INVALID_CREDENTIALS.search(probe):
        return "reauth", "invalid_credentials", "the credential is invalid or expired; sign in again"
    if (provider.lower() in ("xai", "grok", "x-ai") and "permission_denied" in probe.lower()
            and _CHAT_ENDPOINT.search(probe) and _CREDENTIAL_WORDING.search(probe) and should_retry is not True):
        return "review", "credential_permission_denied", "the credential may not use this endpoint"
    return "review", "authentication_review", "the upstream refused the credential; review it"
