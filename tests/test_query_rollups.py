"""The rollup read path against the raw path: same answers over many filters, ranges and targets.

Data: TrafficGenerator events (20 accounts, 10 API keys, 12 models, failures, bursts)
over three days starting at an unaligned time, ingested through normalize -> store (so
the rollups and the alias catalog are maintained as in production), with one batch
delivered twice. Every comparison runs a target with `rollups=False` (raw events only,
the reference) and with rollups; counts, sums, costs and rates must be identical,
latency/TTFT percentiles within 1 % (merged sketches with the raw edges added).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pytest

from datasource import query, query_plan, sketch, store
from datasource.db import ACCOUNT_INDEXED, open_database
from datasource.flights import Flight
from test_api_key_sets import statements
from datasource.filters import clauses_from_adhoc, clauses_from_payload
from datasource.ingest import Ingestor
from datasource.model import TargetSpec
from datasource.traffic import TrafficGenerator

HOUR = 3_600_000
DAY = 24 * HOUR
START = 1_777_792_407_000  # 2026-05-03T07:13:27Z: not on an hour
END = START + 3 * DAY
EVENTS = 3000

# (from, to) offsets: unaligned hours, across midnight, whole days, sub-hour, the whole span.
MIDNIGHT = 1_777_852_800_000  # 2026-05-04T00:00:00Z
RANGES = {
    "5h-unaligned": (START + 2 * HOUR + 17_000, START + 7 * HOUR + 41_000),
    "30h-midnight": (MIDNIGHT - 9 * HOUR - 123_456, MIDNIGHT + 21 * HOUR + 654_321),
    "whole-day": (MIDNIGHT, MIDNIGHT + DAY),
    "2.5d": (START + 5 * HOUR + 1, START + 65 * HOUR + 7),
    "20min": (MIDNIGHT - 10 * 60_000, MIDNIGHT + 10 * 60_000),
    "all": (START - HOUR, END + HOUR),
}


@pytest.fixture(scope="module")
def traffic():
    return TrafficGenerator(seed=11, accounts=20, api_keys=10)


@pytest.fixture(scope="module")
def db(tmp_path_factory, traffic):
    conn = open_database(str(tmp_path_factory.mktemp("rollups") / "monitor.db"))
    events = list(traffic.events(EVENTS, START, END))
    ingestor = Ingestor(conn, "default")
    for i in range(0, len(events), 500):
        ingestor.usage(events[i:i + 500])
    again = ingestor.usage(events[1000:1500])  # re-delivered: every one a duplicate
    assert again.inserted == 0 and again.duplicates == 500
    return conn


def _pick(conn, sql: str) -> Any:
    return conn.execute(sql).fetchone()[0]


@pytest.fixture(scope="module")
def filters(db) -> dict[str, Any]:
    """Filter cases with values taken from the data (busiest account, key, model...)."""
    account, model = db.execute(
        "SELECT account_key, analytics_model FROM events GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 1").fetchone()
    label = _pick(db, f"SELECT account FROM events WHERE account_key = '{account}' AND account IS NOT NULL")
    key_hash, masked = db.execute("SELECT api_key_hash, api_key_masked FROM events "
                                  "WHERE api_key_hash IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC").fetchone()
    requested = _pick(db, "SELECT model FROM events WHERE model != analytics_model LIMIT 1") or model
    provider = _pick(db, "SELECT provider FROM events GROUP BY 1 ORDER BY count(*) DESC")
    ftype = _pick(db, "SELECT failure_type FROM events WHERE failed = 1 GROUP BY 1 ORDER BY count(*) DESC")
    rtype = _pick(db, "SELECT request_type FROM events WHERE request_type IS NOT NULL LIMIT 1")
    return {
        "none": {},
        "instance": {"instance": "default"},
        "provider": {"provider": provider},
        "model": {"model": model},
        "model-requested": {"model": requested},
        "model-multi": {"model": f"({model}|{requested})"},
        "account-key": {"account": account},
        "account-label": {"account": label},
        "api-key-hash": {"api_key": key_hash},
        "api-key-masked": {"api_key": [masked]},
        "status-failed": {"status": "failed"},
        "status-success": {"status": "success"},
        "status-429": {"status": 429},
        "status-5xx": {"status": "5xx"},
        "status-unusual": {"status": "unusual"},
        "failure-type": {"failure_type": ftype},
        "request-type": {"request_type": rtype},
        "cache-hit": {"cache": "hit"},
        "cache-read": {"cache": "read"},  # not in any rollup key: raw
        "project": {"project": "none-such"},  # raw
        "min-latency": {"min_latency_ms": 2000},  # raw
        "account+model": {"account": account, "model": model},
        "adhoc-provider-ne": [{"key": "provider", "operator": "!=", "value": provider}],
        "adhoc-model-regex": [{"key": "model", "operator": "=~", "value": "^gpt"}],
        "adhoc-account-not-regex": [{"key": "account", "operator": "!~", "value": "^a"}],
        "adhoc-status-gt": [{"key": "status", "operator": ">", "value": "499"}],
        "adhoc-status-lt": [{"key": "status", "operator": "<", "value": "300"}],
    }


VARIANTS: list[tuple[str, dict[str, Any], int]] = [
    ("summary", {}, 15 * 60_000),
    ("timeseries", {"measure": "requests", "split_by": "status_class"}, HOUR),
    ("timeseries", {"measure": "success_rate"}, HOUR),
    ("timeseries", {"measure": "latency_p95"}, HOUR),
    ("timeseries", {"measure": "ttft_p50", "split_by": "model", "top": 3}, DAY),
    ("timeseries", {"measure": "failures", "split_by": "failure_type"}, 3 * HOUR),
    ("timeseries", {"measure": "failures", "split_by": "status_code"}, HOUR),
    ("timeseries", {"measure": "cost", "split_by": "api_key", "top": 4}, DAY),
    ("timeseries", {"measure": "tokens", "split_by": "account", "top": 5}, 2 * HOUR),
    ("timeseries", {"measure": "cache_hit_rate", "split_by": "provider"}, HOUR),
    ("timeseries", {"measure": "latency_avg", "split_by": "request_type"}, 5 * 60_000),
    ("breakdown", {"by": "status_code"}, HOUR),
    ("breakdown", {"by": "failure_type"}, HOUR),
    ("breakdown", {"by": "cache"}, HOUR),
    ("breakdown", {"by": "account"}, HOUR),
    ("usage", {"by": "model"}, HOUR),
    ("usage", {"by": "api_key"}, HOUR),
    ("usage", {"by": "provider"}, HOUR),
    ("api_keys", {}, HOUR),
    ("accounts", {"sort": "worst"}, HOUR),
    ("accounts", {"sort": "cost", "limit": 5}, HOUR),
    ("annotations", {"kind": "failure_spikes"}, HOUR),
    # the steps Grafana asks at 24 h and 7 d: 5-minute rollups (1 minute reads raw events)
    ("timeseries", {"measure": "requests", "split_by": "status_class"}, 5 * 60_000),
    ("timeseries", {"measure": "latency_p99"}, 5 * 60_000),
    ("timeseries", {"measure": "latency_p50"}, 60_000),
    ("timeseries", {"measure": "failures", "split_by": "status_code"}, 10 * 60_000),
    ("timeseries", {"measure": "success_rate"}, 15 * 60_000),
    ("timeseries", {"measure": "ttft_p95", "split_by": "model", "top": 2}, 30 * 60_000),
    ("annotations", {"kind": "failure_spikes"}, 5 * 60_000),
]
ACCOUNT_MEASURES = ("account_key", "requests", "failures", "success_rate", "total_tokens", "est_cost_usd",
                    "avg_latency_ms", "p95_latency_ms", "last_seen")
PCT_MEASURES = ("latency_p50", "latency_p95", "latency_p99", "ttft_p50", "ttft_p95")


def _spec(target, payload, clauses, rng, interval):
    return TargetSpec(target=target, payload=payload, from_ms=rng[0], to_ms=rng[1], interval_ms=interval,
                      max_data_points=100_000, clauses=clauses, now_ms=END)


def _approx_field(target: str, payload: dict[str, Any], name: str) -> bool:
    if target == "timeseries":
        return payload.get("measure") in PCT_MEASURES and name != "time"
    return name.startswith(("p50_", "p95_", "p99_", "prev_p50_", "prev_p95_", "prev_p99_")) or (
        name.startswith(("p50", "p95", "p99")) and name.endswith("change_pct"))


def _same(a: Any, b: Any, approx: bool) -> bool:
    if approx and isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=0.0101)
    return a == b


def compare(db, target, payload, clauses, rng, interval) -> None:
    raw = query.execute(db, _spec(target, payload, clauses, rng, interval), rollups=False)
    rolled = query.execute(db, _spec(target, payload, clauses, rng, interval))
    assert len(raw) == len(rolled)
    for fr, fo in zip(raw, rolled):
        assert [f.name for f in fr.fields] == [f.name for f in fo.fields], (target, payload)
        for a, b in zip(fr.fields, fo.fields):
            assert a.labels == b.labels
            if a.name.endswith("change_pct") and a.name.startswith(("p5", "p9")):
                continue  # a ratio of two approximate values: 1 % on each side, not on the ratio
            approx = _approx_field(target, payload, a.name)
            bad = [(i, x, y) for i, (x, y) in enumerate(zip(a.values, b.values)) if not _same(x, y, approx)]
            assert len(a.values) == len(b.values) and not bad, (target, payload, a.name, bad[:5])


@pytest.mark.parametrize("rng", list(RANGES), ids=list(RANGES))
def test_rollup_path_equals_raw_path(db, filters, rng):
    for fname, filt in filters.items():
        clauses = clauses_from_adhoc(filt) if isinstance(filt, list) else clauses_from_payload(filt)
        for target, payload, interval in VARIANTS:
            compare(db, target, payload, clauses, RANGES[rng], interval)


def test_the_comparisons_do_read_rollups(db, filters):
    """The matrix is not vacuous: most filter cases plan rollup pieces over 2.5 days."""
    lo, hi = RANGES["2.5d"]
    planned = {}
    for fname, filt in filters.items():
        clauses = clauses_from_adhoc(filt) if isinstance(filt, list) else clauses_from_payload(filt)
        planned[fname] = query_plan.plan(db, clauses, lo, hi).uses_rollups
    raw_only = {k for k, used in planned.items() if not used}
    # keys no rollup stores, and a requested model that is not an analytics model
    assert raw_only <= {"cache-read", "project", "min-latency", "model-requested", "model-multi"}
    assert {"cache-read", "project", "min-latency"} <= raw_only
    assert sum(planned.values()) >= 20


def test_split_range_pieces():
    tables = {HOUR: "h", DAY: "d"}
    lo, hi = MIDNIGHT - 90 * 60_000 - 5, MIDNIGHT + DAY + 2 * HOUR + 30_000
    pieces = query_plan.split_range(lo, hi, tables)
    assert [(p.table, p.from_ms, p.to_ms) for p in pieces] == [
        ("", lo, MIDNIGHT - 2 * HOUR + 2 * HOUR - HOUR),  # raw head up to the first whole hour
        ("h", MIDNIGHT - HOUR, MIDNIGHT),
        ("d", MIDNIGHT, MIDNIGHT + DAY),
        ("h", MIDNIGHT + DAY, MIDNIGHT + DAY + 2 * HOUR),
        ("", MIDNIGHT + DAY + 2 * HOUR, hi),
    ]
    # day-only family: hour edges stay raw; a range inside one hour is all raw
    assert [p.table for p in query_plan.split_range(lo, hi, {DAY: "d"})] == ["", "d", ""]
    assert [p.table for p in query_plan.split_range(MIDNIGHT + 1, MIDNIGHT + 5, tables)] == [""]
    # an aligned range is whole buckets only
    assert [p.table for p in query_plan.split_range(MIDNIGHT, MIDNIGHT + 2 * DAY, tables)] == ["d"]


def test_alias_resolution_is_exact_or_refused(db, filters):
    account = filters["account-key"]["account"]
    label = filters["account-label"]["account"]
    [c] = clauses_from_payload({"account": label})
    keys = query_plan.resolve_alias(db, c)
    assert keys is not None and account in keys
    # every key a label resolves to carries that label on all its events, and vice versa
    for key in keys:
        assert _pick(db, f"SELECT count(*) FROM events WHERE account_key = '{key}' "
                         f"AND coalesce(account, '') != '{label}' AND coalesce(auth_index, '') != '{label}'") == 0
    [c] = clauses_from_payload({"model": "no-such-model"})
    assert query_plan.resolve_alias(db, c) == []


def test_step_not_a_multiple_of_five_minutes_reads_raw(db):
    lo, hi = RANGES["2.5d"]
    assert not query_plan.plan(db, (), lo, hi, step=2 * 60_000).uses_rollups
    assert not query_plan.plan(db, (), lo, hi, step=7 * 60_000).uses_rollups
    for step in (5 * 60_000, 90 * 60_000):  # 5-minute buckets fit; an hour bucket would straddle
        assert {p.table for p in query_plan.plan(db, (), lo, hi, step=step).pieces} == {"", "rollup_latency_total_5m"}
    assert "rollup_latency_total_day" in {p.table for p in query_plan.plan(db, (), lo, hi, step=DAY).pieces}


def test_split_range_with_five_minute_grain():
    tables = {5 * 60_000: "m", HOUR: "h", DAY: "d"}
    lo, hi = MIDNIGHT - HOUR - 7 * 60_000 - 3, MIDNIGHT + 2 * DAY + 12 * 60_000 + 9
    pieces = [(p.table, p.from_ms, p.to_ms) for p in query_plan.split_range(lo, hi, tables)]
    assert pieces == [
        ("", lo, MIDNIGHT - HOUR - 5 * 60_000),  # raw edges under 5 minutes
        ("m", MIDNIGHT - HOUR - 5 * 60_000, MIDNIGHT - HOUR),
        ("h", MIDNIGHT - HOUR, MIDNIGHT),
        ("d", MIDNIGHT, MIDNIGHT + 2 * DAY),
        ("m", MIDNIGHT + 2 * DAY, MIDNIGHT + 2 * DAY + 10 * 60_000),
        ("", MIDNIGHT + 2 * DAY + 10 * 60_000, hi),
    ]
    # an hour-only family: 1 h edges raw
    assert [p.table for p in query_plan.split_range(lo, hi, {HOUR: "h"})] == ["", "h", ""]


def _tables(db, clauses, lo, hi, dims=(), **kw) -> set[str]:
    return {p.table for p in query_plan.plan(db, clauses, lo, hi, dims, **kw).pieces} - {""}


def test_families_chosen_for_the_monitoring_panels(db, filters):
    lo, hi = RANGES["30h-midnight"]
    acct_model = clauses_from_payload(filters["account+model"])
    model = clauses_from_payload(filters["model"])
    five = 5 * 60_000
    # unfiltered percentiles: the instance x status sketches; a model filter: per-model sketches
    assert _tables(db, (), lo, hi, sketches=True, step=five) == {"rollup_latency_total_5m"}
    assert _tables(db, model, lo, hi, sketches=True, step=five) == {"rollup_latency_5m"}
    assert _tables(db, (), lo, hi, sketches=True) == {
        "rollup_latency_total_5m", "rollup_latency_total_hour"}
    # account + model percentiles (summary p95) and Account Overview p95 at 24 h: hourly sketches
    assert _tables(db, acct_model, lo, hi, sketches=True) == {"rollup_account_model_latency_hour"}
    assert _tables(db, (), lo, hi, ("instance", "account_key"), sketches=True) == {"rollup_account_latency_hour"}
    # sums: the narrowest family (instance x status) with 5-minute edges; by status class: traffic
    assert _tables(db, (), lo, hi) == {"rollup_latency_total_5m", "rollup_latency_total_hour"}
    assert _tables(db, (), lo, hi, ("status_class",), step=five) == {"rollup_traffic_5m"}
    assert _tables(db, acct_model, lo, hi) == {"rollup_account_model_latency_hour"}
    assert _tables(db, acct_model, lo, hi, ("status_class",)) == {"rollup_account_hour"}
    # Account Overview: per-account sums from the narrowest account family, top failure type
    # from accounts by failure type
    assert _tables(db, (), lo, hi, ("instance", "account_key", "failure_type")) == {"rollup_account_failure_hour"}
    assert _tables(db, (), RANGES["2.5d"][0], RANGES["2.5d"][1], ("instance", "account_key")) == {
        "rollup_account_latency_hour", "rollup_account_latency_day"}
    # filtered by model (or account + model): accounts x models by failure type and status code
    # (schema step 9); before it, raw events
    assert _tables(db, model, lo, hi, ("instance", "account_key", "failure_type")) == {
        "rollup_account_model_failure_hour"}
    assert _tables(db, acct_model, lo, hi, ("failure_type",)) == {"rollup_account_model_failure_hour"}
    assert _tables(db, acct_model, lo, hi, ("status_code",)) == {"rollup_account_model_failure_hour"}
    assert _tables(db, acct_model, RANGES["2.5d"][0], RANGES["2.5d"][1], ("status_code",)) == {
        "rollup_account_model_failure_hour", "rollup_account_model_failure_day"}
    # ... but not when a grouping no account rollup keeps is asked (request type): raw
    assert _tables(db, acct_model, lo, hi, ("request_type",)) == set()
    # by API key, unfiltered: the set tables (one row per key and bucket; 5-minute, hour and
    # day grains), so a 3 h step reads hours (rollup_api_key_day is day-only: all raw)
    assert _tables(db, (), lo, hi, ("api_key_hash",), step=3 * HOUR) == {
        "rollup_api_key_sets_5m", "rollup_api_key_sets_hour"}
    assert _tables(db, (), lo, hi, ("api_key_hash",)) == {"rollup_api_key_sets_5m", "rollup_api_key_sets_hour"}
    assert "rollup_api_key_sets_day" in _tables(db, (), *RANGES["2.5d"], ("api_key_hash",))
    assert _tables(db, model, lo, hi, ("api_key_hash",), step=3 * HOUR) == set()  # model: api_key family, days


def test_pruned_days_answer_from_rollups(tmp_path, traffic):
    """After retention drops raw rows, whole pruned days still answer from the rollups as before."""
    conn = open_database(str(tmp_path / "monitor.db"))
    ingestor = Ingestor(conn, "default")
    events = list(traffic.events(2000, START, END))
    for i in range(0, len(events), 400):
        ingestor.usage(events[i:i + 400])
    lo, hi = MIDNIGHT, MIDNIGHT + DAY  # 2026-05-04, a whole day
    wide = (MIDNIGHT, END + HOUR)
    before = {}
    for target, payload, interval in VARIANTS:
        for rng in ((lo, hi), wide):
            spec = _spec(target, payload, (), rng, interval)
            before[(target, str(payload), interval, rng)] = query.execute(conn, spec, rollups=False)
    assert store.prune(conn, MIDNIGHT + DAY) > 0  # everything up to the end of that day
    assert _pick(conn, f"SELECT count(*) FROM events WHERE ts_ms < {MIDNIGHT + DAY}") == 0
    for target, payload, interval in VARIANTS:
        for rng in ((lo, hi), wide):
            if target == "annotations" and rng == (lo, hi):
                continue  # the spike baseline reads 6 buckets before the window: raw hours, pruned
            if target in ("timeseries", "annotations") and interval % (5 * 60_000):
                continue  # buckets under 5 minutes are read from raw events only
            spec = _spec(target, payload, (), rng, interval)
            got = query.execute(conn, spec)
            want = before[(target, str(payload), interval, rng)]
            for fw, fg in zip(want, got):
                for a, b in zip(fw.fields, fg.fields):
                    approx = _approx_field(target, payload, a.name)
                    if a.name.endswith("change_pct"):
                        continue  # the previous window is pruned raw hours
                    if a.name.startswith("prev_"):
                        continue
                    if target == "accounts" and a.name not in ACCOUNT_MEASURES:
                        continue  # labels, quota, last failure come from the (pruned) newest raw rows
                    assert all(_same(x, y, approx) for x, y in zip(a.values, b.values)), (target, payload, a.name)
    # and the raw path, which cannot see pruned rows, answers less
    [raw] = query.execute(conn, _spec("summary", {}, (), (lo, hi), HOUR), rollups=False)
    assert {f.name: f.values[0] for f in raw.fields}["requests"] == 0


@pytest.mark.parametrize("fname", ["none", "account-label", "model", "status-failed", "provider"])
def test_requests_keyset_pages_cover_every_row_once_newest_first(db, filters, fname):
    lo, hi = RANGES["30h-midnight"]
    clauses = clauses_from_payload(filters[fname])
    where, params = query_plan.Plan([query_plan.Piece("", lo, hi)], None).where(
        query_plan.Piece("", lo, hi), clauses)
    want = [r[0] for r in db.execute(f"SELECT id FROM events WHERE {where} ORDER BY ts_ms DESC, id DESC", params)]
    assert len(want) > 60
    got, payload = [], {"limit": 37}
    while True:
        [frame] = query.execute(db, _spec("requests", payload, clauses, (lo, hi), HOUR))
        cols = {f.name: f.values for f in frame.fields}
        got += cols["id"]
        if not frame.meta["has_more"]:
            break
        payload = {"limit": 37, "before_ms": frame.meta["next_before_ms"], "before_id": frame.meta["next_before_id"]}
    assert got == want


def test_requests_before_ms_alone_starts_strictly_before_that_time(db):
    lo, hi = RANGES["whole-day"]
    ts = _pick(db, f"SELECT ts_ms FROM events WHERE ts_ms >= {lo} AND ts_ms < {hi} ORDER BY ts_ms DESC LIMIT 1 OFFSET 10")
    [frame] = query.execute(db, _spec("requests", {"limit": 5, "before_ms": ts}, (), (lo, hi), HOUR))
    times = {f.name: f.values for f in frame.fields}["time"]
    assert times and max(times) < ts and times == sorted(times, reverse=True)


def test_identical_concurrent_requests_share_one_computation(db, monkeypatch):
    import threading
    import time as _time

    calls = []
    original = query.TARGETS["summary"]

    def slow_summary(ctx):
        calls.append(ctx.spec.from_ms)
        _time.sleep(0.3)
        return original(ctx)

    monkeypatch.setitem(query.TARGETS, "summary", slow_summary)
    spec = _spec("summary", {}, (), RANGES["whole-day"], HOUR)
    results = []
    threads = [threading.Thread(target=lambda: results.append(query.execute(db, spec))) for _ in range(4)]
    for t in threads:
        t.start()
        _time.sleep(0.02)
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    assert all(r[0].fields[0].values == results[0][0].fields[0].values for r in results)
    # once answered nothing is kept: the next identical request computes again
    query.execute(db, spec)
    assert len(calls) == 2
    # a different window is a different computation
    query.execute(db, _spec("summary", {}, (), RANGES["2.5d"], HOUR))
    assert len(calls) == 3


@pytest.mark.parametrize("pct", [1, 50, 95, 99, 100])
def test_sql_percentile_series_equals_nearest_rank_by_hand(db, pct):
    lo, hi = RANGES["30h-midnight"]
    step = 4 * 60_000  # not a multiple of 5 minutes: the whole window reads raw events
    reader = query_plan.Reader(db, ())
    got = reader.exact_series("latency_ms", lo, hi, step, pct)
    by_bucket: dict[int, list[int]] = {}
    for ts, v in db.execute("SELECT ts_ms, latency_ms FROM events WHERE ts_ms >= ? AND ts_ms < ? AND latency_ms > 0",
                            (lo, hi)):
        by_bucket.setdefault(ts - ts % step, []).append(v)
    want = {b: sorted(v)[max(1, math.ceil(len(v) * pct / 100)) - 1] for b, v in by_bucket.items()}
    assert got == want and len(want) > 50


def test_memo_never_serves_stale_data_after_a_write(tmp_path, traffic):
    """p50/p95/p99 share one ranking for a moment; a commit in between is seen at once."""
    conn = open_database(str(tmp_path / "monitor.db"))
    ingestor = Ingestor(conn, "default")
    events = list(traffic.events(600, START, START + 6 * HOUR))
    ingestor.usage(events[:300])
    spec = _spec("timeseries", {"measure": "latency_p95"}, (), (START, START + 6 * HOUR), 4 * 60_000)
    before = query.execute(conn, spec)[0].fields[1].values
    assert query.execute(conn, spec)[0].fields[1].values == before
    ingestor.usage(events[300:])
    after = query.execute(conn, spec)[0].fields[1].values
    assert after == query.execute(conn, spec, rollups=False)[0].fields[1].values
    assert after != before


def _plans_of_reads(conn, fn) -> dict[str, str]:
    """The query plan of every statement `fn` runs on a rollup table: table -> plan text."""
    seen = statements(conn, fn)
    out = {}
    for sql, bindings in seen:
        table = next((t for t in ACCOUNT_INDEXED if f"FROM {t} " in sql), None)
        if table:
            plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}", bindings).fetchall()
            out[table] = " / ".join(row[3] for row in plan)
    return out


def test_account_filtered_rollup_reads_seek_the_account_index(db, filters):
    """Schema step 9's (account_key, bucket_ms) indexes: a read filtered by account seeks the
    account's rows; an unfiltered grouped read keeps the bucket range of the primary key."""
    lo, hi = RANGES["2.5d"]
    acct_model = clauses_from_payload(filters["account+model"])
    reader = query_plan.Reader(db, acct_model)
    plans = _plans_of_reads(db, lambda: (reader.sums(lo, hi), reader.sums(lo, hi, ("failure_type",)),
                                         reader.sums(lo, hi, ("status_class",)),
                                         reader.distinct("api_key_hash", lo, hi, "")))
    assert set(plans) == {"rollup_account_model_latency_hour", "rollup_account_model_failure_hour",
                          "rollup_account_hour", "rollup_api_key_day"}
    for table, plan in plans.items():
        assert re.search(rf"USING (COVERING )?INDEX {table}_account \(account_key=\? AND bucket_ms>\? AND "
                         r"bucket_ms<\?\)", plan), plan
    unfiltered = query_plan.Reader(db, ())
    plans = _plans_of_reads(db, lambda: unfiltered.sums(lo, hi, ("instance", "account_key")))
    assert plans and all("USING PRIMARY KEY (bucket_ms>? AND bucket_ms<?)" in p for p in plans.values()), plans
    # the filtered answers are the raw path's
    raw = query_plan.Reader(db, acct_model, rollups=False)
    assert reader.sums(lo, hi, ("failure_type",)) == raw.sums(lo, hi, ("failure_type",))
    assert reader.distinct("api_key_hash", lo, hi, "") == raw.distinct("api_key_hash", lo, hi, "")


def _status_sums(conn, clauses, rng, group, step, rollups):
    reader = query_plan.Reader(conn, clauses, rollups)
    return reader.sums(rng[0], rng[1], group, step=step)


def test_status_series_superset_equals_separate_reads(db, filters, monkeypatch):
    """Raw time buckets grouped by status dims only come from one read grouped by all four dims
    and folded in Python: the same integers (and maxes) as reading each grouping on its own."""
    import itertools

    groups = [g for n in range(3) for g in itertools.combinations(query_plan.STATUS_DIMS, n)]
    groups.append(query_plan.STATUS_DIMS)
    checked = 0
    for fname in ("none", "model", "status-failed", "provider", "account-label"):
        filt = filters[fname]
        clauses = clauses_from_adhoc(filt) if isinstance(filt, list) else clauses_from_payload(filt)
        for rng_name, step, rollups in (("5h-unaligned", 420_000, True), ("30h-midnight", 300_000, False),
                                        ("30h-midnight", 300_000, True), ("2.5d", 3 * HOUR, False)):
            for group in groups:
                monkeypatch.setattr(query_plan, "SHARE_STATUS_SERIES", False)
                alone = _status_sums(db, clauses, RANGES[rng_name], group, step, rollups)
                monkeypatch.setattr(query_plan, "SHARE_STATUS_SERIES", True)
                folded = _status_sums(db, clauses, RANGES[rng_name], group, step, rollups)
                assert folded == alone, (fname, rng_name, group)
                checked += bool(alone)
    assert checked > 100


class _CountingEvent:
    """threading.Event whose waiters are counted (to know the followers are waiting)."""

    def __init__(self) -> None:
        import threading

        self.inner, self.waiting, self.lock = threading.Event(), 0, threading.Lock()

    def wait(self, timeout=None):
        with self.lock:
            self.waiting += 1
        return self.inner.wait(timeout)

    def set(self) -> None:
        self.inner.set()


def test_status_series_read_once_for_readers_asking_at_the_same_time(db, filters, monkeypatch):
    """Three threads, each with its own read connection, ask for status-grouped raw buckets while
    the first read is running: one superset statement runs, and every answer is the unshared one."""
    import threading

    from datasource.db import connect

    clauses = clauses_from_payload(filters["model"])
    rng, step = RANGES["30h-midnight"], 300_000
    groups = [("status_class",), ("failure_type",), ()]
    monkeypatch.setattr(query_plan, "SHARE_STATUS_SERIES", False)
    expected = [_status_sums(db, clauses, rng, g, step, False) for g in groups]
    monkeypatch.setattr(query_plan, "SHARE_STATUS_SERIES", True)
    events: list[_CountingEvent] = []

    class Shared(Flight):
        def __init__(self) -> None:
            super().__init__()
            self.event = _CountingEvent()
            events.append(self.event)

    monkeypatch.setattr(query_plan.STATUS_FLIGHTS, "flight", Shared)
    reads, inside, release = [], threading.Event(), threading.Event()
    original = query_plan.Reader._status_superset

    def held(self, where, params, step):
        reads.append(threading.get_ident())
        out = original(self, where, params, step)
        inside.set()
        release.wait(10)
        return out

    monkeypatch.setattr(query_plan.Reader, "_status_superset", held)
    path = db.filename
    results: dict[int, Any] = {}

    def ask(i: int) -> None:
        conn = connect(path, readonly=True)
        try:
            results[i] = _status_sums(conn, clauses, rng, groups[i], step, False)
        finally:
            conn.close()

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    assert inside.wait(10)
    others = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while events[0].waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert len(reads) == 1 and events[0].waiting == 2
    assert [results[i] for i in range(3)] == expected
    assert query_plan.STATUS_FLIGHTS.running == {}  # nothing kept once answered
    # asked again afterwards: read again (no result outlives its read)
    reads.clear()
    release.set()
    assert _status_sums(db, clauses, rng, groups[0], step, False) == expected[0] and len(reads) == 1


def test_standard_percentiles_of_a_sketch_computed_together_equal_one_at_a_time(db):
    """p50/p95/p99 of a bucket are computed once for the three targets of a latency panel: each
    equals that quantile of the merged sketch asked alone, in any order, with others too."""
    reader = query_plan.Reader(db, (), True)
    lo, hi = RANGES["30h-midnight"]
    dist = reader._distribution("latency_ms", lo, hi, (), step=300_000)
    assert dist.approximate and len(dist.sketches) > 50
    for key in sorted(dist.sketches)[:60]:
        sk = dist.sketches[key]
        alone = {p: sketch.Sketch(sk.bins).quantiles([p / 100])[0] for p in (50, 90, 95, 99)}
        assert dist.percentiles(key, [99]) == [alone[99]]
        assert dist.percentiles(key, [50, 95]) == [alone[50], alone[95]]
        assert dist.percentiles(key, [90, 99]) == [alone[90], alone[99]]
        assert dist.percentiles(key, (50, 95, 99)) == [alone[50], alone[95], alone[99]]
    assert dist.percentiles(("no such bucket",), [50]) == [None]
