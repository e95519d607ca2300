"""TrafficGenerator: CPA payload shape, token semantics, determinism, rates and the failure mix."""

from __future__ import annotations

import collections
import json
import re
from datetime import datetime

import pytest

from datasource.traffic import BURST_LEN_MS, BURST_PERIOD_MS, TrafficGenerator
from datasource.traffic_tokens import lognormal

START = 1_780_000_000_000  # 2026-05-28T20:26:40Z
DAY = 86_400_000
KEYS = ["timestamp", "latency_ms", "ttft_ms", "source", "auth_index", "access_token_sha256", "client_ip",
        "x_forwarded_for", "user_agent", "tokens", "failed", "generate", "fail", "response_headers",
        "accounting_version", "token_breakdown", "provider", "executor_type", "model", "alias", "endpoint",
        "auth_type", "api_key", "request_id", "reasoning_effort", "service_tier", "response_service_tier"]
TOKEN_KEYS = ["input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens", "cache_read_tokens",
              "cache_read_tokens_present", "cache_creation_tokens", "total_tokens"]
RFC3339NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?\+08:00$")


@pytest.fixture(scope="module")
def day() -> list[dict]:
    return list(TrafficGenerator(seed=7).payloads(20_000, START, START + DAY))


def _epoch_ms(ts: str) -> int:
    base, _, rest = ts.partition(".")
    frac = rest[:-6] if rest else ""
    zone = ts[-6:]
    if not rest:
        base = ts[:-6]
    return int(datetime.fromisoformat(base + zone).timestamp() * 1000) + int((frac + "000")[:3] or 0)


def test_exact_shape_and_key_order(day):
    for p in day:
        expected = [k for k in KEYS if k in p]
        assert list(p) == expected
        assert set(KEYS) - set(p) <= {"access_token_sha256", "response_service_tier"}
        assert list(p["tokens"]) == TOKEN_KEYS and p["tokens"]["cache_read_tokens_present"] is True
        assert p["accounting_version"] == 2 and p["generate"] is True
        assert re.fullmatch(r"[0-9a-f]{16}", p["auth_index"]) and re.fullmatch(r"[0-9a-f]{8}", p["request_id"])
        assert ("access_token_sha256" in p) == (p["auth_type"] == "oauth")
        assert p["fail"]["status_code"] == 200 if not p["failed"] else p["fail"]["status_code"] >= 400


def test_timestamps_are_rfc3339nano_with_offset_and_inside_the_window(day):
    times = []
    for p in day:
        assert RFC3339NANO.match(p["timestamp"]), p["timestamp"]
        times.append(_epoch_ms(p["timestamp"]))
    assert START <= min(times) and max(times) < START + DAY + 200_000  # retries start after the failure
    assert _epoch_ms("2026-05-29T04:26:40.5+08:00") == START + 500


def test_token_accounting_follows_each_providers_semantics(day):
    for p in day:
        t, b = p["tokens"], p["token_breakdown"]
        assert b["input"]["total_tokens"] == (b["input"]["uncached_tokens"] + b["input"]["cache_read_tokens"]
                                              + b["input"]["cache_write_tokens"])
        assert b["output"]["total_tokens"] == b["output"]["non_reasoning_tokens"] + b["output"]["reasoning_tokens"]
        assert b["total_tokens"] == b["input"]["total_tokens"] + b["output"]["total_tokens"] == t["total_tokens"]
        assert t["cached_tokens"] == t["cache_read_tokens"] == b["input"]["cache_read_tokens"]
        if p["provider"] in ("codex", "openrouter"):  # subset: cache in input, reasoning in output
            assert t["total_tokens"] == t["input_tokens"] + t["output_tokens"]
            assert t["reasoning_tokens"] <= t["output_tokens"] and t["cache_creation_tokens"] == 0
        elif p["provider"] == "claude":  # independent
            assert t["total_tokens"] == (t["input_tokens"] + t["cache_read_tokens"] + t["cache_creation_tokens"]
                                         + t["output_tokens"] + t["reasoning_tokens"])
        else:  # gemini / vertex: separate reasoning
            assert t["total_tokens"] == t["input_tokens"] + t["output_tokens"] + t["reasoning_tokens"]
        if p["failed"]:
            assert t["total_tokens"] == 0 and p["ttft_ms"] == 0


def test_deterministic_for_a_seed():
    a = list(TrafficGenerator(seed=11).events(500, START, START + DAY))
    b = list(TrafficGenerator(seed=11).events(500, START, START + DAY))
    c = list(TrafficGenerator(seed=12).events(500, START, START + DAY))
    assert a == b and a != c
    assert [json.loads(x) for x in a] == list(TrafficGenerator(seed=11).payloads(500, START, START + DAY))


def test_dimensions_and_mix(day):
    assert len(day) == 20_000
    assert len({p["api_key"] for p in day}) == 10
    assert len({p["model"] for p in day}) == 12
    assert len({p["auth_index"] for p in day}) == 19  # 20 accounts, one disabled
    assert {p["provider"] for p in day} == {"codex", "claude", "gemini", "vertex", "openrouter"}
    assert any(p["alias"].endswith("(high)") and p["reasoning_effort"] == "high" for p in day)
    streaming = [p for p in day if not p["failed"] and p["response_headers"]["Content-Type"] == ["text/event-stream"]]
    assert 0.4 < len(streaming) / len(day) < 0.9
    assert 0.2 < sum(p["tokens"]["cache_read_tokens"] > 0 for p in day) / len(day) < 0.8
    latencies = sorted(p["latency_ms"] for p in day if not p["failed"])
    assert 1000 < latencies[len(latencies) // 2] < 60_000
    assert all(0 < p["ttft_ms"] <= p["latency_ms"] for p in day if not p["failed"])


def test_failure_rate_without_bursts():
    payloads = list(TrafficGenerator(seed=5, failure_rate=0.05, bursts=False).payloads(20_000, START, START + DAY))
    share = sum(p["failed"] for p in payloads) / len(payloads)
    assert 0.04 < share < 0.06
    none = list(TrafficGenerator(seed=5, failure_rate=0.0, bursts=False).payloads(2_000, START, START + DAY))
    assert not any(p["failed"] for p in none)


def test_failure_statuses_bodies_and_headers(day):
    failed = [p for p in day if p["failed"]]
    statuses = collections.Counter(p["fail"]["status_code"] for p in failed)
    assert set(statuses) <= {400, 401, 403, 408, 429, 500, 502, 503, 504, 529}
    assert {401, 403, 429, 500, 503} <= set(statuses)
    assert all(p["provider"] == "claude" for p in failed if p["fail"]["status_code"] == 529)
    quota = [p for p in failed if "usage_limit_reached" in p["fail"]["body"]]
    assert quota and all(p["response_headers"]["X-Codex-Primary-Used-Percent"] == ["100"]
                         and p["response_headers"]["Retry-After"] for p in quota)
    rate = [p for p in failed if "rate_limit_exceeded" in p["fail"]["body"]]
    assert rate and all(5 <= int(p["response_headers"]["Retry-After"][0]) <= 60 for p in rate)
    revoked = [p for p in failed if p["provider"] == "codex" and p["fail"]["status_code"] == 401]
    assert revoked and all(p["response_headers"]["X-Openai-Ide-Error-Code"] == ["token_invalidated"]
                           for p in revoked if "token_invalidated" in p["fail"]["body"])
    for p in failed:
        json.loads(p["fail"]["body"])  # realistic bodies are upstream JSON


def test_failover_attempts_share_a_request_id(day):
    by_request = collections.defaultdict(list)
    for p in day:
        by_request[p["request_id"]].append(p)
    pairs = [v for v in by_request.values() if len(v) == 2]
    assert len(pairs) > 20
    for first, retry in pairs:
        assert first["failed"] and not retry["failed"]
        assert first["auth_index"] != retry["auth_index"] and first["provider"] == retry["provider"]
        assert first["api_key"] == retry["api_key"]


def test_a_burst_concentrates_failures_on_one_account():
    gen = TrafficGenerator(seed=7)
    slot = next(s for s in range(START // BURST_PERIOD_MS, START // BURST_PERIOD_MS + 48)
                if gen._burst_plan(s) is not None)
    start, end, account = gen._burst_plan(slot)
    assert end - start == BURST_LEN_MS
    window = [json.loads(x) for x in gen.events(2_000, start, end)]
    mine = [p for p in window if p["auth_index"] == account.auth_index and p["request_id"]]
    assert len(mine) > 300
    assert sum(p["failed"] for p in mine) / len(mine) > 0.5


def test_auth_files_match_the_events(day):
    gen = TrafficGenerator(seed=7)
    files = gen.auth_files()
    assert len(files) == 20 and files[0]["name"] == "alice.json" and files[0]["email"] == "alice@example.com"
    assert [f["disabled"] for f in files].count(True) == 1
    disabled = next(f for f in files if f["disabled"])
    assert disabled["status"] == "disabled" and disabled["auth_index"] not in {p["auth_index"] for p in day}
    assert all(f["project_id"] for f in files if f["provider"] in ("gemini", "vertex"))
    assert all("project_id" not in f for f in files if f["provider"] not in ("gemini", "vertex"))
    assert {p["auth_index"] for p in day} <= {f["auth_index"] for f in files}
    for f in files:
        assert set(f) >= {"id", "auth_index", "name", "type", "provider", "label", "status", "status_message",
                          "disabled", "unavailable"}


def test_credential_error_events():
    gen = TrafficGenerator(seed=7)
    payloads = list(gen.payloads(5_000, START, START + DAY))
    quota = next(p for p in payloads if "usage_limit_reached" in p["fail"]["body"])
    event = gen.credential_error(quota)
    assert event is not None
    assert event["status_code"] == 429 and event["code"] == "usage_limit_reached" and event["retryable"] is True
    assert event["auth_status"]["quota"]["exceeded"] is True and event["auth_status"]["next_retry_after"]
    assert event["auth_id"].endswith(".json") and event["auth_index"] == quota["auth_index"]
    assert gen.credential_error(next(p for p in payloads if not p["failed"])) is None


def test_lognormal_median_is_one():
    import random
    rng = random.Random(1)
    draws = sorted(lognormal(rng, 0.5) for _ in range(20_001))
    assert 0.97 < draws[10_000] < 1.03


def test_sizes_for_benchmarks():
    gen = TrafficGenerator(seed=1, accounts=100, api_keys=50, models=12)
    items = list(gen.events(10_000, START, START + 30 * DAY))
    assert len(items) == 10_000 and all(isinstance(x, bytes) for x in items)
    parsed = [json.loads(x) for x in items]
    assert len({p["api_key"] for p in parsed}) == 50
    assert len({p["auth_index"] for p in parsed}) > 80
