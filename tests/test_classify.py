"""failure_type (each branch, in precedence order), status_class and account actions."""

from __future__ import annotations

import pytest

from datasource.classify import account_action, failure_type, status_class
from datasource.headers import HeaderMeta

FULL_WINDOW = HeaderMeta(quota_used_pct=100.0)
REACHED = HeaderMeta(quota_reached=True, quota_used_pct=64.0)
HALF_WINDOW = HeaderMeta(quota_used_pct=50.0)


@pytest.mark.parametrize("status, failed, kind, code, body, meta, expected", [
    # none: not failed wins over everything, even a 429 code
    (200, False, None, None, "", None, "none"),
    (429, False, None, None, "quota", None, "none"),
    # auth: 401/403, or auth markers with any code
    (401, True, None, None, "", None, "auth"),
    (403, True, None, None, "forbidden", None, "auth"),
    (429, True, "auth", "token_revoked", "", None, "auth"),
    (500, True, None, None, "your token has been revoked", None, "auth"),
    (400, True, None, None, '{"code":"account_deactivated"}', None, "auth"),
    (402, True, None, None, "deactivated_workspace", None, "auth"),
    # quota: 402, or 429 with quota wording / a full or reached window
    (402, True, None, None, "payment required", None, "quota"),
    (429, True, None, None, '{"type":"usage_limit_reached"}', None, "quota"),
    (429, True, None, None, "You exceeded your current quota", None, "quota"),
    (429, True, None, None, "insufficient credits", None, "quota"),
    (429, True, None, None, "", FULL_WINDOW, "quota"),
    (429, True, None, None, "", REACHED, "quota"),
    # rate_limit: any other 429
    (429, True, "rate_limit", "retry_after", "slow down", HALF_WINDOW, "rate_limit"),
    (429, True, None, None, "", None, "rate_limit"),
    # timeout: 408/504, or timeout wording on a non-4xx code
    (408, True, None, None, "", None, "timeout"),
    (504, True, None, None, "gateway", None, "timeout"),
    (500, True, None, None, "context deadline exceeded", None, "timeout"),
    (502, True, None, None, "upstream timed out", None, "timeout"),
    (None, True, None, None, "read timeout", None, "timeout"),
    # client: other 4xx (timeout wording does not override a client error)
    (400, True, None, None, "invalid value for timeout", None, "client"),
    (404, True, None, None, "", None, "client"),
    (413, True, None, None, "", None, "client"),
    (422, True, None, None, "", None, "client"),
    # upstream: 5xx including 529
    (500, True, None, None, "", None, "upstream"),
    (503, True, None, None, "overloaded", None, "upstream"),
    (529, True, None, None, "", None, "upstream"),
    # other: no code, a code below 400, or above 599
    (None, True, None, None, "", None, "other"),
    (200, True, None, None, "", None, "other"),
    (302, True, None, None, "", None, "other"),
    (600, True, None, None, "", None, "other"),
])
def test_failure_type_branches(status, failed, kind, code, body, meta, expected) -> None:
    assert failure_type(status, failed, kind, code, body, meta) == expected


@pytest.mark.parametrize("status, failed, expected", [
    (200, False, "success"),
    (None, False, "success"),
    (201, False, "unusual"),
    (429, False, "unusual"),
    (429, True, "failed"),
    (529, True, "failed"),
    (None, True, "failed"),
    (418, True, "unusual"),
    (200, True, "unusual"),
    (302, True, "unusual"),
])
def test_status_class(status, failed, expected) -> None:
    assert status_class(status, failed) == expected


@pytest.mark.parametrize("status, ftype, code, text, provider, retry, expected", [
    (401, "auth", None, '{"code":"account_deactivated"}', "codex", None, ("delete", "account_deactivated")),
    (401, "auth", "token_invalidated", "Your authentication token has been invalidated.", "codex", None,
     ("reauth", "token_revoked")),
    (403, "auth", None, "token_revoked", "codex", None, ("reauth", "token_revoked")),
    (401, "auth", None, '{"error":"invalid_grant"}', "gemini", None, ("reauth", "invalid_credentials")),
    (401, "auth", None, "no auth context", "claude", None, ("reauth", "invalid_credentials")),
    (401, "auth", None, "token expired", "claude", None, ("reauth", "invalid_credentials")),
    (403, "auth", None, "permission_denied: team credential may not call /v1/chat/completions", "xai", None,
     ("review", "credential_permission_denied")),
    (403, "auth", None, "permission_denied: team credential may not call /v1/chat/completions", "xai", True,
     ("review", "authentication_review")),
    (403, "auth", None, "permission_denied", "codex", None, ("review", "authentication_review")),
    (401, "auth", None, "", "codex", None, ("review", "authentication_review")),
    (402, "auth", None, '{"code":"deactivated_workspace"}', "codex", None, ("delete", "workspace_deactivated")),
    (429, "quota", None, "usage_limit_reached", "codex", None, ("wait_quota_reset", "quota_exhausted")),
    (402, "quota", None, "payment required", "codex", None, ("wait_quota_reset", "quota_exhausted")),
    (429, "rate_limit", None, "slow down", "codex", None, None),
    (500, "upstream", None, "token_revoked? no: 500s never act", "codex", None, None),
])
def test_account_action(status, ftype, code, text, provider, retry, expected) -> None:
    result = account_action(status, True, ftype, code, text, provider, retry)
    assert (result[:2] if result else None) == expected
    if result:
        assert result[2]  # a human-readable reason


def test_no_action_for_successes() -> None:
    assert account_action(401, False, "none", None, "token_revoked") is None
