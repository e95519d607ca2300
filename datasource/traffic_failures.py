"""Failure bodies and upstream response headers per status, kind and provider, and the
matching credential-error event of CPA's `errors` channel.

Bodies follow the shapes the upstreams return (OpenAI/Codex `{"error":{...}}`, Anthropic
`{"type":"error","error":{...}}`, Google `{"error":{"code","message","status"}}`).
"""

from __future__ import annotations

import json
import random
import re
import time
from datetime import datetime
from typing import Any, Protocol

from datasource.traffic_tokens import lognormal


class _AccountLike(Protocol):
    provider: str
    plan: str


def failure_shape(rng: random.Random, failure: tuple[int, str], account: _AccountLike,
                  ts_ms: int) -> tuple[int, str, dict[str, list[str]], int]:
    """(status, body, response headers, latency_ms) of one failed attempt."""
    status, kind = failure
    family = {"codex": "openai", "claude": "anthropic", "gemini": "google", "vertex": "google"}.get(
        account.provider, "compat")
    rid = "%06x" % rng.getrandbits(24)
    headers: dict[str, list[str]] = {"Content-Type": ["application/json"], "X-Request-Id": [f"req_{rid}"]}
    latency = int(lognormal(rng, 0.6) * 450) + 20
    if kind in ("timeout", "gateway_timeout"):
        latency = int(30_000 + rng.random() * 90_000)
    if kind == "quota":
        wait = int(600 + rng.random() * 17_400)
        headers["Retry-After"] = [str(wait)]
        if account.provider == "codex":
            headers.update(_codex_quota_headers(account.plan, wait))
        return status, _quota_body(family, account.plan, wait), headers, latency
    if kind == "rate_limit":
        headers["Retry-After"] = [str(int(5 + rng.random() * 55))]
    if kind == "token_invalidated" and family == "openai":
        headers["X-Openai-Ide-Error-Code"] = ["token_invalidated"]
        headers["Cf-Ray"] = [f"{rng.getrandbits(64):016x}-SJC"]
    if status in (502, 503, 504, 529) and family == "anthropic":
        headers["X-Should-Retry"] = ["true"]
    message, code = _MESSAGES[kind]
    return status, _body(family, status, kind, message, code), headers, latency


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)$")
_MESSAGES: dict[str, tuple[str, str]] = {
    "rate_limit": ("Rate limit reached for requests. Please try again in 20s.", "rate_limit_exceeded"),
    "token_invalidated": ("Your authentication token has been invalidated. Please try signing in again.",
                          "token_invalidated"),
    "invalid_credentials": ("OAuth token has expired or is invalid (invalid_grant).", "invalid_token"),
    "permission_denied": ("You do not have permission to access this model.", "permission_denied"),
    "account_deactivated": ("This account has been deactivated (account_deactivated).", "account_deactivated"),
    "bad_request": ("Invalid value for 'tools[0].type': unsupported tool type.", "invalid_request_error"),
    "timeout": ("Request timed out while waiting for the upstream response.", "timeout"),
    "server_error": ("The server had an error while processing your request.", "server_error"),
    "bad_gateway": ("Bad gateway: upstream connection reset.", "bad_gateway"),
    "unavailable": ("The model is currently overloaded. Please try again later.", "service_unavailable"),
    "gateway_timeout": ("Gateway timeout while waiting for the upstream.", "gateway_timeout"),
    "overloaded": ("Overloaded", "overloaded_error"),
}
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 408: "DEADLINE_EXCEEDED",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   408: "timeout_error", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
                   503: "api_error", 504: "timeout_error", 529: "overloaded_error"}


def _body(family: str, status: int, kind: str, message: str, code: str) -> str:
    if family == "anthropic":
        return _dumps({"type": "error", "error": {"type": _ANTHROPIC_TYPE.get(status, "api_error"), "message": message}})
    if family == "google":
        return _dumps({"error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}})
    error = {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
             "code": code, "param": None}
    return _dumps({"error": error, "status": status} if status in (401, 403) else {"error": error})


def _quota_body(family: str, plan: str, wait: int) -> str:
    if family == "openai":
        return _dumps({"error": {"type": "usage_limit_reached", "message": "The usage limit has been reached",
                                 "plan_type": plan, "resets_in_seconds": wait}})
    if family == "google":
        return _dumps({"error": {"code": 429, "message": "Quota exceeded for quota metric 'Generate Content "
                                 "API requests per day'. Please retry later.", "status": "RESOURCE_EXHAUSTED"}})
    if family == "anthropic":
        return _dumps({"type": "error", "error": {"type": "rate_limit_error",
                                                  "message": "This request would exceed your account's usage limit."}})
    return _dumps({"error": {"message": "Rate limit exceeded: credits exhausted for this key", "code": 429}})


def _codex_quota_headers(plan: str, wait: int) -> dict[str, list[str]]:
    return {
        "X-Codex-Plan-Type": [plan], "X-Codex-Rate-Limit-Reached-Type": ["primary"],
        "X-Codex-Primary-Used-Percent": ["100"], "X-Codex-Primary-Window-Minutes": ["300"],
        "X-Codex-Primary-Reset-After-Seconds": [str(wait)], "X-Codex-Secondary-Used-Percent": ["64"],
        "X-Codex-Secondary-Window-Minutes": ["10080"], "X-Codex-Secondary-Reset-After-Seconds": ["302400"],
    }


def credential_error(payload: dict[str, Any], auth_id: str) -> dict[str, Any] | None:
    """CPA's `errors`-channel event for a failed attempt on a credential (401, 403, 429 only)."""
    fail = payload.get("fail") or {}
    status = int(fail.get("status_code") or 0)
    if not payload.get("failed") or status not in (401, 403, 429):
        return None
    body = str(fail.get("body") or "")
    code = _first_code(body)
    quota = status == 429
    retry_after = int((payload.get("response_headers") or {}).get("Retry-After", ["0"])[0] or 0)
    recover = _rfc3339(_epoch(str(payload.get("timestamp", ""))) + retry_after) if quota and retry_after else ""
    auth_status: dict[str, Any] = {
        "status": "error", "status_message": code or f"status {status}", "unavailable": quota,
        "quota": {"exceeded": quota, "reason": "quota" if quota else "", "next_recover_at": recover},
        "next_retry_after": recover,
    }
    return {"timestamp": payload.get("timestamp", ""), "provider": payload.get("provider", ""),
            "model": payload.get("model", ""), "auth_id": auth_id, "auth_index": payload.get("auth_index", ""),
            "status_code": status, "body": body, "code": code, "retryable": quota, "auth_status": auth_status}


def _first_code(body: str) -> str:
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        return ""
    return str(error.get("code") or error.get("type") or error.get("status") or "")


def _epoch(timestamp: str) -> float:
    """Seconds since the epoch of an RFC3339(Nano) timestamp; now when unparseable."""
    match = _RFC3339.match(timestamp)
    if not match:
        return time.time()
    zone = "+00:00" if match.group(2) == "Z" else match.group(2)
    return datetime.fromisoformat(match.group(1) + zone).timestamp()


def _rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
