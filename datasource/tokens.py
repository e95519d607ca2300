"""Pure token accounting of one payload (reference 3.7): raw counts, cache mode, normalized counts.

Also the effective service tier, which follows the same provider/executor markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from datasource.payload import as_int, as_text

INCLUDED = "included_in_input"
SEPARATE = "separate_from_input"

_ALIASES: dict[str, tuple[str, ...]] = {
    "input": ("input_tokens", "prompt_tokens"),
    "output": ("output_tokens", "completion_tokens"),
    "reasoning": ("reasoning_tokens",),
    "cached": ("cached_tokens",),
    "cache": ("cache_tokens",),
    "cache_read": ("cache_read_tokens", "cache_read_input_tokens"),
    "cache_creation": ("cache_creation_tokens", "cache_creation_input_tokens", "cache_write_tokens",
                       "cache_write_input_tokens"),
    "total": ("total_tokens", "total"),
}
_EXEC_INCLUDED = ("openaicompat", "openai", "codex", "gemini", "aistudio", "antigravity", "xai", "kimi")
_PROVIDER_INCLUDED = ("openai", "codex", "gemini", "vertex", "aistudio", "interaction", "antigravity", "xai",
                      "kimi", "moonshot")
_MODEL_INCLUDED = ("gpt-", "openai", "codex", "gemini", "vertex", "aistudio", "antigravity", "grok", "xai",
                   "kimi", "moonshot")
_SEPARATE_MARKERS = ("anthropic", "claude")


@dataclass(slots=True)
class TokenCounts:
    input: int
    output: int
    reasoning: int
    cached: int  # max(cached_tokens, cache_tokens), CPA's legacy mirror
    cache_read: int
    cache_creation: int
    total: int
    cache_input_mode: str
    compat_cached: int
    norm_cache_read: int
    norm_input: int
    norm_uncached: int

    @property
    def cache_state(self) -> str:
        return "hit" if max(self.cached, self.cache_read, self.cache_creation) > 0 else "miss"

    def columns(self) -> dict[str, Any]:
        return {
            "cache_input_mode": self.cache_input_mode, "input_tokens": self.input,
            "output_tokens": self.output, "reasoning_tokens": self.reasoning, "cached_tokens": self.cached,
            "cache_read_tokens": self.cache_read, "cache_creation_tokens": self.cache_creation,
            "norm_input_tokens": self.norm_input, "norm_uncached_tokens": self.norm_uncached,
            "norm_cache_read_tokens": self.norm_cache_read, "compat_cached_tokens": self.compat_cached,
            "total_tokens": self.total, "cache_state": self.cache_state,
        }


def _containers(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    for c in (obj.get("tokens"), obj.get("usage")):
        # a dict (JSON's objects) or absent is the common case; the Mapping ABC check is slow
        if type(c) is dict or (c is not None and isinstance(c, Mapping)):
            out.append(c)
    out.append(obj)
    return out


def read_count(containers: list[Mapping[str, Any]], keys: tuple[str, ...]) -> int:
    """First non-zero count: tokens.{key}, then usage.{key}, then the top level; aliases in order."""
    for container in containers:
        for key in keys:
            value = container.get(key)
            if value is not None and (value := as_int(value)):
                return value
    return 0


def _contains_any(text: str, markers: tuple[str, ...]) -> bool:
    return any(m in text for m in markers)


def cache_input_mode(containers: list[Mapping[str, Any]], executor: str, provider: str, models: tuple[str, ...],
                     cache_read: int, cache_creation: int) -> str:
    """included_in_input or separate_from_input; the first matching rule of reference 3.7 decides.
    `containers` as `_containers` gives them (the event itself last)."""
    for container in containers[:-1]:
        explicit = container.get("cache_input_mode")
        if explicit is not None and (explicit := as_text(explicit).strip().lower()) in (INCLUDED, SEPARATE):
            return explicit
    return _marked_mode(executor, provider, models) or (
        SEPARATE if cache_read > 0 or cache_creation > 0 else INCLUDED)


@lru_cache(maxsize=1024)
def _marked_mode(executor: str, provider: str, models: tuple[str, ...]) -> str | None:
    """The mode the executor, provider or models name (reference 3.7's rules 2-4), else None."""
    executor = executor.lower()
    if "claude" in executor:
        return SEPARATE
    if _contains_any(executor, _EXEC_INCLUDED):
        return INCLUDED
    for text, included in ((provider.lower(), _PROVIDER_INCLUDED),
                           *((m.lower(), _MODEL_INCLUDED) for m in models if m)):
        if _contains_any(text, _SEPARATE_MARKERS):
            return SEPARATE
        if _contains_any(text, included):
            return INCLUDED
    return None


def read_tokens(obj: Mapping[str, Any], executor: str, provider: str, models: tuple[str, ...]) -> TokenCounts:
    containers = _containers(obj)
    raw = {name: read_count(containers, keys) for name, keys in _ALIASES.items()}
    cached = max(raw["cached"], raw["cache"])
    read, creation = raw["cache_read"], raw["cache_creation"]
    mode = cache_input_mode(containers, executor, provider, models, read, creation)
    compat = max(cached - (read + creation), 0)
    norm_read = compat + read
    if mode == INCLUDED:
        norm_input = raw["input"]
        norm_uncached = max(raw["input"] - norm_read - creation, 0)
    else:
        norm_uncached = raw["input"]
        norm_input = raw["input"] + norm_read + creation
    total = raw["total"] if raw["total"] > 0 else norm_input + raw["output"] + raw["reasoning"]
    return TokenCounts(raw["input"], raw["output"], raw["reasoning"], cached, read, creation, total, mode,
                       compat, norm_read, norm_input, norm_uncached)


def service_tiers(obj: Mapping[str, Any], markers: str) -> tuple[str | None, str | None, str | None]:
    """(effective, request, response) tiers. Codex reports `default` even in Fast mode,
    so for codex the request tier wins; otherwise the upstream's response tier does."""
    request = _tier_text(obj, "request_service_tier", "requestServiceTier")
    legacy = _tier_text(obj, "service_tier", "serviceTier")
    response = _tier_text(obj, "response_service_tier", "responseServiceTier")
    order = (request, legacy, response) if "codex" in markers.lower() else (response, legacy, request)
    effective = next((t for t in order if t), "")
    return effective or None, (request or legacy) or None, response or None


def _tier_text(obj: Mapping[str, Any], key: str, alias: str) -> str:
    """The first of the two keys with a non-blank value, as text; "" when neither has one."""
    for name in (key, alias):
        value = obj.get(name)
        if value is not None and (value := as_text(value).strip()):
            return value
    return ""
