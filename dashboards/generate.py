"""Generate the provisioned dashboards: `python3 dashboards/generate.py` (writes dashboards/*.json)
or `python3 dashboards/generate.py --check` (exit 1 when a committed file is stale).

The panels follow the seed's investigation flow: time range, summary cards, where failures
concentrate (status, failure type), Account Overview, API Key Summary, Realtime Requests;
every click leads to the next action (Usage Analytics for cost, Account Action Queue for auth).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dashkit import (  # noqa: E402
    ALL_VAR_NAMES, BLUE, FILES, GREEN, ORANGE, RATE_STEPS, RED, YELLOW, annotation, colored_rate,
    dashboard, drill_url, field_value, hidden, link, links_on, override, reduce_stat, row, stat,
    table, target, text, timeseries, unit_on, wrapped,
)

HERE = Path(__file__).resolve().parent
V = ALL_VAR_NAMES
AUTH_QUOTA_TYPES = "/auth|quota|credential|forbidden|unauthorized/i"
AUTH_QUOTA_CODES = "/^(401|402|403|429)$/"


def _account_links(key_field: str) -> list[dict[str, Any]]:
    value = field_value(key_field)
    return [link("Filter Monitoring to this account", drill_url("monitoring", V, account=value)),
            link("Open its Account Action Queue entry", drill_url("actions", V, account=value))]


def _api_key_links(hash_field: str) -> list[dict[str, Any]]:
    value = field_value(hash_field)
    return [link("Open Usage Analytics for this key", drill_url("usage", V, api_key=value)),
            link("Filter Monitoring to this key", drill_url("monitoring", V, api_key=value))]


USAGE_LINK = link("Open Usage Analytics", drill_url("usage", V))
ACTIONS_LINK = link("Open Account Action Queue", drill_url("actions", V))


def _summary_cards(names: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    cards = []
    for i, (name, title, unit) in enumerate(names):
        tgt = target("A", "summary", V)
        steps = RATE_STEPS if name == "success_rate" else None
        links = [USAGE_LINK] if name in ("est_cost_usd", "total_tokens") else None
        w = 24 - 3 * (len(names) - 1) if i == len(names) - 1 else 3
        cards.append(stat(title, tgt, name, unit, w=w, steps=steps, links=links,
                          description=f"`{name}` over the range; the second value is the change "
                                      "against the previous window of equal length."))
    return cards


def _request_table() -> dict[str, Any]:
    status_steps = [{"color": GREEN, "value": None}, {"color": ORANGE, "value": 400},
                    {"color": RED, "value": 500}]
    overrides = [
        hidden("id"), hidden("account_key"), hidden("api_key_hash"),
        override("status_code", ("custom.cellOptions", {"type": "color-background", "mode": "basic"}),
                 ("thresholds", {"mode": "absolute", "steps": status_steps})),
        wrapped("fail_summary", 420),
        unit_on("latency_ms", "ms"), unit_on("ttft_ms", "ms"), unit_on("est_cost_usd", "currencyUSD"),
        links_on("trace_id", link("Filter to this trace", drill_url("monitoring", V, trace_id=field_value("trace_id")))),
        links_on("request_id", link("Filter to this request", drill_url("monitoring", V, trace_id=field_value("request_id")))),
        links_on("account", *_account_links("account_key")),
        links_on("api_key", *_api_key_links("api_key_hash")),
        links_on("failure_type", link("Open Account Action Queue for this account",
                                      drill_url("actions", V, account=field_value("account_key")))),
    ]
    return table("Realtime Requests", target("A", "requests", V, limit=500), overrides, h=12,
                 description="Newest first. Click a trace or request id to filter to that request; "
                             "the failure summary wraps (inspect a cell to read it in full).")


def monitoring() -> dict[str, Any]:
    cards = [("requests", "Requests", "short"), ("failures", "Failures", "short"),
             ("success_rate", "Success rate", "percentunit"), ("p95_latency_ms", "p95 latency", "ms"),
             ("avg_latency_ms", "Avg latency", "ms"), ("total_tokens", "Tokens", "short"),
             ("est_cost_usd", "Est. cost", "currencyUSD")]
    by_class = [target("A", "timeseries", V, measure="requests", split_by="status_class")]
    class_colors = [override(f"/^{name}$/", ("color", {"mode": "fixed", "fixedColor": color}), regex=True)
                    for name, color in (("success", GREEN), ("failed", RED), ("unusual", ORANGE))]
    latency = [target(r, "timeseries", V, measure=m)
               for r, m in (("A", "latency_p50"), ("B", "latency_p95"), ("C", "latency_p99"))]
    account_overrides = [
        hidden("account_key"), colored_rate("success_rate"), wrapped("last_failure_summary", 320),
        links_on("account", *_account_links("account_key")),
        override("est_cost_usd", ("unit", "currencyUSD"), ("links", [USAGE_LINK])),
        unit_on("avg_latency_ms", "ms"), unit_on("p95_latency_ms", "ms"), unit_on("quota_used_pct", "percent"),
    ]
    key_overrides = [
        hidden("api_key_hash"), colored_rate("success_rate"),
        links_on("api_key", *_api_key_links("api_key_hash")),
        override("est_cost_usd", ("unit", "currencyUSD"), ("links", [USAGE_LINK])),
    ]
    panels = [
        row("Summary (change vs the previous window)"), *_summary_cards(cards),
        row("Where do failures concentrate?"),
        timeseries("Requests vs failures by status class", by_class, "short",
                   overrides=class_colors,
                   stack=True),
        timeseries("Success rate over time", [target("A", "timeseries", V, measure="success_rate")], "percentunit",
                   min=0, max=1, thresholds={"mode": "absolute", "steps": RATE_STEPS}),
        timeseries("Latency p50 / p95 / p99", latency, "ms", w=8),
        timeseries("Failures by failure type",
                   [target("A", "timeseries", V, measure="failures", split_by="failure_type")], "short",
                   w=8, stack=True, overrides=[links_on(AUTH_QUOTA_TYPES, ACTIONS_LINK, regex=True)],
                   description="Auth and quota failures link to the Account Action Queue."),
        timeseries("Failures by status code",
                   [target("A", "timeseries", V, measure="failures", split_by="status_code")], "short",
                   w=8, stack=True, overrides=[links_on(AUTH_QUOTA_CODES, ACTIONS_LINK, regex=True)]),
        row("Who is involved?"),
        table("Account Overview", target("A", "accounts", V, sort="worst"), account_overrides,
              description="Worst accounts first. Click an account to filter to it or open its action."),
        table("API Key Summary", target("A", "api_keys", V), key_overrides, h=8,
              description="Caller keys by requests. Click a key to open its usage."),
        row("Request detail"), _request_table(),
    ]
    annos = [annotation("Failure spikes", RED, "failure_spikes", V),
             annotation("Collector gaps", ORANGE, "collector_gaps", ["instance"])]
    return dashboard("monitoring", panels, V, annos, refresh="30s")


def _usage_table(title: str, by: str, key_links: list[dict[str, Any]], h: int = 8) -> dict[str, Any]:
    overrides = [hidden("key"), links_on("label", *key_links), unit_on("est_cost_usd", "currencyUSD"),
                 unit_on("cache_hit_rate", "percentunit"),
                 override("cost_share", ("unit", "percentunit"),
                          ("custom.cellOptions", {"type": "gauge", "mode": "basic"}), ("min", 0), ("max", 1))]
    return table(title, target("A", "usage", V, by=by), overrides, w=12, h=h)


def usage() -> dict[str, Any]:
    cards = [("requests", "Requests", "short"), ("total_tokens", "Tokens", "short"),
             ("input_tokens", "Input tokens", "short"), ("output_tokens", "Output tokens", "short"),
             ("cached_tokens", "Cached tokens", "short"), ("cache_hit_rate", "Cache hit rate", "percentunit"),
             ("est_cost_usd", "Est. cost", "currencyUSD")]
    model_links = [link("Filter Monitoring to this model", drill_url("monitoring", V, model=field_value("key")))]
    provider_links = [link("Filter Monitoring to this provider",
                           drill_url("monitoring", V, provider=field_value("key")))]
    panels = [
        row("Totals (change vs the previous window)"), *_summary_cards(cards),
        row("Over time"),
        timeseries("Tokens by model", [target("A", "timeseries", V, measure="tokens", split_by="model")],
                   "short", stack=True),
        timeseries("Est. cost by model", [target("A", "timeseries", V, measure="cost", split_by="model")],
                   "currencyUSD", stack=True),
        timeseries("Est. cost by API key", [target("A", "timeseries", V, measure="cost", split_by="api_key")],
                   "currencyUSD", w=8, stack=True, max_points=30,
                   description="At most 30 points (hourly at 24 h, 6-hourly at 7 d, daily at 30 d): API key x "
                               "account x model is kept daily only, so finer buckets filtered by account or "
                               "model read every raw event of that account in the range."),
        timeseries("Est. cost by account", [target("A", "timeseries", V, measure="cost", split_by="account")],
                   "currencyUSD", w=8, stack=True, min_interval="1h",
                   description="Hourly buckets at least: the account rollups are hourly and daily, so "
                               "5-minute buckets of 100 accounts would read every raw event of the range."),
        timeseries("Est. cost by provider", [target("A", "timeseries", V, measure="cost", split_by="provider")],
                   "currencyUSD", w=8, stack=True),
        timeseries("Cache hit rate", [target("A", "timeseries", V, measure="cache_hit_rate")], "percentunit",
                   w=24, h=6, min=0, max=1),
        row("Top spenders and breakdowns (by est. cost)"),
        _usage_table("Top spenders (API keys)", "api_key", _api_key_links("key")),
        _usage_table("By model", "model", model_links),
        _usage_table("By account", "account", _account_links("key")),
        _usage_table("By provider", "provider", provider_links),
    ]
    return dashboard("usage", panels, V, [annotation("Failure spikes", RED, "failure_spikes", V)])


def account_actions() -> dict[str, Any]:
    actions = target("A", "account_actions", V)
    mapping = {"type": "value", "options": {
        "reauth": {"color": ORANGE, "index": 0, "text": "re-authenticate"},
        "review": {"color": YELLOW, "index": 1, "text": "review"},
        "delete": {"color": RED, "index": 2, "text": "delete auth file"},
        "wait_quota_reset": {"color": BLUE, "index": 3, "text": "wait for quota reset"}}}
    overrides = [
        hidden("account_key"), links_on("account", *_account_links("account_key")[:1]),
        override("action", ("mappings", [mapping]),
                 ("custom.cellOptions", {"type": "color-background", "mode": "basic"})),
        wrapped("last_evidence", 420), wrapped("reason", 260),
    ]
    panels = [
        reduce_stat("Accounts needing action", target("A", "account_actions", V), "hits", "count", w=6),
        reduce_stat("Failure hits behind them", target("A", "account_actions", V), "hits", "sum", w=6),
        timeseries("Auth and quota failures by account",
                   [target("A", "timeseries", V, measure="failures", split_by="account")], "short",
                   w=12, h=4, stack=True, min_interval="1h",
                   description="Hourly buckets at least: the account rollups are hourly and daily."),
        table("Accounts needing action", actions, overrides, h=14,
              description="Suggested action, reason, hits, first / last seen, last evidence and "
                          "quota recover-at. Click an account to see its requests in Monitoring."),
    ]
    return dashboard("actions", panels, V, [
        annotation("Account status changes", YELLOW, "account_status", V),
        annotation("Failure spikes", RED, "failure_spikes", V)])


CHECKLIST = """\
If **CPA Monitoring** shows no data, check in this order:

1. Client requests actually go through CPA (not straight to the provider).
2. CPA usage publishing is enabled (`usage-statistics-enabled: true`; see `usage_publishing` above).
3. The collector is running: `state` above is `running`, `last_consumed` is recent
   (`CPA_MONITOR_COLLECTOR=on`, `CPA_MONITOR_CPA_URL` and the management key set).
4. CPA's usage queue retention is longer than the poll interval (`queue_retention_s`, `lag_s`).
5. No second consumer pops the same CPA queue (another CPA Monitor or a CPA-Manager in pop mode).
6. RESP mode connects directly to CPA's port (8317), not through an HTTP reverse proxy.

Data lost from CPA's queue cannot be recovered: gaps are marked as annotations and listed above.
"""


def collector_health() -> dict[str, Any]:
    inst = ["instance"]
    overrides = [
        override("state", ("mappings", [{"type": "value", "options": {
            "running": {"color": GREEN, "index": 0}, "error": {"color": RED, "index": 1},
            "stopped": {"color": ORANGE, "index": 2}}}]),
            ("custom.cellOptions", {"type": "color-background", "mode": "basic"})),
        unit_on("lag_s", "s"), unit_on("queue_retention_s", "s"),
        wrapped("last_error", 300), wrapped("warnings", 300),
    ]
    gaps = target("A", "annotations", inst, kind="collector_gaps")
    panels = [
        table("Collector state per upstream", target("A", "collector", inst), overrides, h=7),
        reduce_stat("Inserted", target("A", "collector", inst), "inserted", "sum", w=6),
        reduce_stat("Duplicates", target("A", "collector", inst), "duplicates", "sum", w=6),
        reduce_stat("Dead letters", target("A", "collector", inst), "dead_letters", "sum", w=6),
        reduce_stat("Max lag", target("A", "collector", inst), "lag_s", "max", unit="s", w=6),
        timeseries("Ingest rate (events stored per interval, by instance)",
                   [target("A", "timeseries", inst, measure="requests", split_by="instance")], "short",
                   w=24, h=7),
        table("Collector gaps", gaps, [wrapped("text", 420)], h=6),
        text("Empty Monitoring? Checklist", CHECKLIST, h=9),
    ]
    return dashboard("collector", panels, inst, [annotation("Collector gaps", ORANGE, "collector_gaps", inst)],
                     refresh="30s")


BUILDERS = {"monitoring": monitoring, "usage": usage, "actions": account_actions, "collector": collector_health}


def render() -> dict[str, str]:
    """file name -> JSON text, exactly as committed."""
    return {FILES[k]: json.dumps(build(), indent=2, sort_keys=False) + "\n" for k, build in BUILDERS.items()}


def main(argv: list[str]) -> int:
    stale = []
    for name, content in render().items():
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                stale.append(name)
        else:
            path.write_text(content, encoding="utf-8")
    if stale:
        sys.stderr.write("stale dashboards (run python3 dashboards/generate.py): " + ", ".join(stale) + "\n")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
