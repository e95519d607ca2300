"""Response-header metadata (reference 3.8): quota windows, error classes, trace ids, drops."""

from __future__ import annotations

import json

from datasource.headers import HeaderMeta, header_values, parse_headers, parse_time_ms, safe_headers

T = 1_778_034_000_500  # event time, ms


def test_quota_summary_window_is_highest_used_percent() -> None:
    m = parse_headers({"X-Codex-Plan-Type": ["pro"],
                       "X-Codex-Primary-Used-Percent": ["20"], "X-Codex-Primary-Window-Minutes": ["300"],
                       "X-Codex-Primary-Reset-After-Seconds": ["100"],
                       "X-Codex-Secondary-Used-Percent": ["80.5"], "X-Codex-Secondary-Window-Minutes": ["43200"],
                       "X-Codex-Secondary-Reset-At": ["2026-06-01T00:00:00Z"]}, T)
    assert (m.quota_plan, m.quota_used_pct, m.quota_window) == ("pro", 80.5, "monthly")
    assert m.quota_recover_at_ms == 1_780_272_000_000  # 2026-06-01T00:00:00Z
    assert m.meta["quota"]["primary"]["recover_at_ms"] == T + 100_000
    assert m.quota_reached is False


def test_quota_tie_goes_to_later_reset_and_reached_window_without_type() -> None:
    m = parse_headers({"x-codex-primary-used-percent": "100", "x-codex-primary-reset-after-seconds": "60",
                       "x-codex-secondary-used-percent": "100", "x-codex-secondary-reset-after-seconds": "600",
                       "x-codex-secondary-window-minutes": "10080"}, T)
    assert m.quota_recover_at_ms == T + 600_000
    assert m.quota_reached and m.quota_window == "weekly"
    assert m.meta["quota"]["reached"] == {"name": "secondary", "window": "weekly"}


def test_reset_at_epoch_forms() -> None:
    assert parse_time_ms("1780272000000") == 1_780_272_000_000
    assert parse_time_ms("1780272000") == 1_780_272_000_000
    assert parse_time_ms("Mon, 01 Jun 2026 00:00:00 GMT") == 1_780_272_000_000
    assert parse_time_ms("12") is None and parse_time_ms("soon") is None and parse_time_ms("") is None


def test_error_classification_order() -> None:
    auth = parse_headers({"X-Openai-Ide-Root-Error-Code": ["ACCOUNT_DEACTIVATED"],
                          "X-Openai-Ide-Error-Code": ["token_revoked"], "Retry-After": ["5"]}, T)
    assert (auth.error_kind, auth.error_code) == ("auth", "account_deactivated")
    ident = parse_headers({"x-openai-authorization-error": "identity_edge_internal_error"}, T)
    assert (ident.error_kind, ident.error_code) == ("identity", "identity_edge_internal_error")
    bypass = parse_headers({"x-ratelimit-bypass": "org", "retry-after": "5"}, T)
    assert (bypass.error_kind, bypass.error_code) == ("rate_limit", "org")
    retry = parse_headers({"Retry-After": ["30"]}, T)
    assert (retry.error_kind, retry.error_code, retry.retry_after_s) == ("rate_limit", "retry_after", 30)
    assert retry.meta["errors"]["retry_after_recover_at_ms"] == T + 30_000
    unknown = parse_headers({"x-openai-ide-error-code": "something_else"}, T)
    assert (unknown.error_kind, unknown.error_code) == (None, None)


def test_retry_after_http_date() -> None:
    m = parse_headers({"Retry-After": ["Wed, 06 May 2026 02:21:00 GMT"]}, T)
    assert m.retry_after_s == 59  # 02:21:00 - 02:20:00.5, floored
    assert m.should_retry is None
    assert parse_headers({"X-Should-Retry": ["false"]}, T).should_retry is False


def test_trace_id_precedence_and_traceparent() -> None:
    m = parse_headers({"Cf-Ray": ["ray1"], "X-Request-Id": ["req1"], "X-Oai-Request-Id": ["oai1"]}, T)
    assert m.trace_id == "oai1"
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_headers({"traceparent": [tp]}, T).trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parse_headers({"traceparent": ["ff" + tp[2:]]}, T).trace_id is None
    zero = "00-" + "0" * 32 + "-00f067aa0ba902b7-01"
    assert parse_headers({"traceparent": [zero]}, T).trace_id is None
    assert parse_headers({"traceparent": ["garbage"]}, T).trace_id is None


def test_secret_headers_dropped_and_values_sanitized() -> None:
    raw = {"Authorization": ["Bearer SECRET1"], "Set-Cookie": ["SECRET2"], "X-Auth-Token": ["SECRET3"],
           "X-Client-Secret": ["SECRET4"], "X-Ratelimit-Remaining-Tokens": ["900"],
           "X-Openai-Authorization-Error": ["nope"], "Server": ["edge sk-SECRET5abcdef\u0000"]}
    values = header_values(raw)
    assert values == {"x-ratelimit-remaining-tokens": "900", "x-openai-authorization-error": "nope",
                      "server": "edge [redacted]"}
    assert set(safe_headers(raw)) == {"X-Ratelimit-Remaining-Tokens", "X-Openai-Authorization-Error", "Server"}
    meta = parse_headers(raw, T)
    assert "SECRET" not in (meta.to_json() or "")
    assert meta.meta["rate_limit"] == {"x-ratelimit-remaining-tokens": 900}
    assert meta.meta["routing"] == {"server": "edge [redacted]"}


def test_value_cap_and_other_sections() -> None:
    m = parse_headers({"Content-Type": ["text/event-stream"], "Content-Length": ["abc"],
                       "Via": ["v" * 2000], "X-Data-Retention": ["NONE"], "X-Zero-Retention": ["true"],
                       "X-Ratelimit-Limit-Requests": ["-1"]}, T)
    assert m.content_type == "text/event-stream"
    assert m.meta["response"] == {"content-type": "text/event-stream"}
    assert len(m.meta["routing"]["via"]) == 1024 and m.meta["routing"]["via"].endswith("...")
    assert m.meta["data_policy"] == {"data_retention": "none", "zero_data_retention": True}
    assert "rate_limit" not in m.meta


def test_empty_and_malformed_headers() -> None:
    assert parse_headers(None, T) == HeaderMeta()
    assert parse_headers(["not", "a", "map"], T) == HeaderMeta()
    assert parse_headers({"X-Request-Id": [None, 5, {"a": 1}]}, T).trace_id == "5"
    assert HeaderMeta().to_json() is None
    assert json.loads(parse_headers({"x-request-id": "r"}, T).to_json()) == {"trace": {"x-request-id": "r"}}
