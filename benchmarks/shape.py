"""CPA usage payloads with the issue's traffic shape, for the benchmarks.

12 models over 3 providers, 100 accounts (each bound to one provider), 50 caller
API keys with skewed use, 5 % failures (mostly 429 quota, some 401/5xx),
lognormal latency (median ~4 s), TTFT on streamed requests, lognormal tokens
with cache reads. Timestamps are spread evenly (with jitter) over [start_ms, end_ms), in
time order, like a live queue.

When `datasource.traffic.TrafficGenerator` exists, `payloads()` uses it
instead (the project's own generator); `--own-shape` in the scripts forces this
module's shape.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import datetime, timezone
from typing import Iterator

MODELS = {
    "codex": ["gpt-5.4", "gpt-5.4-mini", "gpt-5.5", "gpt-5.3-codex", "gpt-5.6-terra"],
    "claude": ["claude-sonnet-4.5", "claude-opus-4.1", "claude-haiku-4.5"],
    "gemini": ["gemini-3-pro", "gemini-3-flash", "gemini-2.5-pro", "gemini-2.5-flash"],
}
EXECUTORS = {"codex": "CodexExecutor", "claude": "ClaudeExecutor", "gemini": "GeminiExecutor"}
ENDPOINTS = {"codex": "POST /v1/responses", "claude": "POST /v1/messages",
             "gemini": "POST /v1/chat/completions"}
FAILURES = [(429, 0.5), (401, 0.08), (403, 0.04), (500, 0.12), (502, 0.1), (503, 0.1), (400, 0.06)]
N_ACCOUNTS = 100
N_KEYS = 50
FAILURE_RATE = 0.05


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class Shape:
    def __init__(self, seed: int = 6) -> None:
        self.rng = random.Random(seed)
        providers = list(MODELS)
        self.accounts = []
        for i in range(N_ACCOUNTS):
            provider = providers[i % len(providers)]
            auth_index = hashlib.sha256(f"acct-{i}".encode()).hexdigest()[:16]
            self.accounts.append((provider, auth_index, f"user{i:03d}@example.com"))
        self.keys = [f"sk-client-bench-{i:04d}" for i in range(N_KEYS)]
        self.key_weights = [1 / (i + 1) ** 0.8 for i in range(N_KEYS)]
        self.account_weights = [1 / (i + 1) ** 0.5 for i in range(N_ACCOUNTS)]

    def payload(self, ts_ms: int, n: int) -> dict:
        rng = self.rng
        provider, auth_index, email = rng.choices(self.accounts, self.account_weights)[0]
        model = rng.choice(MODELS[provider])
        failed = rng.random() < FAILURE_RATE
        stream = rng.random() < 0.7
        if failed:
            code = rng.choices([c for c, _ in FAILURES], [w for _, w in FAILURES])[0]
            latency = max(1, round(rng.lognormvariate(6.2, 0.8)))
            ttft, inp, out, cached, reasoning = 0, 0, 0, 0, 0
            body = json.dumps({"error": {"type": "usage_limit_reached" if code == 429 else "upstream_error",
                                         "message": f"upstream said {code}"}})
        else:
            code, body = 200, ""
            latency = max(1, round(rng.lognormvariate(8.3, 0.9)))
            ttft = min(latency, max(1, round(rng.lognormvariate(6.7, 0.6)))) if stream else 0
            inp = round(rng.lognormvariate(8.8, 1.1))
            cached = round(inp * rng.choice([0, 0, 0.5, 0.8, 0.9]))
            out = round(rng.lognormvariate(6.3, 1.0))
            reasoning = round(out * rng.random() * 0.5)
        effort = rng.choice(["", "low", "medium", "high"])
        alias = f"{model}({effort})" if effort and provider == "codex" else model
        return {
            "timestamp": _iso(ts_ms), "latency_ms": latency, "ttft_ms": ttft, "source": email,
            "auth_index": auth_index, "client_ip": "192.0.2.10", "x_forwarded_for": "",
            "user_agent": "codex_cli_rs/0.50.0",
            "tokens": {"input_tokens": inp, "output_tokens": out, "reasoning_tokens": reasoning,
                       "cached_tokens": cached, "cache_read_tokens": cached, "cache_read_tokens_present": True,
                       "cache_creation_tokens": 0, "total_tokens": inp + out},
            "failed": failed, "generate": True, "fail": {"status_code": code, "body": body},
            "response_headers": {"Content-Type": ["text/event-stream" if stream else "application/json"],
                                 "X-Request-Id": [f"req_{n:x}"]},
            "accounting_version": 2, "provider": provider, "executor_type": EXECUTORS[provider],
            "model": model, "alias": alias, "endpoint": ENDPOINTS[provider], "auth_type": "oauth",
            "api_key": rng.choices(self.keys, self.key_weights)[0], "request_id": f"{n:08x}",
            "reasoning_effort": effort, "service_tier": "",
        }

    def events(self, n: int, start_ms: int, end_ms: int) -> Iterator[dict]:
        """n payload dicts in time order, evenly spread with jitter."""
        span = end_ms - start_ms
        for i in range(n):
            t = start_ms + int((i + self.rng.random()) * span / n)
            yield self.payload(min(t, end_ms - 1), i)


def payloads(n: int, start_ms: int, end_ms: int, *, seed: int = 6, own_shape: bool = False) -> Iterator[bytes]:
    """n CPA usage payloads as JSON bytes, in time order."""
    if not own_shape:
        try:
            from datasource.traffic import TrafficGenerator  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            generator = TrafficGenerator(seed=seed, accounts=N_ACCOUNTS, api_keys=N_KEYS, models=12,
                                         failure_rate=FAILURE_RATE)
            yield from generator.events(n, start_ms, end_ms)
            return
    for event in Shape(seed).events(n, start_ms, end_ms):
        yield json.dumps(event, separators=(",", ":")).encode()
