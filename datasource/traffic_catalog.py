"""Static data behind the traffic generator: providers, models, people, failure shapes.

Values are plausible, not copied from any real account: names use example.com, IPs come from
the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    name: str  # CPA's `provider`
    executor: str  # CPA's `executor_type`
    auth_type: str  # oauth | apikey
    semantics: str  # subset | independent | separate-reasoning (reference 1.2)
    file_type: str  # auth-file `type`
    endpoints: tuple[str, ...]
    user_agents: tuple[str, ...]
    stream_share: float
    cache_share: float  # share of successful requests with a cache read
    ttft_median_ms: float
    tokens_per_s: float


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str  # upstream model (CPA's `model`)
    provider: str
    aliases: tuple[tuple[str, str], ...]  # (requested alias, reasoning_effort)
    input_median: float
    output_median: float
    reasoning_share: float  # share of output that is reasoning (0 = no reasoning)


PROVIDERS: dict[str, ProviderSpec] = {
    "codex": ProviderSpec("codex", "CodexExecutor", "oauth", "subset", "codex",
                          ("POST /v1/responses", "POST /v1/responses", "POST /v1/chat/completions"),
                          ("codex_cli_rs/0.50.0", "codex_cli_rs/0.48.2", "codex_vscode/0.50.0"),
                          0.85, 0.65, 850.0, 70.0),
    "claude": ProviderSpec("claude", "ClaudeExecutor", "oauth", "independent", "claude",
                           ("POST /v1/messages",), ("claude-cli/2.0.14 (external, cli)", "claude-cli/2.0.8"),
                           0.75, 0.7, 1100.0, 55.0),
    "gemini": ProviderSpec("gemini", "GeminiCLIExecutor", "oauth", "separate-reasoning", "gemini",
                           ("POST /v1beta/models/*action", "POST /v1/chat/completions"),
                           ("GeminiCLI/0.9.0 (linux; x64)", "google-genai-sdk/1.30.0"),
                           0.55, 0.35, 1300.0, 90.0),
    "vertex": ProviderSpec("vertex", "GeminiVertexExecutor", "oauth", "separate-reasoning", "vertex",
                           ("POST /v1beta/models/*action",), ("google-genai-sdk/1.30.0",),
                           0.5, 0.3, 1200.0, 95.0),
    "openai-compatible": ProviderSpec("openrouter", "OpenAICompatExecutor", "apikey", "subset",
                                      "openai-compatibility", ("POST /v1/chat/completions",),
                                      ("OpenAI/Python 1.109.1", "opencode/0.15.2"),
                                      0.45, 0.25, 700.0, 80.0),
}

_EFFORTS = (("", "medium"), ("(high)", "high"), ("(low)", "low"), ("(xhigh)", "xhigh"))

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("gpt-5.4", "codex", tuple((f"gpt-5.4{s}", e) for s, e in _EFFORTS), 14000, 900, 0.35),
    ModelSpec("claude-sonnet-4-5-20250929", "claude", (("claude-sonnet-4-5", ""),), 9000, 700, 0.0),
    ModelSpec("gemini-2.5-pro", "gemini", (("gemini-2.5-pro", ""),), 11000, 800, 0.4),
    ModelSpec("deepseek/deepseek-v4-flash", "openai-compatible",
              (("deepseek-v4-flash", ""), ("deepseek-v4-flash(max)", "max")), 5000, 600, 0.3),
    ModelSpec("gpt-5.4-mini", "codex", (("gpt-5.4-mini", "medium"), ("gpt-5.4-mini(low)", "low")), 6000, 500, 0.2),
    ModelSpec("claude-opus-4-1-20250805", "claude", (("claude-opus-4-1", ""),), 12000, 900, 0.0),
    ModelSpec("gemini-2.5-flash", "gemini", (("gemini-2.5-flash", ""),), 7000, 450, 0.25),
    ModelSpec("gpt-5.3-codex", "codex", (("gpt-5.3-codex", "medium"), ("gpt-5.3-codex(high)", "high")), 20000, 1200, 0.4),
    ModelSpec("moonshotai/kimi-k2", "openai-compatible", (("kimi-k2", ""),), 6000, 700, 0.0),
    ModelSpec("claude-haiku-4-5-20251001", "claude", (("claude-haiku-4-5", ""),), 4000, 350, 0.0),
    ModelSpec("gemini-3-pro-preview", "vertex", (("gemini-3-pro-preview", ""),), 10000, 900, 0.45),
    ModelSpec("gpt-5.5", "codex", (("gpt-5.5", "medium"), ("gpt-5.5(high)", "high")), 16000, 1000, 0.35),
    ModelSpec("qwen/qwen3-coder", "openai-compatible", (("qwen3-coder", ""),), 8000, 900, 0.0),
    ModelSpec("gpt-5.2", "codex", (("gpt-5.2", "medium"),), 9000, 700, 0.3),
)

# Accounts are spread over providers in this proportion (auth-file owners).
PROVIDER_MIX = ("codex", "codex", "claude", "gemini", "codex", "claude", "openai-compatible",
                "gemini", "codex", "vertex")

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
         "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yvonne")

PLANS = ("plus", "pro", "team", "plus", "business")

# (status, kind, weight): the failure mix. Kinds map to bodies and headers in traffic.py.
FAILURES: tuple[tuple[int, str, float], ...] = (
    (429, "quota", 0.17),
    (429, "rate_limit", 0.18),
    (401, "token_invalidated", 0.08),
    (401, "invalid_credentials", 0.04),
    (403, "permission_denied", 0.05),
    (403, "account_deactivated", 0.01),
    (400, "bad_request", 0.05),
    (408, "timeout", 0.05),
    (500, "server_error", 0.11),
    (502, "bad_gateway", 0.07),
    (503, "unavailable", 0.09),
    (504, "gateway_timeout", 0.04),
    (529, "overloaded", 0.06),
)

CLIENT_IPS = tuple(f"192.0.2.{n}" for n in range(10, 60)) + tuple(f"198.51.100.{n}" for n in range(5, 30))
