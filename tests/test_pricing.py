"""Cost estimation (reference 6.3/6.4), price files in our format and LiteLLM's."""

from __future__ import annotations

import json

import pytest

from datasource.pricing import Price, PriceError, Pricer, tier_multiplier

WORKED = {"billing_model": "gpt-5.4", "analytics_model": "gpt-5.4", "model": "gpt-5.4(high)",
          "norm_input_tokens": 12000, "cache_read_tokens": 9000, "compat_cached_tokens": 0,
          "cache_creation_tokens": 0, "output_tokens": 850, "reasoning_tokens": 320, "service_tier": "priority"}


def ours(models: dict) -> Pricer:
    return Pricer.from_data({"models": models})


def test_worked_example_6_4() -> None:
    pricer = ours({"gpt-5.4": {"input": 2.5, "output": 15, "cache_read": 0.25}})
    # (3000*2.5 + 9000*0.25 + 850*15) / 1e6 = 0.0225, x2 for gpt-5.4 priority
    assert pricer.cost(WORKED) == pytest.approx(0.045)
    assert Pricer.default().cost(WORKED) == pytest.approx(0.045)


def test_reasoning_is_never_priced() -> None:
    pricer = ours({"m": {"input": 1, "output": 10}})
    row = {"billing_model": "m", "norm_input_tokens": 0, "output_tokens": 100, "reasoning_tokens": 10**6}
    assert pricer.cost(row) == pytest.approx(100 * 10 / 1e6)


def test_default_cache_rates_and_compat_cached() -> None:
    pricer = ours({"m": {"input": 2, "output": 0}})
    row = {"billing_model": "m", "norm_input_tokens": 1000, "compat_cached_tokens": 100,
           "cache_read_tokens": 200, "cache_creation_tokens": 50}
    # prompt = 1000 - 300 - 50 = 650 at 2; read 300 at 0.2 (10 %); write 50 at 2 (input rate)
    assert pricer.cost(row) == pytest.approx((650 * 2 + 300 * 0.2 + 50 * 2) / 1e6)


@pytest.mark.parametrize("model, tier, mult", [
    ("gpt-5.4", "priority", 2.0), ("gpt-5.4-mini", "fast", 2.0), ("gpt-5.3-codex", "priority", 2.0),
    ("gpt-5.6-sol", "priority", 2.0), ("gpt-5.5", "priority", 2.5), ("gpt-5.5-2026-03-01", "fast", 2.5),
    ("claude-opus-4-6", "priority", 1.0), ("gpt-5.4", "flex", 0.5), ("gemini-2.5-pro", "batch", 0.5),
    ("gpt-5.4", "default", 1.0), ("gpt-5.4", None, 1.0),
])
def test_tier_multipliers(model: str, tier: str | None, mult: float) -> None:
    assert tier_multiplier(model, tier) == mult


def test_long_context_multipliers_replace_tier() -> None:
    pricer = ours({"gpt-5.4": {"input": 2.5, "output": 15, "cache_read": 0.25,
                               "long_context": {"threshold_tokens": 272000, "input_multiplier": 2,
                                                "output_multiplier": 1.5}}})
    at = {"billing_model": "gpt-5.4", "norm_input_tokens": 272000, "output_tokens": 1000, "service_tier": "priority"}
    # exactly 272000 is not long: tier x2 applies
    assert pricer.cost(at) == pytest.approx((272000 * 2.5 + 1000 * 15) * 2 / 1e6)
    above = {**at, "norm_input_tokens": 272001}
    assert pricer.cost(above) == pytest.approx((272001 * 2.5 * 2 + 1000 * 15 * 1.5) / 1e6)


def test_long_context_rates_override() -> None:
    pricer = ours({"g": {"input": 1.25, "output": 10, "cache_read": 0.125,
                         "long_context": {"threshold_tokens": 200000, "input": 2.5, "output": 15}}})
    row = {"billing_model": "g", "norm_input_tokens": 300000, "cache_read_tokens": 100000, "output_tokens": 10}
    # cache_read keeps its base rate (not overridden)
    assert pricer.cost(row) == pytest.approx((200000 * 2.5 + 100000 * 0.125 + 10 * 15) / 1e6)


def test_model_lookup_order_and_fallbacks() -> None:
    pricer = ours({"exact": {"input": 1, "output": 0}, "analytics": {"input": 2, "output": 0},
                   "claude-sonnet-4-5": {"input": 3, "output": 0}, "gpt-5.6-terra": {"input": 4, "output": 0}})
    row = {"norm_input_tokens": 1_000_000}
    assert pricer.cost({**row, "billing_model": "exact", "analytics_model": "analytics"}) == 1
    assert pricer.cost({**row, "billing_model": "unknown", "analytics_model": "analytics"}) == 2
    assert pricer.cost({**row, "billing_model": "x", "analytics_model": "y", "model": "EXACT"}) == 1
    assert pricer.cost({**row, "billing_model": "claude-sonnet-4-5-20250929"}) == 3
    assert pricer.cost({**row, "billing_model": "gpt-5.6-terra-preview"}) == 4
    assert pricer.cost({**row, "billing_model": "nothing"}) == 0.0


def test_default_table_has_gpt56_fallbacks_of_6_1() -> None:
    prices = Pricer.default().prices
    assert prices["gpt-5.6-sol"] == Price(5, 30, 0.5, 6.25, prices["gpt-5.6-sol"].long_context)
    assert (prices["gpt-5.6-terra"].input, prices["gpt-5.6-terra"].cache_write) == (2.5, 3.125)
    assert (prices["gpt-5.6-luna"].output, prices["gpt-5.6-luna"].cache_read) == (6, 0.1)
    for model in ("claude-opus-4-6", "claude-haiku-4-5", "gemini-2.5-flash", "gemini-3-pro-preview",
                  "deepseek-chat", "grok-4", "kimi-k2"):
        assert model in prices


def test_litellm_import(tmp_path) -> None:
    path = tmp_path / "model_prices.json"
    path.write_text(json.dumps({
        "sample_spec": {"input_cost_per_token": 0, "output_cost_per_token": 0},
        "gpt-5.4": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1.5e-05,
                    "cache_read_input_token_cost": 2.5e-07, "litellm_provider": "openai"},
        "gemini/gemini-2.5-pro": {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
                                  "input_cost_per_token_above_200k_tokens": 2.5e-06,
                                  "output_cost_per_token_above_200k_tokens": 1.5e-05},
        "claude-haiku-4-5": {"input_cost_per_token": 1e-06, "output_cost_per_token": 5e-06,
                             "cache_read_input_token_cost": 1e-07, "cache_creation_input_token_cost": 1.25e-06},
        "embedding-only": {"input_cost_per_token": 1e-07},
    }))
    pricer = Pricer.from_file(path)
    assert set(pricer.prices) == {"gpt-5.4", "gemini/gemini-2.5-pro", "gemini-2.5-pro", "claude-haiku-4-5"}
    assert pricer.cost(WORKED) == pytest.approx(0.045)
    haiku = pricer.prices["claude-haiku-4-5"]
    assert (haiku.input, haiku.output, haiku.cache_read, haiku.cache_write) == pytest.approx((1, 5, 0.1, 1.25))
    long_row = {"billing_model": "gemini-2.5-pro", "norm_input_tokens": 300000, "output_tokens": 1000}
    assert pricer.cost(long_row) == pytest.approx((300000 * 2.5 + 1000 * 15) / 1e6)


@pytest.mark.parametrize("data, message", [
    ([], "a price file must hold a JSON object"),
    ({"models": {"m": {"input": 1}}}, "m: a price needs at least `input` and `output`"),
    ({"models": {"m": {"input": -1, "output": 1}}}, "m.input: rate must be a finite number >= 0, got -1"),
    ({"models": {"m": {"input": "1", "output": 1}}}, "m.input: rate must be a finite number >= 0, got '1'"),
    ({"models": {"m": {"input": 1, "output": 1, "long_context": {"threshold_tokens": 0}}}},
     "m: long_context.threshold_tokens must be a positive integer"),
    ({"x": {"input_cost_per_token": float("inf"), "output_cost_per_token": 0}},
     "x.input_cost_per_token: rate must be a finite number >= 0, got inf"),
])
def test_invalid_price_data(data, message: str) -> None:
    with pytest.raises(PriceError) as err:
        Pricer.from_data(data)
    assert str(err.value) == message


def test_unreadable_price_file(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(PriceError, match="cannot read price file"):
        Pricer.from_file(bad)
    with pytest.raises(PriceError, match="cannot read price file"):
        Pricer.from_file(tmp_path / "missing.json")


def test_normalize_uses_the_given_pricer() -> None:
    from datasource.normalize import normalize
    from datasource.model import Normalized

    pricer = ours({"m": {"input": 1, "output": 2}})
    result = normalize(json.dumps({"model": "m", "input_tokens": 1000, "output_tokens": 500}), pricer=pricer,
                       now_ms=0)
    assert isinstance(result, Normalized)
    assert result.row["est_cost_usd"] == pytest.approx((1000 * 1 + 500 * 2) / 1e6)
