"""Normalization of CPA payloads: the reference 1.5 examples (expected values of 3.10), aliases,
timestamps, hash vectors, token accounting, hostile input. Values below are worked out by hand."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings, strategies as st

from datasource import interned
from datasource import rowpack
from datasource.model import Control, Normalized, Rejected
from datasource.normalize import normalize, normalize_obj
from datasource.payload import analytics_model, parse_timestamp, render_ts

NOW = 1_778_000_000_000  # 2026-05-05T16:53:20Z

SUCCESS = r"""{"timestamp":"2026-05-06T10:15:30.123456789+08:00","latency_ms":8421,"ttft_ms":912,
 "source":"alice@example.com","auth_index":"9f2c4e1a7b3d5c60",
 "access_token_sha256":"5d41402abc4b2a76b9719d911017c592ae4f0b0c1c2d3e4f5a6b7c8d9e0f1a2b",
 "client_ip":"192.0.2.10","x_forwarded_for":"","user_agent":"codex_cli_rs/0.50.0",
 "tokens":{"input_tokens":12000,"output_tokens":850,"reasoning_tokens":320,"cached_tokens":9000,
           "cache_read_tokens":9000,"cache_read_tokens_present":true,"cache_creation_tokens":0,"total_tokens":12850},
 "failed":false,"generate":true,"fail":{"status_code":200,"body":""},
 "response_headers":{"Content-Type":["text/event-stream"],"X-Codex-Plan-Type":["plus"],
   "X-Codex-Primary-Used-Percent":["35"],"X-Codex-Primary-Window-Minutes":["300"],"X-Codex-Primary-Reset-After-Seconds":["9000"],
   "X-Codex-Secondary-Used-Percent":["12"],"X-Codex-Secondary-Window-Minutes":["10080"],"X-Codex-Secondary-Reset-After-Seconds":["500000"],
   "X-Request-Id":["req_7f3a"]},
 "accounting_version":2,
 "token_breakdown":{"schema_version":2,"quality":"complete","total_tokens":12850,
   "input":{"total_tokens":12000,"uncached_tokens":3000,"cache_read_tokens":9000,"cache_write_tokens":0},
   "output":{"total_tokens":850,"non_reasoning_tokens":530,"reasoning_tokens":320},"unclassified_tokens":0},
 "provider":"codex","executor_type":"CodexExecutor","model":"gpt-5.4","alias":"gpt-5.4(high)",
 "endpoint":"POST /v1/responses","auth_type":"oauth","api_key":"sk-client-demo-0001","request_id":"a1b2c3d4",
 "reasoning_effort":"high","service_tier":"priority","response_service_tier":"default"}"""

QUOTA_429 = r"""{"timestamp":"2026-05-06T02:20:00.5Z","latency_ms":640,"ttft_ms":0,
 "source":"bob@example.com","auth_index":"4d1e8a2b9c7f3e05","client_ip":"192.0.2.11","x_forwarded_for":"","user_agent":"codex_cli_rs/0.50.0",
 "tokens":{"input_tokens":0,"output_tokens":0,"reasoning_tokens":0,"cached_tokens":0,"cache_read_tokens":0,
           "cache_read_tokens_present":true,"cache_creation_tokens":0,"total_tokens":0},
 "failed":true,"generate":true,
 "fail":{"status_code":429,"body":"{\"error\":{\"type\":\"usage_limit_reached\",\"message\":\"The usage limit has been reached\",\"plan_type\":\"plus\",\"resets_in_seconds\":7200}}"},
 "response_headers":{"Retry-After":["7200"],"X-Codex-Plan-Type":["plus"],"X-Codex-Rate-Limit-Reached-Type":["primary"],
   "X-Codex-Primary-Used-Percent":["100"],"X-Codex-Primary-Window-Minutes":["300"],"X-Codex-Primary-Reset-After-Seconds":["7200"],
   "X-Codex-Secondary-Used-Percent":["64"],"X-Codex-Secondary-Window-Minutes":["10080"],"X-Codex-Secondary-Reset-After-Seconds":["302400"],
   "X-Request-Id":["req_9c21"],"Content-Type":["application/json"]},
 "accounting_version":2,"token_breakdown":{"schema_version":2,"quality":"complete","total_tokens":0,
   "input":{"total_tokens":0,"uncached_tokens":0,"cache_read_tokens":0,"cache_write_tokens":0},
   "output":{"total_tokens":0,"non_reasoning_tokens":0,"reasoning_tokens":0},"unclassified_tokens":0},
 "provider":"codex","executor_type":"CodexExecutor","model":"gpt-5.4","alias":"gpt-5.4","endpoint":"POST /v1/responses",
 "auth_type":"oauth","api_key":"sk-client-demo-0002","request_id":"e5f6a7b8","reasoning_effort":"medium","service_tier":""}"""

AUTH_401 = r"""{"timestamp":"2026-05-06T02:30:12Z","latency_ms":310,"ttft_ms":0,
 "source":"carol@example.com","auth_index":"7aa0c3f19e2b4d88","client_ip":"192.0.2.12","x_forwarded_for":"203.0.113.5","user_agent":"claude-cli/2.0",
 "tokens":{"input_tokens":0,"output_tokens":0,"reasoning_tokens":0,"cached_tokens":0,"cache_read_tokens":0,
           "cache_read_tokens_present":true,"cache_creation_tokens":0,"total_tokens":0},
 "failed":true,"generate":true,
 "fail":{"status_code":401,"body":"{\"error\":{\"message\":\"Your authentication token has been invalidated. Please try signing in again.\",\"type\":\"invalid_request_error\",\"code\":\"token_invalidated\",\"param\":null},\"status\":401}"},
 "response_headers":{"X-Openai-Ide-Error-Code":["token_invalidated"],"Cf-Ray":["8f1e2d3c4b5a6978-SJC"],"X-Request-Id":["req_401x"],"Content-Type":["application/json"]},
 "accounting_version":2,"token_breakdown":{"schema_version":2,"quality":"complete","total_tokens":0,
   "input":{"total_tokens":0,"uncached_tokens":0,"cache_read_tokens":0,"cache_write_tokens":0},
   "output":{"total_tokens":0,"non_reasoning_tokens":0,"reasoning_tokens":0},"unclassified_tokens":0},
 "provider":"codex","executor_type":"CodexExecutor","model":"gpt-5.4-mini","alias":"gpt-5.4-mini","endpoint":"POST /v1/responses",
 "auth_type":"oauth","api_key":"sk-client-demo-0003","request_id":"0c0ffee1","reasoning_effort":"","service_tier":""}"""


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def event(payload: str | bytes | dict, **kw) -> Normalized:
    raw = json.dumps(payload) if isinstance(payload, dict) else payload
    result = normalize(raw, now_ms=NOW, **kw)
    assert isinstance(result, Normalized), result
    return result


TS_SUCCESS = 1_778_033_730_123  # 2026-05-06T02:15:30.123Z
TS_429 = 1_778_034_000_500  # 2026-05-06T02:20:00.5Z
TS_401 = 1_778_034_612_000  # 2026-05-06T02:30:12Z


def test_success_example_matches_reference_3_10() -> None:
    r = event(SUCCESS).row
    assert r["ts"] == "2026-05-06T02:15:30.123456789Z" and r["ts_ms"] == TS_SUCCESS
    assert (r["model"], r["resolved_model"], r["analytics_model"], r["billing_model"]) == (
        "gpt-5.4(high)", "gpt-5.4", "gpt-5.4", "gpt-5.4")
    assert r["cache_input_mode"] == "included_in_input"
    assert (r["norm_input_tokens"], r["norm_cache_read_tokens"], r["norm_uncached_tokens"],
            r["compat_cached_tokens"]) == (12000, 9000, 3000, 0)
    assert (r["input_tokens"], r["output_tokens"], r["reasoning_tokens"], r["cached_tokens"],
            r["cache_read_tokens"], r["cache_creation_tokens"], r["total_tokens"]) == (
        12000, 850, 320, 9000, 9000, 0, 12850)
    assert (r["service_tier"], r["request_service_tier"], r["response_service_tier"]) == (
        "priority", "priority", "default")
    assert r["source"] == "ali***@example.com" == r["account"]
    assert r["source_hash"] == sha("alice@example.com")
    assert r["source_hash"].startswith("ff8d9819") and r["source_hash"].endswith("c6d976")
    assert r["api_key_hash"] == "faa210d78e64b975e87ea4585883b7f8c8d5b0c95719a5d70ba0c3a348bc5e24"
    assert r["api_key_masked"] == "sk******01"
    assert (r["failed"], r["status_code"], r["status_class"], r["failure_type"]) == (0, 200, "success", "none")
    assert r["fail_summary"] is None and r["response_meta"] is None  # deviation: no summary for successes
    assert (r["quota_plan"], r["quota_used_pct"], r["quota_window"]) == ("plus", 35.0, "five_hour")
    assert r["quota_recover_at_ms"] == TS_SUCCESS + 9000 * 1000
    assert (r["error_kind"], r["error_code"], r["retry_after_s"]) == (None, None, None)
    assert r["trace_id"] == "req_7f3a"
    assert r["cache_state"] == "hit"
    assert (r["latency_ms"], r["ttft_ms"], r["streaming"]) == (8421, 912, 1)
    assert (r["provider"], r["payload_provider"], r["request_type"]) == ("codex", "codex", "CodexExecutor")
    assert (r["endpoint"], r["method"], r["path"]) == ("POST /v1/responses", "POST", "/v1/responses")
    assert r["account_key"] == "9f2c4e1a7b3d5c60" and r["request_id"] == "a1b2c3d4"
    assert (r["action"], r["action_reason"]) == (None, None)
    assert r["est_cost_usd"] == pytest.approx(0.045)  # reference 6.4 with the default gpt-5.4 price
    assert r["created_ms"] == NOW and r["instance"] == "default"


def test_success_private_part_keeps_only_client_address() -> None:
    n = event(SUCCESS)
    assert n.private == {"fail_body": None, "client_ip": "192.0.2.10", "x_forwarded_for": None, "raw_json": None}
    assert n.ledger_hash == bytes.fromhex(n.row["event_hash"])[:16]


def test_quota_429_example_matches_reference_3_10() -> None:
    n = event(QUOTA_429)
    r = n.row
    assert r["ts"] == "2026-05-06T02:20:00.5Z" and r["ts_ms"] == TS_429
    assert (r["model"], r["resolved_model"], r["analytics_model"]) == ("gpt-5.4", "gpt-5.4", "gpt-5.4")
    assert (r["cache_input_mode"], r["norm_input_tokens"], r["cache_state"]) == ("included_in_input", 0, "miss")
    assert r["service_tier"] is None
    assert r["source"] == "bob***@example.com"
    assert (r["failed"], r["status_code"], r["status_class"], r["failure_type"]) == (1, 429, "failed", "quota")
    assert (r["quota_plan"], r["quota_used_pct"], r["quota_window"]) == ("plus", 100.0, "five_hour")
    assert r["quota_recover_at_ms"] == TS_429 + 7200 * 1000
    assert (r["error_kind"], r["error_code"], r["retry_after_s"]) == ("rate_limit", "retry_after", 7200)
    assert r["trace_id"] == "req_9c21"
    assert r["streaming"] == 0
    body = json.loads(QUOTA_429)["fail"]["body"]
    summary_body, header_json = r["fail_summary"].split("\n")
    assert summary_body == body  # nothing secret in it
    assert json.loads(header_json)["X-Codex-Rate-Limit-Reached-Type"] == ["primary"]
    meta = json.loads(r["response_meta"])
    assert meta["quota"]["reached"] == {"name": "primary", "window": "five_hour"}
    assert meta["quota"]["secondary"]["window"] == "weekly"
    assert (r["action"], r["action_reason"]) == ("wait_quota_reset", "quota_exhausted")
    assert n.private["fail_body"] == body
    raw = json.loads(n.private["raw_json"])
    assert raw["api_key"] == "[redacted]" and raw["source"] == "bob***@example.com"


def test_auth_401_example_matches_reference_3_10() -> None:
    n = event(AUTH_401)
    r = n.row
    assert r["ts_ms"] == TS_401 and r["ts"] == "2026-05-06T02:30:12Z"
    assert r["model"] == r["analytics_model"] == r["resolved_model"] == "gpt-5.4-mini"
    assert r["source"] == "car***@example.com"
    assert (r["failed"], r["status_code"], r["status_class"], r["failure_type"]) == (1, 401, "failed", "auth")
    assert (r["quota_plan"], r["quota_used_pct"], r["quota_recover_at_ms"]) == (None, None, None)
    assert (r["error_kind"], r["error_code"]) == ("auth", "token_invalidated")
    assert r["trace_id"] == "req_401x"  # x-request-id beats cf-ray
    assert (r["action"], r["action_reason"]) == ("reauth", "token_revoked")
    assert r["fail_summary"].startswith('{"error":{"message":"Your authentication token has been invalidated.')
    assert n.private["x_forwarded_for"] == "203.0.113.5" and n.private["client_ip"] == "192.0.2.12"


def test_row_has_exactly_the_events_columns(conn) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")} - {"id"} - set(interned.ID_COLUMNS)
    for payload in (SUCCESS, QUOTA_429, AUTH_401, "{}"):
        n = event(payload)
        assert set(n.row) == columns - {"ts_sub_ns"}  # written by rowpack.pack on insert (schema step 4)
        assert set(rowpack.pack(n.row)) == columns
        assert set(n.private) == {"fail_body", "client_ip", "x_forwarded_for", "raw_json"}


# --- hash (reference 3.3) -----------------------------------------------------------

VECTOR = {"timestamp": "2026-05-06T00:00:00Z", "endpoint": "POST /v1/chat/completions", "model": "gpt-test",
          "auth_index": "auth-1", "input_tokens": 10, "output_tokens": 5}


def test_hash_test_vectors() -> None:
    assert event(VECTOR).row["event_hash"] == "9c788605e1c2526821991ed86b583373f23ad411b29052ebe9787b595be7bc60"
    assert sha("|2026-05-06T00:00:00Z|POST /v1/chat/completions|gpt-test|auth-1||10|5|0|0|false") == \
        "9c788605e1c2526821991ed86b583373f23ad411b29052ebe9787b595be7bc60"
    with_latency = {**VECTOR, "latency_ms": 1500}
    assert event(with_latency).row["event_hash"] == \
        "447c790b501acca1816bdf1f9c6672f567f59cde92f3fa9021295d15d4937298"


def test_hash_uses_nanosecond_timestamp_and_same_instant_in_any_offset() -> None:
    a = event({**VECTOR, "timestamp": "2026-05-06T08:00:00.000000001+08:00"}).row
    b = event({**VECTOR, "timestamp": "2026-05-06T00:00:00.000000001Z"}).row
    c = event({**VECTOR, "timestamp": "2026-05-06T00:00:00.000000002Z"}).row
    assert a["ts"] == "2026-05-06T00:00:00.000000001Z"
    assert a["event_hash"] == b["event_hash"] != c["event_hash"]
    assert a["ts_ms"] == c["ts_ms"] == 1_778_025_600_000
    parts = "|2026-05-06T00:00:00.000000001Z|POST /v1/chat/completions|gpt-test|auth-1||10|5|0|0|false"
    assert a["event_hash"] == sha(parts)


def test_hash_includes_request_id_source_hash_cached_and_failed() -> None:
    payload = {**VECTOR, "request_id": "r1", "source": "x@y.io", "cached_tokens": 3, "cache_tokens": 7,
               "failed": True, "latency_ms": 0}
    parts = (f"r1|2026-05-06T00:00:00Z|POST /v1/chat/completions|gpt-test|auth-1|{sha('x@y.io')}"
             "|10|5|0|7|true|0")
    assert event(payload).row["event_hash"] == sha(parts)


# --- timestamps ------------------------------------------------------------------------


@pytest.mark.parametrize("value, ms, text", [
    ("2026-05-06T00:00:00Z", 1_778_025_600_000, "2026-05-06T00:00:00Z"),
    ("2026-05-06T00:00:00.120Z", 1_778_025_600_120, "2026-05-06T00:00:00.12Z"),
    ("2026-05-06T00:00:00.1234567891234Z", 1_778_025_600_123, "2026-05-06T00:00:00.123456789Z"),
    ("2026-05-06T05:30:00+05:30", 1_778_025_600_000, "2026-05-06T00:00:00Z"),
    ("2026-05-05T19:00:00-05:00", 1_778_025_600_000, "2026-05-06T00:00:00Z"),
    ("2026-05-06 00:00:00", 1_778_025_600_000, "2026-05-06T00:00:00Z"),
    ("2026-05-06T00:00:00", 1_778_025_600_000, "2026-05-06T00:00:00Z"),
    (1_778_025_600, 1_778_025_600_000, "2026-05-06T00:00:00Z"),
    (1_778_025_600.25, 1_778_025_600_250, "2026-05-06T00:00:00.25Z"),
    ("1778025600", 1_778_025_600_000, "2026-05-06T00:00:00Z"),
    (1_778_025_600_001, 1_778_025_600_001, "2026-05-06T00:00:00.001Z"),
    ("not a time", NOW, "2026-05-05T16:53:20Z"),
    ("2026-13-01T00:00:00Z", NOW, "2026-05-05T16:53:20Z"),
    (None, NOW, "2026-05-05T16:53:20Z"),
    (True, NOW, "2026-05-05T16:53:20Z"),
    (1e300, NOW, "2026-05-05T16:53:20Z"),
    (-5, NOW, "2026-05-05T16:53:20Z"),
])
def test_parse_timestamp(value, ms, text) -> None:
    assert parse_timestamp(value, NOW) == (ms, text)


def test_render_ts_drops_trailing_zeros() -> None:
    assert render_ts(1_778_025_600_500) == "2026-05-06T00:00:00.5Z"
    assert render_ts(0) == "1970-01-01T00:00:00Z"


def test_timestamp_alias_keys_first_present_wins() -> None:
    assert event({"created_at": 1_778_025_600}).row["ts_ms"] == 1_778_025_600_000
    assert event({"requestTime": "2026-05-06T00:00:00Z"}).row["ts_ms"] == 1_778_025_600_000
    # `time` comes before `created_at`: present but unparseable means now
    assert event({"time": "junk", "created_at": 1_778_025_600}).row["ts_ms"] == NOW


# --- alias keys (reference 3.1) ---------------------------------------------------------------


def test_alias_keys() -> None:
    r = event({"requestedModel": "m-req", "modelName": "m-res", "authType": "apikey", "apiKey": "k-123456",
               "requestId": "rid", "projectId": "proj", "method": "PUT", "url_path": "/x"}).row
    assert (r["model"], r["resolved_model"], r["billing_model"]) == ("m-req", "m-res", "m-res")
    assert r["provider"] == "apikey"  # provider falls back to auth_type
    assert r["request_id"] == "rid" and r["project_id"] == "proj"
    assert (r["endpoint"], r["method"], r["path"]) == ("PUT /x", "PUT", "/x")
    assert r["api_key_hash"] == sha("k-123456") and r["api_key_masked"] == "k-******56"
    # raw source falls back to the api key: masked as a secret-shaped value? No (short, no sk- prefix)
    assert r["source"] == "k-123456" and r["source_hash"] == sha("k-123456")
    assert r["account_key"] == "src:" + sha("k-123456")[:16]


def test_first_present_key_wins_even_when_empty() -> None:
    r = event({"alias": "", "model": "gpt-x", "source": "", "api_key": "sk-abcdef123456"}).row
    assert r["model"] == "gpt-x"  # empty alias: display falls back to resolved
    assert r["source"] is None and r["source_hash"] is None  # source "" is present: no fallback to api_key
    assert r["account_key"] == "-"


def test_endpoint_parsing_and_default() -> None:
    assert event({"api": "GET /v1/models"}).row["method"] == "GET"
    r = event({}).row
    assert (r["endpoint"], r["model"], r["analytics_model"], r["billing_model"], r["provider"]) == (
        "-", "-", "-", "-", "unknown")


def test_provider_is_lower_cased() -> None:
    assert event({"provider": "OpenRouter"}).row["provider"] == "openrouter"


def test_failed_flag_fallbacks() -> None:
    assert event({"is_failed": "true"}).row["failed"] == 1
    assert event({"success": False}).row["failed"] == 1
    assert event({"ok": True}).row["failed"] == 0
    assert event({"http_status": 502}).row["failed"] == 1
    assert event({"status_code": 200}).row["failed"] == 0
    assert event({"error_message": "boom"}).row["failed"] == 1
    assert event({}).row["failed"] == 0


def test_fail_status_fallback_and_latency_presence() -> None:
    r = event({"failed": True, "fail_status_code": 503, "fail_body": "upstream overloaded", "duration_ms": 0}).row
    assert (r["status_code"], r["failure_type"], r["latency_ms"], r["ttft_ms"]) == (503, "upstream", 0, None)
    assert r["fail_summary"] == "upstream overloaded"


def test_api_key_mask_short_key() -> None:
    assert event({"api_key": " abc "}).row["api_key_masked"] == "a********c"
    assert event({"api_key": " abc "}).row["api_key_hash"] == sha("abc")


# --- models (reference 3.7) ------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [
    ("deepseek-v4-flash(max)", "deepseek-v4-flash"),
    ("gpt-5.4(high)", "gpt-5.4"),
    ("gpt-5.4(HIGH)", "gpt-5.4"),
    ("m(-1)", "m"),
    ("m(8192)", "m"),
    ("m(+5)", "m"),
    ("m(007)", "m"),
    ("m(-000)", "m"),
    ("m(9223372036854775807)", "m"),
    ("m(9223372036854775808)", "m(9223372036854775808)"),
    ("custom-model(auto-tuned)", "custom-model(auto-tuned)"),
    ("custom-model( high)", "custom-model( high)"),
    ("custom-model(-01)", "custom-model(-01)"),
    ("m(1_000)", "m(1_000)"),
    ("m( 5)", "m( 5)"),
    ("m()", "m()"),
    ("(high)", "(high)"),
    ("custom(model)(high)", "custom(model)"),
    ("plain", "plain"),
])
def test_analytics_model_suffix_rules(model: str, expected: str) -> None:
    assert analytics_model(model) == expected


# --- tokens and cache accounting ---------------------------------------------------------------


def test_claude_cache_is_separate_from_input() -> None:
    r = event({"executor_type": "ClaudeExecutor", "model": "claude-sonnet-4-5",
               "tokens": {"input_tokens": 100, "output_tokens": 50, "cache_read_tokens": 1000,
                          "cache_creation_tokens": 200, "cached_tokens": 1000}}).row
    assert r["cache_input_mode"] == "separate_from_input"
    # compat = max(1000 - (1000 + 200), 0) = 0; norm read = 1000; total input = 100 + 1000 + 200
    assert (r["compat_cached_tokens"], r["norm_cache_read_tokens"], r["norm_input_tokens"],
            r["norm_uncached_tokens"]) == (0, 1000, 1300, 100)
    assert r["total_tokens"] == 1300 + 50  # back-filled: total was absent


def test_token_aliases_and_containers() -> None:
    r = event({"usage": {"prompt_tokens": 40, "completion_tokens": "7", "cache_read_input_tokens": 10,
                         "cache_write_input_tokens": 4.9}, "input_tokens": 99, "total": 60}).row
    assert (r["input_tokens"], r["output_tokens"], r["cache_read_tokens"], r["cache_creation_tokens"]) == (
        40, 7, 10, 4)
    assert r["total_tokens"] == 60
    # no provider/model markers, cache read > 0: separate
    assert r["cache_input_mode"] == "separate_from_input" and r["norm_input_tokens"] == 54


def test_first_non_zero_token_wins_across_containers() -> None:
    r = event({"tokens": {"input_tokens": 0}, "usage": {"input_tokens": 12}}).row
    assert r["input_tokens"] == 12


def test_explicit_cache_mode_and_compat_cached() -> None:
    r = event({"provider": "claude", "tokens": {"cache_input_mode": "included_in_input", "input_tokens": 100,
                                                "cached_tokens": 30, "cache_read_tokens": 10}}).row
    # compat = 30 - 10 = 20; norm read = 30; uncached = 100 - 30 = 70
    assert (r["cache_input_mode"], r["compat_cached_tokens"], r["norm_cache_read_tokens"],
            r["norm_uncached_tokens"], r["norm_input_tokens"]) == ("included_in_input", 20, 30, 70, 100)


@pytest.mark.parametrize("fields, mode", [
    ({"executor_type": "OpenAICompatExecutor", "provider": "claude"}, "included_in_input"),
    ({"provider": "anthropic"}, "separate_from_input"),
    ({"provider": "vertex"}, "included_in_input"),
    ({"model": "claude-opus-4-6"}, "separate_from_input"),
    ({"model": "grok-4"}, "included_in_input"),
    ({"model": "mystery"}, "included_in_input"),
])
def test_cache_input_mode_rules(fields: dict, mode: str) -> None:
    assert event(fields).row["cache_input_mode"] == mode


def test_service_tier_non_codex_prefers_response() -> None:
    r = event({"provider": "openai", "service_tier": "auto", "response_service_tier": "flex"}).row
    assert (r["service_tier"], r["request_service_tier"], r["response_service_tier"]) == ("flex", "auto", "flex")


def test_streaming_from_content_type_without_ttft() -> None:
    r = event({"ttft_ms": 0, "response_headers": {"Content-Type": ["text/event-stream; charset=utf-8"]}}).row
    assert (r["streaming"], r["ttft_ms"]) == (1, 0)


# --- control payloads and rejects ------------------------------------------------------------------


def test_control_payloads() -> None:
    assert normalize(b'{"support_refresh":true}') == Control("support_refresh")
    assert normalize(b'{"refresh":true}') == Control("refresh")
    assert isinstance(normalize(b'{"refresh":false}', now_ms=NOW), Normalized)
    assert isinstance(normalize(b'{"refresh":true,"x":1}', now_ms=NOW), Normalized)


@pytest.mark.parametrize("raw, reason", [
    (b"[1,2]", "payload is a JSON array, not an object"),
    (b'"hello"', "payload is a JSON string, not an object"),
    (b"42", "payload is a JSON number, not an object"),
    (b"null", "payload is a JSON null, not an object"),
    (b"true", "payload is a JSON boolean, not an object"),
    (b"\xff\xfe{}", "payload is not valid UTF-8 (byte 0)"),
])
def test_rejects_with_reason(raw: bytes, reason: str) -> None:
    result = normalize(raw)
    assert result == Rejected(reason, raw)


@pytest.mark.parametrize("raw, prefix", [
    (b'{"a":', "payload is not valid JSON"),
    (b"", "payload is not valid JSON"),
    (b'{"a": NaN}', "payload is not valid JSON"),
    (b'{"a":"x\x01y"}', "payload is not valid JSON"),
    (b'{"n": 1' + b"0" * 5000 + b"}", "payload is not valid JSON"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "payload JSON is nested deeper than 32 levels"),
    (b"[" * 100000 + b"]" * 100000, "payload JSON is nested too deeply"),
], ids=["truncated", "empty", "nan", "control-char", "huge-int", "deep-40", "deep-100000"])
def test_hostile_json_is_rejected(raw: bytes, prefix: str) -> None:
    result = normalize(raw)
    assert isinstance(result, Rejected) and result.reason.startswith(prefix)


def test_oversized_payload_rejected() -> None:
    raw = b'{"a":"' + b"x" * (10 * 1024 * 1024) + b'"}'
    result = normalize(raw)
    assert isinstance(result, Rejected) and result.reason == "payload is larger than 10485760 bytes"


def test_normalize_obj_rejects_non_objects() -> None:
    assert normalize_obj([1], b"[1]") == Rejected("payload is a JSON array, not an object", b"[1]")


def test_hostile_values_give_a_sane_event() -> None:
    payload = json.dumps({"tokens": {"input_tokens": 1e308, "output_tokens": -5, "reasoning_tokens": "1_000",
                                     "total_tokens": 10**30}, "latency_ms": "abc", "model": "gpt\u0000\u202e-x\n",
                          "source": "\ud800lone", "user_agent": "a\u200bb\t\tc" + "z" * 2000, "timestamp": 0})
    r = event(payload.replace('"timestamp": 0', '"timestamp": 1e400')).row
    assert (r["input_tokens"], r["output_tokens"], r["reasoning_tokens"], r["total_tokens"]) == (0, 0, 0, 0)
    assert r["latency_ms"] == 0 and r["ts_ms"] == NOW
    assert r["model"] == "gpt -x"
    assert r["source"] == "\ufffdlone"
    ua = r["user_agent"]
    assert ua.startswith("a b c") and len(ua.encode()) == 1024 and ua.endswith("...")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
keys = st.sampled_from(["timestamp", "tokens", "usage", "fail", "failed", "response_headers", "model", "alias",
                        "source", "api_key", "latency_ms", "ttft_ms", "provider", "executor_type", "endpoint",
                        "input_tokens", "service_tier", "auth_index", "headers", "status_code"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=10))
def test_property_any_object_normalizes_without_raising(obj: dict) -> None:
    raw = json.dumps(obj).encode()
    result = normalize(raw, now_ms=NOW)
    assert isinstance(result, (Normalized, Control))
    if isinstance(result, Normalized):
        assert len(result.row["event_hash"]) == 64
        assert result.row["failure_type"] in ("none", "auth", "quota", "rate_limit", "client", "upstream",
                                              "timeout", "other")
        json.dumps(result.row)  # every value is JSON/SQLite friendly


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_property_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert isinstance(normalize(raw, now_ms=NOW), (Normalized, Control, Rejected))


def test_planted_secrets_never_reach_the_row_or_raw_json() -> None:
    payload = {
        "timestamp": "2026-05-06T00:00:00Z", "provider": "openai", "model": "gpt-5.4",
        "api_key": "sk-client-PLANTED1", "source": "sk-upstream-PLANTED2-abcdefgh", "failed": True,
        "fail": {"status_code": 401, "body": '{"error":"bad key sk-PLANTED3x","authorization":"Bearer PLANTED4x"}'},
        "response_headers": {"Authorization": ["Bearer PLANTED5x"], "Set-Cookie": ["sid=PLANTED6"],
                             "X-Api-Key": ["PLANTED7"], "X-Request-Id": ["req_ok"]},
        "access_token": "PLANTED8",
    }
    n = event(payload)
    assert "PLANTED" not in json.dumps(n.row)
    assert "PLANTED" not in n.private["raw_json"]
    assert n.private["fail_body"] == payload["fail"]["body"]  # the private table keeps the raw body
    assert n.row["source"] == "m:sk-u...efgh" and n.row["api_key_masked"] == "sk******D1"
    assert n.row["trace_id"] == "req_ok"
