"""TrafficGenerator: realistic CPA usage events (reference 1.5 shape) for the demo and benchmarks.

`events(n, start_ms, end_ms)` yields compact JSON bytes fast (pre-encoded fragments, no
json.dumps per event); `payloads(...)` yields the same events as dicts; `auth_files()` is the
matching CPA auth-file list. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator

from datasource import traffic_catalog as cat
from datasource.traffic_failures import credential_error, failure_shape
from datasource.traffic_tokens import ZERO_TOKENS, lognormal, token_fragment

BURST_PERIOD_MS = 30 * 60 * 1000
BURST_LEN_MS = 4 * 60 * 1000
FAILOVER_SHARE = 0.25  # share of retryable failures that CPA retried on another account


def _enc(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Account:
    index: int
    name: str
    file: str
    email: str
    provider: str  # key of traffic_catalog.PROVIDERS
    auth_index: str
    project_id: str
    plan: str
    source: str
    disabled: bool
    fragment: str  # pre-encoded "source","auth_index"[,"access_token_sha256"] members


class TrafficGenerator:
    def __init__(self, seed: int = 0, accounts: int = 20, api_keys: int = 10, models: int = 12,
                 failure_rate: float = 0.05, providers: tuple[str, ...] = tuple(cat.PROVIDERS),
                 utc_offset_minutes: int = 480, bursts: bool = True) -> None:
        self.seed = seed
        self.failure_rate = failure_rate
        self.bursts = bursts
        self.rng = random.Random(seed)
        self.models = [m for m in cat.MODELS if m.provider in providers][:max(models, 1)]
        usable = {m.provider for m in self.models}
        mix = [p for p in cat.PROVIDER_MIX if p in usable] or sorted(usable)
        self.accounts = [self._account(i, mix[i % len(mix)], disabled=(i == accounts - 1 and accounts > 2))
                         for i in range(accounts)]
        self.api_keys = [f"sk-client-demo-{i + 1:04d}" for i in range(api_keys)]
        self._offset_s = utc_offset_minutes * 60
        self._tz = _tz_suffix(utc_offset_minutes)
        self._ts_cache: tuple[int, str] = (-1, "")
        self._burst_slot: tuple[int, tuple[int, int, Account] | None] = (-1, None)
        self._prepare_tables()

    # --- setup --------------------------------------------------------------------
    def _account(self, i: int, provider: str, disabled: bool) -> Account:
        base = cat.NAMES[i % len(cat.NAMES)]
        name = base if i < len(cat.NAMES) else f"{base}{i // len(cat.NAMES) + 1}"
        digest = hashlib.sha256(f"{self.seed}:{name}:{provider}".encode()).hexdigest()
        email = f"{name}@example.com"
        project = f"{name}-proj-{digest[16:22]}" if provider in ("gemini", "vertex") else ""
        spec = cat.PROVIDERS[provider]
        source = {"vertex": project, "openai-compatible": f"sk-or-v1-{digest[:48]}"}.get(provider, email)
        frag = f'"source":{_enc(source)},"auth_index":"{digest[:16]}",'
        if spec.auth_type == "oauth":
            frag += f'"access_token_sha256":"{hashlib.sha256(digest.encode()).hexdigest()}",'
        file = f"{name}.json" if provider != "openai-compatible" else f"openrouter-{name}.json"
        return Account(i, name, file, email, provider, digest[:16], project,
                       cat.PLANS[i % len(cat.PLANS)], source, disabled, frag)

    def _prepare_tables(self) -> None:
        live = [a for a in self.accounts if not a.disabled] or self.accounts
        weights = [1.0 / (rank + 1) ** 0.7 for rank in range(len(live))]
        self.rng.shuffle(weights)
        self._live = live
        self._acc_cum = _cumulative(weights)
        self._key_cum = _cumulative([1.0 / (rank + 1) ** 0.9 for rank in range(len(self.api_keys))])
        self._by_provider = {p: [m for m in self.models if m.provider == p] for p in cat.PROVIDERS}
        self._peers = {p: [a for a in live if a.provider == p] for p in cat.PROVIDERS}
        self._clients = [
            f'"client_ip":"{cat.CLIENT_IPS[(k * 7) % len(cat.CLIENT_IPS)]}",'
            f'"x_forwarded_for":"{"203.0.113.%d" % (k + 5) if k % 4 == 3 else ""}",'
            for k in range(len(self.api_keys))]
        self._route = {
            (p, k): (f'"endpoint":"{spec.endpoints[k % len(spec.endpoints)]}","auth_type":"{spec.auth_type}",'
                     f'"api_key":"{self.api_keys[k]}",')
            for p, spec in cat.PROVIDERS.items() for k in range(len(self.api_keys))}
        self._who_cache: dict[tuple[int, int], str] = {}
        self._codex_cache: dict[int, tuple[int, str]] = {}
        self._fail_kinds = list(cat.FAILURES)
        self._ident = {
            (m.name, alias): (f'"provider":"{cat.PROVIDERS[m.provider].name}",'
                              f'"executor_type":"{cat.PROVIDERS[m.provider].executor}",'
                              f'"model":{_enc(m.name)},"alias":{_enc(alias)},')
            for m in self.models for alias, _ in m.aliases}
        self._fail_cum = _cumulative([w for _, _, w in cat.FAILURES])

    # --- public API ---------------------------------------------------------------------
    def auth_files(self) -> list[dict[str, Any]]:
        """CPA's GET /v0/management/auth-files entries for these accounts."""
        return [_auth_file(a) for a in self.accounts]

    def events(self, n: int, start_ms: int, end_ms: int) -> Iterator[bytes]:
        """n events (failover retries included) spread over [start_ms, end_ms), as JSON bytes."""
        step = max((end_ms - start_ms) / max(n, 1), 0.0)
        i = 0
        while i < n:
            ts = int(start_ms + (i + self.rng.random()) * step)
            for item in self.attempts(ts):
                if i < n:
                    yield item
                    i += 1

    def payloads(self, n: int, start_ms: int, end_ms: int) -> Iterator[dict[str, Any]]:
        for item in self.events(n, start_ms, end_ms):
            yield json.loads(item)

    def live(self, now_ms: int | None = None) -> list[bytes]:
        """The attempts of one request happening now (one item, or several on failover)."""
        return self.attempts(int(time.time() * 1000) if now_ms is None else now_ms)

    def attempts(self, ts_ms: int) -> list[bytes]:
        """One client request at ts_ms: its first attempt, plus a retry on a peer after a failover."""
        rng = self.rng
        burst = self._burst(ts_ms)
        if burst is not None and rng.random() < 0.25:
            account = burst
        else:
            account = self._live[bisect.bisect(self._acc_cum, rng.random() * self._acc_cum[-1])]
        request_id = "%08x" % rng.getrandbits(32)
        key = bisect.bisect(self._key_cum, rng.random() * self._key_cum[-1])
        failure = self._pick_failure(account, account is burst)
        first, latency = self._render(ts_ms, account, key, request_id, failure)
        if failure is None or failure[0] not in (429, 500, 502, 503, 529) or rng.random() > FAILOVER_SHARE:
            return [first]
        peers = [a for a in self._peers[account.provider] if a is not account]
        if not peers:
            return [first]
        retry, _ = self._render(ts_ms + latency, rng.choice(peers), key, request_id, None)
        return [first, retry]

    def credential_error(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The `errors`-channel event CPA emits for a failed attempt's credential (401/403/429)."""
        return credential_error(payload, self._auth_id(payload.get("auth_index", "")))

    # --- one attempt -----------------------------------------------------------------------
    def _burst(self, ts_ms: int) -> Account | None:
        """In some 30-minute slots, one account fails hard for four minutes."""
        if not self.bursts:
            return None
        slot = ts_ms // BURST_PERIOD_MS
        if slot != self._burst_slot[0]:
            self._burst_slot = (slot, self._burst_plan(slot))
        plan = self._burst_slot[1]
        if plan is None or not plan[0] <= ts_ms < plan[1]:
            return None
        return plan[2]

    def _burst_plan(self, slot: int) -> tuple[int, int, Account] | None:
        pick = random.Random(self.seed * 1_000_003 + slot)
        if pick.random() > 0.35:
            return None
        start = slot * BURST_PERIOD_MS + pick.randrange(BURST_PERIOD_MS - BURST_LEN_MS)
        return start, start + BURST_LEN_MS, self._live[pick.randrange(len(self._live))]

    def _pick_failure(self, account: Account, in_burst: bool) -> tuple[int, str] | None:
        rng = self.rng
        if in_burst:
            if rng.random() < 0.7:
                return (429, "quota") if account.provider == "codex" else (401, "token_invalidated")
            return None
        if rng.random() >= self.failure_rate:
            return None
        status, kind, _ = self._fail_kinds[bisect.bisect(self._fail_cum, rng.random() * self._fail_cum[-1])]
        if status == 529 and account.provider != "claude":
            return 503, "unavailable"
        return status, kind

    def _render(self, ts_ms: int, account: Account, key: int, request_id: str,
                failure: tuple[int, str] | None) -> tuple[bytes, int]:
        rng = self.rng
        spec = cat.PROVIDERS[account.provider]
        models = self._by_provider[account.provider]
        model = models[int(rng.random() * len(models))]
        alias, effort = model.aliases[int(rng.random() * len(model.aliases))]
        stream = rng.random() < spec.stream_share
        tier = "priority" if account.provider == "codex" and rng.random() < 0.2 else ""
        if failure is None:
            tokens, output = token_fragment(rng, spec, model)
            ttft = int(lognormal(rng, 0.45) * spec.ttft_median_ms)
            latency = ttft + int(output / spec.tokens_per_s * 1000 * lognormal(rng, 0.3) + rng.random() * 60)
            if not stream:
                ttft = max(latency - int(rng.random() * 40), 1)
            headers = self._success_headers(account, stream, ts_ms)
            failed, status, body = "false", 200, '""'
        else:
            tokens = ZERO_TOKENS
            status, body_text, hdrs, latency = failure_shape(rng, failure, account, ts_ms)
            ttft, failed, body = 0, "true", _enc(body_text)
            headers = json.dumps(hdrs, separators=(",", ":"))
        resp_tier = ',"response_service_tier":"default"' if tier and failure is None else ""
        item = (
            f'{{"timestamp":"{self._timestamp(ts_ms)}","latency_ms":{latency},"ttft_ms":{ttft},'
            f'{self._who(account, key)}{tokens[0]},'
            f'"failed":{failed},"generate":true,"fail":{{"status_code":{status},"body":{body}}},'
            f'"response_headers":{headers},"accounting_version":2,{tokens[1]},'
            f'{self._ident[(model.name, alias)]}{self._route[(account.provider, key)]}"request_id":"{request_id}",'
            f'"reasoning_effort":"{effort}","service_tier":"{tier}"{resp_tier}}}'
        )
        return item.encode(), latency

    def _who(self, account: Account, key: int) -> str:
        """Pre-encoded source/auth_index/token hash and client ip/xff/user agent members."""
        frag = self._who_cache.get((account.index, key))
        if frag is None:
            ua = cat.PROVIDERS[account.provider].user_agents
            frag = f'{account.fragment}{self._clients[key]}"user_agent":{_enc(ua[key % len(ua)])},'
            self._who_cache[(account.index, key)] = frag
        return frag

    def _success_headers(self, account: Account, stream: bool, ts_ms: int) -> str:
        ctype = '"text/event-stream"' if stream else '"application/json"'
        rid = "%06x" % self.rng.getrandbits(24)
        if account.provider == "codex":
            return f'{{"Content-Type":[{ctype}],{self._codex_window(account, ts_ms // 60000)}"X-Request-Id":["req_{rid}"]}}'
        if account.provider == "claude":
            return (f'{{"Anthropic-Ratelimit-Unified-Status":["allowed"],"Content-Type":[{ctype}],'
                    f'"Request-Id":["req_011C{rid}"]}}')
        return f'{{"Content-Type":[{ctype}],"X-Request-Id":["{rid}"]}}'

    def _codex_window(self, account: Account, minute: int) -> str:
        """The X-Codex-* usage headers of an account in one minute (cached per minute)."""
        cached = self._codex_cache.get(account.index)
        if cached is not None and cached[0] == minute:
            return cached[1]
        used = (minute * 7 + account.index * 13) % 97
        frag = (f'"X-Codex-Plan-Type":["{account.plan}"],'
                f'"X-Codex-Primary-Used-Percent":["{used}"],"X-Codex-Primary-Window-Minutes":["300"],'
                f'"X-Codex-Primary-Reset-After-Seconds":["{(300 - minute % 300) * 60}"],'
                f'"X-Codex-Secondary-Used-Percent":["{used // 3}"],"X-Codex-Secondary-Window-Minutes":["10080"],'
                f'"X-Codex-Secondary-Reset-After-Seconds":["{(10080 - minute % 10080) * 60}"],')
        self._codex_cache[account.index] = (minute, frag)
        return frag

    def _timestamp(self, ts_ms: int) -> str:
        """RFC3339Nano in the CPA host's zone, trailing fractional zeros removed (Go style)."""
        sec = ts_ms // 1000
        cached_sec, prefix = self._ts_cache
        if sec != cached_sec:
            t = time.gmtime(sec + self._offset_s)
            prefix = "%04d-%02d-%02dT%02d:%02d:%02d" % t[:6]
            self._ts_cache = (sec, prefix)
        frac = ("%09d" % (ts_ms % 1000 * 1_000_000 + self.rng.getrandbits(19))).rstrip("0")
        return f"{prefix}.{frac}{self._tz}" if frac else prefix + self._tz

    def _auth_id(self, auth_index: str) -> str:
        for account in self.accounts:
            if account.auth_index == auth_index:
                return account.file
        return ""


def _cumulative(weights: list[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


def _tz_suffix(minutes: int) -> str:
    if minutes == 0:
        return "Z"
    sign = "+" if minutes > 0 else "-"
    return "%s%02d:%02d" % (sign, abs(minutes) // 60, abs(minutes) % 60)


def _auth_file(a: Account) -> dict[str, Any]:
    spec = cat.PROVIDERS[a.provider]
    entry: dict[str, Any] = {
        "id": a.file, "auth_index": a.auth_index, "name": a.file, "type": spec.file_type,
        "provider": spec.name, "label": a.email if spec.auth_type == "oauth" else f"{a.name} (openrouter)",
        "status": "disabled" if a.disabled else "active", "status_message": "", "disabled": a.disabled,
        "unavailable": False, "runtime_only": False, "source": "file",
    }
    if spec.auth_type == "oauth":
        entry.update(email=a.email, account_type="oauth", account=a.email)
    else:
        entry.update(account_type="api_key", account=a.source)  # CPA exposes the raw key here
    if a.project_id:
        entry["project_id"] = a.project_id
    if a.provider == "codex":
        entry["plan_type"] = a.plan
    return entry
