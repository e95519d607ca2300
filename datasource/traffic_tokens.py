"""Token counts for one successful attempt, rendered the way CPA reports them per provider.

Reference 1.2: `subset` providers count cache inside input and reasoning inside output;
`independent` (Claude) keeps cache read/creation and reasoning separate; `separate-reasoning`
(Gemini, Vertex) counts cache inside input but reasoning outside output. Returns the pre-encoded
`"tokens":{...}` and `"token_breakdown":{...}` members.
"""

from __future__ import annotations

import random
from math import exp
from statistics import NormalDist

# Standard-normal quantiles at 4096 midpoints: lognormal draws with one random() call each.
NORMAL = tuple(NormalDist().inv_cdf((i + 0.5) / 4096) for i in range(4096))


def lognormal(rng: random.Random, sigma: float) -> float:
    """exp(sigma * Z) for Z standard normal (quantised to 4096 levels); median 1."""
    return exp(sigma * NORMAL[int(rng.random() * 4096)])

from datasource.traffic_catalog import ModelSpec, ProviderSpec

_TOKENS = ('"tokens":{"input_tokens":%d,"output_tokens":%d,"reasoning_tokens":%d,"cached_tokens":%d,'
           '"cache_read_tokens":%d,"cache_read_tokens_present":true,"cache_creation_tokens":%d,"total_tokens":%d}')
_BREAKDOWN = ('"token_breakdown":{"schema_version":2,"quality":"complete","total_tokens":%d,'
              '"input":{"total_tokens":%d,"uncached_tokens":%d,"cache_read_tokens":%d,"cache_write_tokens":%d},'
              '"output":{"total_tokens":%d,"non_reasoning_tokens":%d,"reasoning_tokens":%d},'
              '"unclassified_tokens":0}')
ZERO_TOKENS = (_TOKENS % (0, 0, 0, 0, 0, 0, 0), _BREAKDOWN % (0, 0, 0, 0, 0, 0, 0, 0))
MAX_INPUT = 400_000


def token_fragment(rng: random.Random, spec: ProviderSpec, model: ModelSpec) -> tuple[tuple[str, str], int]:
    """((tokens member, token_breakdown member), output tokens) for one success."""
    prompt = min(int(lognormal(rng, 1.0) * model.input_median) + 20, MAX_INPUT)
    output = int(lognormal(rng, 0.9) * model.output_median) + 1
    reasoning = int(output * model.reasoning_share * rng.random() * 2) if model.reasoning_share else 0
    read = int(prompt * (0.3 + 0.65 * rng.random())) if rng.random() < spec.cache_share else 0
    if spec.semantics == "independent":
        write = int(prompt * 0.2 * rng.random()) if rng.random() < 0.15 else 0
        uncached = max(prompt - read - write, 1)
        total = uncached + read + write + output + reasoning
        tokens = _TOKENS % (uncached, output, reasoning, read, read, write, total)
        breakdown = _BREAKDOWN % (total, uncached + read + write, uncached, read, write,
                                  output + reasoning, output, reasoning)
        return (tokens, breakdown), output
    if spec.semantics == "separate-reasoning":
        total = prompt + output + reasoning
        tokens = _TOKENS % (prompt, output, reasoning, read, read, 0, total)
        breakdown = _BREAKDOWN % (total, prompt, prompt - read, read, 0, output + reasoning, output, reasoning)
        return (tokens, breakdown), output
    reasoning = min(reasoning, output)
    total = prompt + output
    tokens = _TOKENS % (prompt, output, reasoning, read, read, 0, total)
    breakdown = _BREAKDOWN % (total, prompt, prompt - read, read, 0, output, output - reasoning, reasoning)
    return (tokens, breakdown), output
