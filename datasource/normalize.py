"""Pure normalization: one raw queue item -> Normalized event, Control payload or Rejected item.

`normalize(raw)` decodes and checks the item; `normalize_obj(obj, raw)` takes an
already decoded JSON value (the HTTP queue returns a JSON array of objects).
Neither ever raises: anything unusable becomes `Rejected(reason, payload)`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from typing import Any, Mapping

import orjson

from datasource import classify, sanitize
from datasource.headers import HeaderMeta, parse_headers, safe_headers
from datasource.model import Control, Normalized, Rejected
from datasource.payload import (API_KEY_KEYS, PROJECT_KEYS, PROVIDER_KEYS, REQUEST_ID_KEYS,
                                REQUESTED_MODEL_KEYS, RESOLVED_MODEL_KEYS, SOURCE_KEYS, TIMESTAMP_KEYS,
                                analytics_model, as_bool, as_int, endpoint_parts, event_hash, first_present,
                                parse_timestamp, text_of)
from datasource.pricing import Pricer
from datasource.tokens import TokenCounts, read_tokens, service_tiers

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
MAX_DEPTH = 32
CONTROL_KEYS = frozenset({"support_refresh", "refresh"})
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LABEL = sanitize.LABEL_MAX_BYTES


class _Invalid(ValueError):
    """A decoded value that cannot become an event; the message is the Rejected reason."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def normalize(raw: bytes | str, *, instance: str = "default", pricer: Pricer | None = None,
              now_ms: int | None = None) -> Normalized | Control | Rejected:
    """Decode one raw queue item and normalize it. Never raises."""
    payload = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejected(f"payload is larger than {MAX_PAYLOAD_BYTES} bytes", payload[:MAX_PAYLOAD_BYTES])
    fast = fast_decode(payload)
    if fast is not None:
        return normalize_obj(fast[0], payload, instance=instance, pricer=pricer, now_ms=now_ms, _plain=fast[1])
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(f"payload is not valid UTF-8 (byte {exc.start})", payload)
    try:
        if text.startswith("\ufeff"):  # as json.loads says it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _DECODER.decode(text)
    except RecursionError:
        return Rejected("payload JSON is nested too deeply", payload)
    except ValueError as exc:
        return Rejected(f"payload is not valid JSON: {str(exc)[:200]}", payload)
    return normalize_obj(obj, payload, instance=instance, pricer=pricer, now_ms=now_ms,
                         _plain=plain_json_text(text))


# One decoder for every item: json.loads(text, parse_constant=...) builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)

# 19 digits in a row may be an integer past 64 bits, which orjson turns into a float. Found by
# mapping digits to "0" and the rest to " ", then a substring search: both in C, ~1.5 us a
# payload, where the regex [0-9]{19} took 20.
_DIGIT_RUNS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def fast_decode(payload: bytes) -> tuple[Any, bool] | None:
    """(value, plain) from orjson where the json module would decode the same value; else None.

    orjson takes a third of the json module's instructions on CPA's payloads (41,000 against
    119,000 each, cachegrind). What it accepts, the json module accepts with the same value,
    except an integer past 64 bits, which orjson turns into a float. Such payloads, and all that
    orjson refuses (NaN, a BOM, lone surrogates, invalid UTF-8, malformed JSON), return None:
    the caller takes the json path, which decides and words the rejection as before. `plain`
    is `plain_json_text`'s verdict: orjson accepts only valid UTF-8 without lone surrogates, so
    only the bracket count is left to check.
    """
    if _LONG_RUN in payload.translate(_DIGIT_RUNS):
        return None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return value, payload.count(b"{") + payload.count(b"[") <= MAX_DEPTH + 1


def plain_json_text(text: str) -> bool:
    """True when this JSON text cannot decode to a lone surrogate or nest past MAX_DEPTH.

    A lone surrogate can only come from one in the text itself (never in text decoded from
    UTF-8, checked anyway) or from a `\\uD800`-`\\uDFFF` escape; nesting needs at least
    MAX_DEPTH + 2 brackets. The checks run in C; a payload that fails them (it may still be
    fine) gets the full walk.
    """
    if text.count("{") + text.count("[") > MAX_DEPTH + 1:
        return False
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return "\\u" not in text or not _SURROGATE_ESCAPE.search(text)


def normalize_obj(obj: object, raw: bytes, *, instance: str = "default", pricer: Pricer | None = None,
                  now_ms: int | None = None, _plain: bool = False) -> Normalized | Control | Rejected:
    """Normalize an already decoded JSON value; `raw` is kept for dead letters. Never raises.

    `_plain` (normalize's own fast path) vouches that `obj` holds no lone surrogate and is shallow.
    """
    try:
        if not isinstance(obj, dict):
            raise _Invalid(f"payload is a JSON {_json_type(obj)}, not an object")
        if not _plain and _needs_fix(obj, 0):
            obj = _checked(obj, 0)
        control = _control(obj)
        if control:
            return control
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return _event(obj, instance, pricer, now)
    except _Invalid as exc:
        return Rejected(str(exc), raw)
    except RecursionError:
        return Rejected("payload JSON is nested too deeply", raw)
    except Exception as exc:  # never raise on input: an unforeseen shape becomes a dead letter
        logger.exception("normalize failed on an unexpected payload shape")
        return Rejected(f"payload could not be normalized ({type(exc).__name__})", raw)


def _json_type(obj: object) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, (int, float)):
        return "number"
    return {str: "string", list: "array"}.get(type(obj), type(obj).__name__)


def _needs_fix(value: Any, depth: int) -> bool:
    """True when a string holds a lone surrogate; raises _Invalid past MAX_DEPTH levels."""
    fix = False
    stack = [(value, depth)]
    while stack:
        node, level = stack.pop()
        if level > MAX_DEPTH:
            raise _Invalid(f"payload JSON is nested deeper than {MAX_DEPTH} levels")
        items = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        for item in items:
            if isinstance(item, str):
                fix = fix or (not item.isascii() and _has_surrogate(item))
            elif isinstance(item, (dict, list)):
                stack.append((item, level + 1))
    return fix


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and any("\ud800" <= ch <= "\udfff" for ch in text)


def _checked(value: Any, depth: int) -> Any:
    """The value with lone surrogates replaced; raises _Invalid past MAX_DEPTH levels."""
    if depth > MAX_DEPTH:
        raise _Invalid(f"payload JSON is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {_fix_str(str(k)): _checked(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_checked(v, depth + 1) for v in value]
    return _fix_str(value) if isinstance(value, str) else value


def _fix_str(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _control(obj: Mapping[str, Any]) -> Control | None:
    if len(obj) != 1:
        return None
    (key, value), = obj.items()
    return Control(key) if key in CONTROL_KEYS and value is True else None


def _label(value: str | None) -> str | None:
    return sanitize.clean_label(value) if value else None


def _failed(obj: Mapping[str, Any]) -> bool:
    for keys, invert in ((("failed", "is_failed"), False), (("success", "ok"), True)):
        flag = as_bool(first_present(obj, keys))
        if flag is not None:
            return flag != invert
    status = as_int(first_present(obj, ("status", "status_code", "http_status")))
    if status:
        return status >= 400
    return any(obj.get(k) not in (None, "", False) for k in ("error", "error_message"))


def _fail_parts(obj: Mapping[str, Any]) -> tuple[int | None, str]:
    fail = obj.get("fail")
    fail = fail if isinstance(fail, (dict, Mapping)) else {}
    status = as_int(fail.get("status_code")) or as_int(obj.get("fail_status_code"))
    body = text_of(fail, ("body",)) if "body" in fail else text_of(obj, ("fail_body",))
    return (status if 0 < status < 1000 else None), body


def _headers_raw(obj: Mapping[str, Any]) -> Any:
    return first_present(obj, ("response_headers", "responseHeaders", "headers"))


def _summary_text(body: str, headers_raw: Any) -> str:
    safe = safe_headers(headers_raw)
    header_json = json.dumps(safe, separators=(",", ":"), sort_keys=True) if safe else ""
    return "\n".join(p for p in (body, header_json) if p)


def _identity(obj: Mapping[str, Any], auth_index: str, auth_type: str) -> dict[str, Any]:
    ident = dict(_account_identity(text_of(obj, SOURCE_KEYS), auth_index, auth_type, text_of(obj, PROJECT_KEYS)))
    ident["api_key_hash"], ident["api_key_masked"] = _caller_identity(text_of(obj, API_KEY_KEYS))
    ident["user_agent"] = sanitize.clean_text(text_of(obj, ("user_agent", "userAgent")),
                                              sanitize.USER_AGENT_MAX_BYTES)
    return ident


@functools.lru_cache(maxsize=sanitize.CACHE_SIZE)
def _account_identity(source: str, auth_index: str, auth_type: str, project: str) -> dict[str, Any]:
    """The account columns of an event (a deployment has a few hundred accounts). Callers copy it."""
    source_hash = sanitize.sha256_hex(source) if source else ""
    masked = sanitize.mask_source(source)
    account_key = auth_index or (f"src:{source_hash[:16]}" if source_hash else "-")
    return {
        "auth_type": _label(auth_type), "auth_index": _label(auth_index),
        "account_key": _label(account_key) or "-", "account": masked, "auth_file": None,
        "project_id": _label(project), "source": masked, "source_hash": source_hash or None,
    }


@functools.lru_cache(maxsize=sanitize.CACHE_SIZE)
def _caller_identity(api_key: str) -> tuple[str | None, str | None]:
    """(hash, masked form) of the caller's CPA API key."""
    return sanitize.api_key_hash(api_key), sanitize.mask_api_key(api_key)


def _models(obj: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(display model, resolved model, the four model columns): the columns are cached per pair."""
    requested = text_of(obj, REQUESTED_MODEL_KEYS)
    resolved = text_of(obj, RESOLVED_MODEL_KEYS)
    return requested or resolved or "-", resolved, _model_columns(requested, resolved)


@functools.lru_cache(maxsize=1024)
def _model_columns(requested: str, resolved: str) -> dict[str, Any]:
    """model, resolved_model, analytics_model and billing_model as stored (labels; "-" for none).
    Callers copy it."""
    display = requested or resolved or "-"
    analytics = analytics_model(display)
    return {"model": _label(display) or "-", "resolved_model": _label(resolved),
            "analytics_model": _label(analytics) or "-", "billing_model": _label(resolved or analytics) or "-"}


@functools.lru_cache(maxsize=4096)
def _request_labels(provider: str, executor: str, endpoint: str, method: str,
                    path: str) -> tuple[str | None, ...]:
    """(provider or "unknown", payload provider, request type, endpoint, method, path) as stored."""
    label = _label(provider)
    return label or "unknown", label, _label(executor), _label(endpoint), _label(method), _label(path)


def _hash_parts(request_id: str, ts: str, endpoint: str, model: str, auth_index: str, ident: Mapping[str, Any],
                tokens: TokenCounts, failed: bool, latency: int | None) -> list[str]:
    parts = [request_id, ts, endpoint, model, auth_index, ident["source_hash"] or "", str(tokens.input),
             str(tokens.output), str(tokens.reasoning), str(tokens.cached), "true" if failed else "false"]
    if latency is not None:
        parts.append(str(latency))
    return parts


def _optional_ms(obj: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    value = first_present(obj, keys)
    return None if value is None else as_int(value)


def _outcome(obj: Mapping[str, Any], failed: bool, status: int | None, body: str, meta: HeaderMeta,
             provider: str) -> dict[str, Any]:
    text = f"{body}\n{json.dumps(meta.meta.get('errors', {}), sort_keys=True)}" if failed else ""
    ftype = classify.failure_type(status, failed, meta.error_kind, meta.error_code, text, meta)
    action = classify.account_action(status, failed, ftype, meta.error_code, text, provider, meta.should_retry)
    summary = sanitize.fail_summary(_summary_text(body, _headers_raw(obj))) if failed else None
    return {
        "failed": int(failed), "status_code": status, "status_class": classify.status_class(status, failed),
        "failure_type": ftype, "fail_summary": summary, "quota_plan": meta.quota_plan,
        "quota_used_pct": meta.quota_used_pct, "quota_recover_at_ms": meta.quota_recover_at_ms,
        "quota_window": meta.quota_window, "error_kind": meta.error_kind, "error_code": meta.error_code,
        "trace_id": meta.trace_id, "retry_after_s": meta.retry_after_s,
        "response_meta": meta.to_json() if failed else None,
        "action": action[0] if action else None, "action_reason": action[1] if action else None,
        "action_detail": action[2] if action else None,
    }


def _private(obj: Mapping[str, Any], failed: bool, body: str) -> dict[str, Any]:
    raw_json = None
    if failed:
        raw_json = json.dumps(sanitize.redact_payload(obj), separators=(",", ":"), ensure_ascii=False)
    return {
        "fail_body": (body or None) if failed else None,
        "client_ip": sanitize.clean_text(text_of(obj, ("client_ip", "clientIp")), sanitize.CLIENT_IP_MAX_BYTES),
        "x_forwarded_for": sanitize.clean_text(text_of(obj, ("x_forwarded_for", "xForwardedFor")),
                                               sanitize.XFF_MAX_BYTES),
        "raw_json": raw_json,
    }


def _event(obj: dict[str, Any], instance: str, pricer: Pricer | None, now_ms: int) -> Normalized:
    ts_ms, ts = parse_timestamp(first_present(obj, TIMESTAMP_KEYS), now_ms)
    endpoint, method, path = endpoint_parts(obj)
    provider = text_of(obj, PROVIDER_KEYS).lower()
    executor = text_of(obj, ("executor_type", "executorType", "executor"))
    display_model, resolved_model, models = _models(obj)
    tokens = read_tokens(obj, executor, provider, (resolved_model, display_model))
    auth_index, auth_type = text_of(obj, ("auth_index", "authIndex")), text_of(obj, ("auth_type", "authType"))
    ident = _identity(obj, auth_index, auth_type)
    failed = _failed(obj)
    status, body = _fail_parts(obj)
    meta = parse_headers(_headers_raw(obj), ts_ms, sections=failed)  # full metadata is kept for failures only
    markers = " ".join((executor, provider, auth_type))
    tier, request_tier, response_tier = service_tiers(obj, markers)
    ttft = _optional_ms(obj, ("ttft_ms", "time_to_first_token_ms"))
    request_id = text_of(obj, REQUEST_ID_KEYS)
    latency = _optional_ms(obj, ("latency_ms", "duration_ms", "elapsed_ms"))
    digest = event_hash(_hash_parts(request_id, ts, endpoint, display_model, auth_index, ident, tokens, failed,
                                    latency))
    provider_label, payload_provider, request_type, endpoint_label, method_label, path_label = \
        _request_labels(provider, executor, endpoint, method, path)
    row: dict[str, Any] = {
        "event_hash": digest, "instance": instance, "ts_ms": ts_ms, "ts": ts,
        "request_id": sanitize.clean_unique(request_id, _LABEL), "provider": provider_label,
        "payload_provider": payload_provider, "request_type": request_type, "endpoint": endpoint_label,
        "method": method_label, "path": path_label, **ident, **models,
        "reasoning_effort": _label(text_of(obj, ("reasoning_effort", "reasoningEffort"))),
        "service_tier": _label(tier), "request_service_tier": _label(request_tier),
        "response_service_tier": _label(response_tier), **tokens.columns(),
        "latency_ms": latency, "ttft_ms": ttft,
        "streaming": int(bool(ttft) or "event-stream" in (meta.content_type or "").lower()),
        **_outcome(obj, failed, status, body, meta, provider), "created_ms": now_ms,
    }
    row["est_cost_usd"] = _price(pricer, row)
    return Normalized(row=row, private=_private(obj, failed, body), ledger_hash=bytes.fromhex(digest)[:16])


def _price(pricer: Pricer | None, row: Mapping[str, Any]) -> float:
    return (pricer or Pricer.default()).cost(row)
