"""Estimated cost in USD of one event, from a price table (reference section 6).

Rates are USD per 1,000,000 tokens. `Pricer.default()` uses datasource/prices.json;
`Pricer.from_file(path)` reads our format ({"models": {...}}) or LiteLLM's
model_prices JSON. `Pricer.cost(row)` prices one events-table row.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

DEFAULT_PRICES = Path(__file__).with_name("prices.json")
_RATE_FIELDS = ("input", "output", "cache_read", "cache_write")
_LITELLM_FIELDS = {"input": "input_cost_per_token", "output": "output_cost_per_token",
                   "cache_read": "cache_read_input_token_cost", "cache_write": "cache_creation_input_token_cost"}
_LITELLM_ABOVE = re.compile(r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
                            r"|cache_creation_input_token_cost)_above_(\d+)k_tokens$")
_DATE_SUFFIX = re.compile(r"-(?:20\d\d-\d\d-\d\d|20\d{6})$")
_GPT56 = re.compile(r"^gpt-5\.6-(sol|terra|luna)")
_PRIORITY_X2 = ("gpt-5.4", "gpt-5.4-mini", "gpt-5.3-codex")
_TIER_HALF = frozenset({"flex", "batch"})
_TIER_FAST = frozenset({"priority", "fast"})


class PriceError(ValueError):
    """A price file that cannot be used; the message says which entry and why."""


@dataclass(frozen=True, slots=True)
class LongContext:
    """Applies to the whole request when normalized input exceeds `threshold_tokens`."""

    threshold_tokens: int
    input_multiplier: float = 1.0
    output_multiplier: float = 1.0
    rates: dict[str, float] = field(default_factory=dict)  # overrides of the base rates


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cache_read: float | None = None  # None: 10 % of input
    cache_write: float | None = None  # None: the input rate
    long_context: LongContext | None = None


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PriceError(f"{name}: rate must be a finite number >= 0, got {value!r}")
    return float(value)


def _long_context(model: str, spec: Any) -> LongContext | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise PriceError(f"{model}: long_context must be an object")
    threshold = spec.get("threshold_tokens")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
        raise PriceError(f"{model}: long_context.threshold_tokens must be a positive integer")
    rates = {k: _rate(f"{model}.long_context.{k}", spec[k]) for k in _RATE_FIELDS if k in spec}
    return LongContext(threshold, _rate(f"{model}.input_multiplier", spec.get("input_multiplier", 1.0)),
                       _rate(f"{model}.output_multiplier", spec.get("output_multiplier", 1.0)), rates)


def parse_price(model: str, spec: Any) -> Price:
    """One entry of our price format: {"input", "output", "cache_read"?, "cache_write"?, "long_context"?}."""
    if not isinstance(spec, Mapping) or "input" not in spec or "output" not in spec:
        raise PriceError(f"{model}: a price needs at least `input` and `output`")
    optional = {k: _rate(f"{model}.{k}", spec[k]) for k in ("cache_read", "cache_write") if spec.get(k) is not None}
    return Price(_rate(f"{model}.input", spec["input"]), _rate(f"{model}.output", spec["output"]),
                 optional.get("cache_read"), optional.get("cache_write"),
                 _long_context(model, spec.get("long_context")))


def _litellm_price(model: str, spec: Mapping[str, Any]) -> Price | None:
    if spec.get(_LITELLM_FIELDS["input"]) is None or spec.get(_LITELLM_FIELDS["output"]) is None:
        return None
    rates = {k: _rate(f"{model}.{f}", spec[f]) * 1e6 for k, f in _LITELLM_FIELDS.items() if spec.get(f) is not None}
    above: dict[int, dict[str, float]] = {}
    for key, value in spec.items():
        match = _LITELLM_ABOVE.match(key)
        if match and value is not None:
            name = next(k for k, f in _LITELLM_FIELDS.items() if f == match.group(1))
            above.setdefault(int(match.group(2)) * 1000, {})[name] = _rate(f"{model}.{key}", value) * 1e6
    long_context = None
    if above:
        threshold = min(above)
        long_context = LongContext(threshold, rates=above[threshold])
    return Price(rates["input"], rates["output"], rates.get("cache_read"), rates.get("cache_write"), long_context)


def parse_litellm(data: Mapping[str, Any]) -> dict[str, Price]:
    """LiteLLM's model_prices JSON: per-token USD costs, keys like `gpt-4o` or `gemini/gemini-2.5-pro`."""
    prices: dict[str, Price] = {}
    for key, spec in data.items():
        if not isinstance(spec, Mapping) or key == "sample_spec":
            continue
        price = _litellm_price(str(key), spec)
        if price is None:
            continue
        prices[str(key)] = price
        prices.setdefault(str(key).rsplit("/", 1)[-1], price)
    return prices


class Pricer:
    """Prices events; model lookup falls back from the billing model to analytics and display models."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.prices = dict(prices)
        self._lower = {k.lower(): v for k, v in self.prices.items()}
        self._found: dict[str, Price | None] = {}  # lookup memo: models repeat constantly

    @classmethod
    def default(cls) -> "Pricer":
        return _default_pricer()

    @classmethod
    def from_file(cls, path: str | Path) -> "Pricer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PriceError(f"cannot read price file {path}: {exc}") from exc
        return cls.from_data(data)

    @classmethod
    def from_data(cls, data: Any) -> "Pricer":
        if not isinstance(data, Mapping):
            raise PriceError("a price file must hold a JSON object")
        if isinstance(data.get("models"), Mapping):
            return cls({str(k): parse_price(str(k), v) for k, v in data["models"].items()})
        return cls(parse_litellm(data))

    def lookup(self, model: str) -> Price | None:
        """Exact name, then case-insensitive, then without a date suffix, then the gpt-5.6 families."""
        if not model:
            return None
        try:
            return self._found[model]
        except KeyError:
            pass
        price = self._lookup(model)
        if len(self._found) < 4096:
            self._found[model] = price
        return price

    def _lookup(self, model: str) -> Price | None:
        for name in (model, _DATE_SUFFIX.sub("", model)):
            price = self.prices.get(name) or self._lower.get(name.lower())
            if price:
                return price
        family = _GPT56.match(model.lower())
        return self._lower.get(f"gpt-5.6-{family.group(1)}") if family else None

    def price_for(self, row: Mapping[str, Any]) -> tuple[str, Price] | None:
        for key in ("billing_model", "analytics_model", "model"):
            model = str(row.get(key) or "")
            price = self.lookup(model)
            if price:
                return model, price
        return None

    def cost(self, row: Mapping[str, Any]) -> float:
        """USD for one events row (reference 6.3); 0.0 when no price matches."""
        found = self.price_for(row)
        if found is None:
            return 0.0
        model, price = found
        return event_cost(price, str(row.get("billing_model") or model), row)


@lru_cache(maxsize=1024)
def tier_multiplier(model: str, tier: str | None) -> float:
    tier = (tier or "").lower()
    base = _DATE_SUFFIX.sub("", model.lower())
    if tier in _TIER_HALF:
        return 0.5
    if tier in _TIER_FAST:
        if base.startswith("gpt-5.5"):
            return 2.5
        if base.startswith("gpt-5.6") or base in _PRIORITY_X2:
            return 2.0
    return 1.0


def _n(row: Mapping[str, Any], key: str) -> int:
    value = row.get(key)
    if type(value) is int:  # what normalize stores
        return value if value > 0 else 0
    return max(int(value), 0) if isinstance(value, (int, float)) and math.isfinite(value) else 0


def event_cost(price: Price, billing_model: str, row: Mapping[str, Any]) -> float:
    """Reference 6.3: reasoning never priced; tier multiplier on the base band; long-context per request."""
    norm_input, output = _n(row, "norm_input_tokens"), _n(row, "output_tokens")
    compat, read, creation = _n(row, "compat_cached_tokens"), _n(row, "cache_read_tokens"), _n(row, "cache_creation_tokens")
    prompt, out, cache_read, cache_write = price.input, price.output, price.cache_read, price.cache_write
    lc = price.long_context
    if lc and norm_input > lc.threshold_tokens:
        rates = lc.rates  # a rate it names replaces the base one, even with null
        prompt, out = rates.get("input", prompt), rates.get("output", out)
        cache_read, cache_write = rates.get("cache_read", cache_read), rates.get("cache_write", cache_write)
        in_mult, out_mult = lc.input_multiplier, lc.output_multiplier
    else:
        in_mult = out_mult = tier_multiplier(billing_model, row.get("service_tier"))
    prompt_rate, out_rate = float(prompt or 0), float(out or 0)
    read_rate = cache_read if cache_read is not None else prompt_rate * 0.1
    write_rate = cache_write if cache_write is not None else prompt_rate
    prompt_tokens = max(norm_input - (compat + read) - creation, 0)
    input_cost = prompt_tokens * prompt_rate + (compat + read) * read_rate + creation * write_rate
    return (input_cost * in_mult + output * out_rate * out_mult) / 1e6


@lru_cache(maxsize=1)
def _default_pricer() -> Pricer:
    return Pricer.from_file(DEFAULT_PRICES)
