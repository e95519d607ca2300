"""The read side over a hand-designed fixture ingested through normalize -> store (real SQLite).

Fixture (tests/fixtures/query_events.jsonl), window W = [10:00, 11:00) UTC on 2026-05-06:
  r01 10:05 A k1 alpha-1 ok    lat 1000 ttft 200  in 1000 out 200 total 1200 cached/read 400
  r02 10:10 A k1 alpha-1 ok    lat 2000 ttft 400  in 2000 out 500 total 2500
  r03 10:15 A k2 alpha-1 429   lat 300  quota (plan plus, 100 %, resets +3600 s)
  r04 10:20 B k1 beta-2(high) ok lat 4000 ttft 1000 in 100 out 50 total 150
  r05 10:25 B k2 beta-2(high) 401 token_invalidated lat 500
  r06 10:30 B k2 beta-2  401 token_invalidated lat 500
  r07 10:35 C k2 gamma-3 500 (instance east, claude) lat 3000
  r08 10:40 C k1 gamma-3 ok (east, claude) lat 6000 ttft 1500 in 300 out 100 creation 50 total 450
  r09 10:45 no account, no key, alpha-1, failed=false with 302 (unusual) lat 700 in 10 out 10
  r10 10:50 A k1 alpha-1 503 lat 800 trace req_trace_10
  previous window: p01 09:30 A k1 ok lat 1000 in 1000 out 1000; p02 09:40 B k2 429 rate limit
  outside: o01 11:00 (the window is half-open)
Prices (per 1M): alpha-1 in 1 / out 2 / cache read 0.5; beta-2 in 10 / out 20; gamma-3 unpriced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from datasource import query
from datasource.accounts import account_rows, parse_credential_error
from datasource.model import Clause, Frame, TargetSpec
from datasource.normalize import normalize
from datasource.pricing import Pricer
from datasource.store import insert_batch
from datasource.store_status import StatusRow, add_episode, insert_credential_error, upsert_accounts, write_status

FIXTURE = Path(__file__).parent / "fixtures" / "query_events.jsonl"
T10 = 1778061600000  # 2026-05-06T10:00:00Z
MIN = 60_000
HOUR = 3_600_000
A, B, C = "aaaa000000000001", "bbbb000000000002", "cccc000000000003"
PRICER = Pricer.from_data({"models": {"alpha-1": {"input": 1, "output": 2, "cache_read": 0.5},
                                      "beta-2": {"input": 10, "output": 20}}})
AUTH_FILES = {
    "default": [{"auth_index": A, "name": "alice.json", "email": "alice@example.com", "provider": "codex",
                 "status": "active"},
                {"auth_index": B, "name": "bob.json", "email": "bob@example.com", "provider": "codex",
                 "status": "active"}],
    "east": [{"auth_index": C, "name": "carol.json", "email": "carol@example.com", "provider": "claude",
              "status": "active"}],
}


def load_fixture(conn) -> None:
    """Accounts, then every fixture payload through normalize -> insert_batch, then the side tables."""
    for instance, files in AUTH_FILES.items():
        upsert_accounts(conn, instance, account_rows(files), T10 - HOUR)
    for line in FIXTURE.read_text().splitlines():
        item = json.loads(line)
        raw = json.dumps(item["payload"])
        result = insert_batch(conn, [normalize(raw, instance=item["instance"], pricer=PRICER, now_ms=T10)],
                              origin="test", instance=item["instance"])
        assert result.inserted == 1
    # B's auth file turns to error at 10:32: one account status change.
    files = [dict(f, status="error") if f["auth_index"] == B else f for f in AUTH_FILES["default"]]
    upsert_accounts(conn, "default", account_rows(files), T10 + 32 * MIN)
    for payload in (
        {"timestamp": "2026-05-06T10:33:00Z", "provider": "codex", "model": "alpha-1", "auth_index": A,
         "status_code": 429, "code": "usage_limit", "body": "quota exceeded for alice@example.com",
         "auth_status": {"quota": {"exceeded": True, "next_recover_at": "2026-05-06T12:00:00Z"}}},
        {"timestamp": "2026-05-06T10:55:00Z", "provider": "codex", "model": "alpha-1", "auth_index": A,
         "status_code": 401, "code": "unauthorized", "body": "token expired"},
    ):
        row, body = parse_credential_error(json.dumps(payload).encode(), "default", T10)
        insert_credential_error(conn, row, body)
    write_status(conn, StatusRow(instance="default", url="http://user:secret@127.0.0.1:8317/?k=v",
                                 mode="auto", transport="subscribe", state="running",
                                 last_consumed_ms=T10 + 59 * MIN, last_inserted_ms=T10 + 50 * MIN,
                                 inserted=13, duplicates=2, dead_letters=1, usage_publishing=True,
                                 queue_retention_s=60, warnings=["w1"], updated_ms=T10 + 59 * MIN))
    add_episode(conn, "default", "gap", T10 + 12 * MIN, T10 + 14 * MIN, "no events consumed")
    add_episode(conn, "east", "gap", T10 - 2 * HOUR, T10 - HOUR, "before the window")


def spec(target: str, payload: dict[str, Any] | None = None, clauses: tuple[Clause, ...] = (), *,
         from_ms: int = T10, to_ms: int = T10 + HOUR, interval_ms: int = 15 * MIN,
         max_data_points: int = 1000) -> TargetSpec:
    return TargetSpec(target=target, payload=payload or {}, from_ms=from_ms, to_ms=to_ms,
                      interval_ms=interval_ms, max_data_points=max_data_points, clauses=clauses,
                      now_ms=T10 + HOUR)


def columns(frame: Frame) -> dict[str, list[Any]]:
    return {f.name: f.values for f in frame.fields}


def rows(frame: Frame) -> list[dict[str, Any]]:
    cols = columns(frame)
    n = len(frame.fields[0].values) if frame.fields else 0
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def run(conn, target: str, payload: dict[str, Any] | None = None, clauses: tuple[Clause, ...] = (),
        **kw: Any) -> list[dict[str, Any]]:
    rollups = kw.pop("rollups", True)
    frames = query.execute(conn, spec(target, payload, clauses, **kw),
                           aliases=kw.pop("aliases", {}) if "aliases" in kw else {}, rollups=rollups)
    return rows(frames[0])


@pytest.fixture
def db(conn):
    load_fixture(conn)
    return conn


K1_HASH = "faa210d78e64b975e87ea4585883b7f8c8d5b0c95719a5d70ba0c3a348bc5e24"  # sha256(sk-client-demo-0001)


@pytest.mark.parametrize("rollups", [False, True], ids=["raw", "rollups"])
def test_summary_current_previous_and_change(db, rollups):
    # The window is one whole hour: with rollups its percentiles come from the hour's
    # sketches (within 1 % of the exact nearest rank), the raw path gives them exactly.
    [row] = run(db, "summary", rollups=rollups)
    expected = {
        "requests": 10, "successes": 5, "failures": 5, "success_rate": 0.5, "unusual": 1,
        "avg_latency_ms": 1880.0, "p50_latency_ms": 800, "p95_latency_ms": 6000, "p99_latency_ms": 6000,
        "p50_ttft_ms": 400, "p95_ttft_ms": 1500, "input_tokens": 3460, "output_tokens": 860,
        "reasoning_tokens": 0, "cached_tokens": 400, "cache_read_tokens": 400, "cache_creation_tokens": 50,
        "total_tokens": 4320, "accounts": 3, "api_keys": 2,
        "prev_requests": 2, "prev_successes": 1, "prev_failures": 1, "prev_success_rate": 0.5,
        "prev_avg_latency_ms": 550.0, "prev_p50_latency_ms": 100, "prev_p95_latency_ms": 1000,
        "prev_p50_ttft_ms": None, "prev_input_tokens": 1000, "prev_total_tokens": 2000,
        "prev_cache_hit_rate": 0.0, "prev_accounts": 2, "prev_api_keys": 2,
        "requests_change_pct": 400.0, "success_rate_change_pct": 0.0, "p50_ttft_ms_change_pct": None,
        "cache_hit_rate_change_pct": None, "unusual_change_pct": None,
    }
    for name, value in expected.items():
        if rollups and value and name.startswith(("p5", "p9", "prev_p5", "prev_p9")):
            assert row[name] == pytest.approx(value, rel=0.01), name
        else:
            assert row[name] == value, name
    assert row["cache_hit_rate"] == pytest.approx(400 / 3460)
    assert row["total_tokens_change_pct"] == pytest.approx(116.0)  # (4320 - 2000) / 2000
    assert row["est_cost_usd"] == pytest.approx(0.0012 + 0.003 + 0.002 + 0.00003)
    assert row["prev_est_cost_usd"] == pytest.approx(0.003)
    assert row["est_cost_usd_change_pct"] == pytest.approx((0.00623 - 0.003) / 0.003 * 100)
    assert len(row) == 22 * 3


def test_summary_empty_window_has_nulls_not_zero_division(db):
    [row] = run(db, "summary", from_ms=T10 + 5 * HOUR, to_ms=T10 + 6 * HOUR)
    assert (row["requests"], row["success_rate"], row["p95_latency_ms"], row["cache_hit_rate"]) == (0, None, None, None)
    assert row["requests_change_pct"] is None


def series(db, payload, **kw):
    [frame] = query.execute(db, spec("timeseries", payload, **kw))
    return frame, columns(frame)


def test_timeseries_aligned_buckets_and_percentiles(db):
    frame, cols = series(db, {"measure": "requests"})
    assert cols["time"] == [T10, T10 + 15 * MIN, T10 + 30 * MIN, T10 + 45 * MIN]
    assert cols["requests"] == [2, 3, 3, 2]
    assert frame.meta["interval_ms"] == 15 * MIN
    assert series(db, {"measure": "failures"})[1]["failures"] == [0, 2, 2, 1]
    # 15-minute buckets are whole 5-minute rollup buckets: merged sketches, within 1 %; raw events: exact
    assert series(db, {"measure": "latency_p95"})[1]["latency_p95"] == pytest.approx([2000, 4000, 6000, 800], rel=0.01)
    [raw] = query.execute(db, spec("timeseries", {"measure": "latency_p95"}), rollups=False)
    assert columns(raw)["latency_p95"] == [2000, 4000, 6000, 800]
    assert series(db, {"measure": "cost"})[1]["cost"] == pytest.approx([0.0042, 0.002, 0, 0.00003])


def test_timeseries_empty_buckets_zero_for_counts_null_for_rates(db):
    window = {"from_ms": T10 - HOUR, "to_ms": T10}
    assert series(db, {"measure": "requests"}, **window)[1]["requests"] == [0, 0, 2, 0]
    p50 = series(db, {"measure": "latency_p50"}, **window)[1]["latency_p50"]  # 5-minute sketches: 1 %
    assert p50[:2] == [None, None] and p50[3] is None and p50[2] == pytest.approx(100, rel=0.01)
    assert series(db, {"measure": "success_rate"}, **window)[1]["success_rate"] == [None, None, 0.5, None]
    assert series(db, {"measure": "ttft_p95"}, **window)[1]["ttft_p95"] == [None, None, None, None]


def test_timeseries_alignment_and_max_data_points(db):
    _, cols = series(db, {}, from_ms=T10 + 7 * MIN)
    assert cols["time"][0] == T10 and cols["requests"] == [1, 3, 3, 2]
    frame, cols = series(db, {}, interval_ms=MIN, max_data_points=4)
    assert frame.meta["interval_ms"] == 15 * MIN and len(cols["time"]) == 4


def test_timeseries_split_top_n_with_other(db):
    frame, cols = series(db, {"measure": "requests", "split_by": "account", "top": 1})
    assert list(cols) == ["time", "alice@example.com", "other"]
    assert cols["alice@example.com"] == [2, 1, 0, 1]
    assert cols["other"] == [0, 2, 3, 1]
    assert frame.fields[1].labels == {"account": "alice@example.com"}
    _, cols = series(db, {"measure": "requests", "split_by": "status_class"})
    assert list(cols) == ["time", "failed", "success", "unusual"]
    assert (cols["failed"], cols["success"], cols["unusual"]) == ([0, 2, 2, 1], [2, 1, 1, 0], [0, 0, 0, 1])
    _, cols = series(db, {"measure": "latency_p95", "split_by": "instance", "top": 1})
    assert cols["default"] == pytest.approx([2000, 4000, 500, 800], rel=0.01)  # sketches: within 1 %
    assert cols["other"][:2] == [None, None] and cols["other"][3] is None
    assert cols["other"][2] == pytest.approx(6000, rel=0.01)


def test_timeseries_split_read_raw_once_same_answer(db):
    """A split series only raw events answer (rollups off here; at 24 h on 10 M: account + model
    filters) ranks and folds from one read of the events, with the hand-counted values above."""
    statements = []
    db.exec_trace = lambda cursor, sql, bindings: statements.append(sql) or True
    try:
        [frame] = query.execute(db, spec("timeseries", {"measure": "requests", "split_by": "account", "top": 1}),
                                rollups=False)
    finally:
        db.exec_trace = None
    cols = columns(frame)
    assert list(cols) == ["time", "alice@example.com", "other"]
    assert (cols["alice@example.com"], cols["other"]) == ([2, 1, 0, 1], [0, 2, 3, 1])
    assert frame.fields[1].labels == {"account": "alice@example.com"}
    assert sum(1 for sql in statements if " FROM events " in sql and "GROUP BY" in sql) == 1
    [frame] = query.execute(db, spec("timeseries", {"measure": "requests", "split_by": "status_class"}), rollups=False)
    cols = columns(frame)
    assert list(cols) == ["time", "failed", "success", "unusual"]
    assert (cols["failed"], cols["success"], cols["unusual"]) == ([0, 2, 2, 1], [2, 1, 1, 0], [0, 0, 0, 1])
    # a ratio ranks by requests; top 2 of failed (5) / success (4) / unusual (1): unusual is `other`
    [frame] = query.execute(db, spec("timeseries", {"measure": "failure_rate", "split_by": "status_class",
                                                    "top": 2}), rollups=False)
    cols = columns(frame)
    assert list(cols) == ["time", "failed", "success", "other"]
    assert cols["failed"] == [None, 1.0, 1.0, 1.0] and cols["success"] == [0.0, 0.0, 0.0, None]
    assert cols["other"] == [None, None, None, 0.0]
    # every answer equals the rollup path's (rank from rollups, fold in SQL)
    for payload in ({"measure": "requests", "split_by": "account", "top": 1},
                    {"measure": "failure_rate", "split_by": "status_class", "top": 2},
                    {"measure": "cost", "split_by": "model", "top": 1},
                    {"measure": "tokens", "split_by": "status_code", "top": 2}):
        [raw] = query.execute(db, spec("timeseries", payload), rollups=False)
        [rolled] = query.execute(db, spec("timeseries", payload))
        assert [(f.name, f.values, f.labels) for f in raw.fields] == [(f.name, f.values, f.labels) for f in rolled.fields]


def test_timeseries_bad_payload(db):
    from datasource.model import BadRequest
    for payload in ({"measure": "nope"}, {"split_by": "email"}, {"top": "x"}, {"top": 0}):
        with pytest.raises(BadRequest):
            query.execute(db, spec("timeseries", payload))


def test_accounts_worst_first_with_cpa_status_and_quota(db):
    out = run(db, "accounts")
    assert [r["account_key"] for r in out] == [B, A, C, "-"]
    b, a, c, none = out
    assert (b["status"], b["requests"], b["failures"], b["top_failure_type"], b["last_failure_status"]) == (
        "error", 3, 2, "auth", 401)
    assert b["success_rate"] == pytest.approx(1 / 3) and b["p95_latency_ms"] == pytest.approx(4000, rel=0.01)
    assert a == {**a, "account": "alice@example.com", "instance": "default", "provider": "codex",
                 "auth_file": "alice.json", "status": "active", "requests": 4, "failures": 2,
                 "success_rate": 0.5, "top_failure_type": "quota", "last_failure_status": 503,
                 "total_tokens": 3700, "avg_latency_ms": 1025.0, "p95_latency_ms": a["p95_latency_ms"],
                 "last_seen": T10 + 50 * MIN, "quota_plan": "plus", "quota_used_pct": 100.0,
                 "quota_recover_at": T10 + 75 * MIN}
    assert a["p95_latency_ms"] == pytest.approx(2000, rel=0.01)  # hourly account sketches: within 1 %
    assert a["est_cost_usd"] == pytest.approx(0.0042) and "service unavailable" in a["last_failure_summary"]
    assert (c["instance"], c["provider"], c["auth_file"]) == ("east", "claude", "carol.json")
    assert (none["account"], none["status"], none["failures"]) == ("-", "unknown", 0)
    assert [r["account_key"] for r in run(db, "accounts", {"sort": "requests", "limit": 2})] == [A, B]


def test_api_keys_display_alias_and_counts(db):
    out = run(db, "api_keys")
    assert [r["api_key"] for r in out] == ["sk******01", "sk******02", "unknown key"]
    k1 = out[0]
    assert (k1["api_key_hash"], k1["requests"], k1["failures"], k1["total_tokens"], k1["models"],
            k1["models_used"], k1["accounts_hit"], k1["last_seen"]) == (
        K1_HASH, 5, 1, 4300, 3, "alpha-1, beta-2, gamma-3", 3, T10 + 50 * MIN)
    assert k1["est_cost_usd"] == pytest.approx(0.0062) and out[1]["success_rate"] == 0.0
    frames = query.execute(db, spec("api_keys"), aliases={K1_HASH: "ci-bot"})
    assert rows(frames[0])[0]["api_key"] == "ci-bot"


def test_requests_newest_first_with_keyset_pagination(db):
    out = run(db, "requests")
    assert [r["request_id"] for r in out] == [f"r{i:02d}" for i in range(10, 0, -1)]
    r01, r04, r10 = out[-1], out[-4], out[0]
    assert (r01["output_tps"], r01["cache_state"], r01["cached_tokens"], r01["fail_summary"]) == (200.0, "hit", 400, None)
    assert r04["model_route"] == "beta-2(high) -> beta-2" and r01["model_route"] == "alpha-1"
    assert (r10["trace_id"], r10["status_code"], r10["api_key"]) == ("req_trace_10", 503, "sk******01")
    assert "service unavailable" in r10["fail_summary"]
    seen, cursor = [], {}
    while True:
        [frame] = query.execute(db, spec("requests", {"limit": 3, **cursor}))
        seen.append([r["request_id"] for r in rows(frame)])
        if not frame.meta["has_more"]:
            break
        cursor = {"before_ms": frame.meta["next_before_ms"], "before_id": frame.meta["next_before_id"]}
    assert seen == [["r10", "r09", "r08"], ["r07", "r06", "r05"], ["r04", "r03", "r02"], ["r01"]]
    assert len(run(db, "requests", {"limit": 99999})) == 10  # capped at 5000, not refused


def test_requests_read_newest_slice_first_and_stop_at_the_scan_budget(db, monkeypatch):
    from datasource import query_requests

    window = {"from_ms": T10 - 3 * HOUR, "to_ms": T10 + 2 * HOUR}  # 07:00-12:00: p01 p02 r01-r10 o01
    newest_first = ["o01"] + [f"r{i:02d}" for i in range(10, 0, -1)] + ["p02", "p01"]
    # slices of 1, 2 and 4 hours: one page, everything, no notice
    [frame] = query.execute(db, spec("requests", **window))
    assert [r["request_id"] for r in rows(frame)] == newest_first
    assert frame.meta == {"has_more": False, "next_before_ms": None, "next_before_id": None}
    # a full page ends on its last row as before, without a notice
    [frame] = query.execute(db, spec("requests", {"limit": 3}, **window))
    assert [r["request_id"] for r in rows(frame)] == newest_first[:3]
    assert frame.meta == {"has_more": True, "next_before_ms": T10 + 45 * MIN, "next_before_id": 9}  # r09
    # a budget already spent: each page reads one hour-long slice, ends where it stopped, says so
    monkeypatch.setattr(query_requests, "SCAN_BUDGET_S", 0.0)
    pages, cursor = [], {}
    while True:
        [frame] = query.execute(db, spec("requests", {"search": "r", **cursor}, **window))
        pages.append(([r["request_id"] for r in rows(frame)], frame.meta))
        if not frame.meta["has_more"]:
            break
        cursor = {"before_ms": frame.meta["next_before_ms"]}
    assert [ids for ids, _ in pages[:3]] == [["o01"], newest_first[1:11], ["p02", "p01"]]
    assert [ids for ids, _ in pages] == [["o01"], newest_first[1:11], ["p02", "p01"], [], []]
    first = pages[0][1]
    assert (first["has_more"], first["next_before_ms"], first["next_before_id"]) == (True, T10 + HOUR, None)
    assert first["notices"] == [{"severity": "warning", "text": (
        "1 rows from 2026-05-06 11:00 UTC on: these filters scan every event and the scan stopped after "
        "0 s; narrow the time range or the filters to see older rows")}]
    assert all("notices" in meta for _, meta in pages[:-1]) and "notices" not in pages[-1][1]


def test_requests_bad_limit_and_cursor(db):
    from datasource.model import BadRequest
    for payload in ({"limit": 0}, {"limit": "many"}, {"before_id": 5}, {"before_ms": "x"}):
        with pytest.raises(BadRequest):
            query.execute(db, spec("requests", payload))


def test_breakdown_by_status_code(db):
    out = run(db, "breakdown", {"by": "status_code"})
    assert [(r["key"], r["requests"], r["failures"]) for r in out] == [
        ("200", 4, 0), ("401", 2, 2), ("302", 1, 0), ("429", 1, 1), ("500", 1, 1), ("503", 1, 1)]
    assert out[0]["share"] == 0.4 and out[1]["failure_rate"] == 1.0
    assert out[0]["est_cost_usd"] == pytest.approx(0.0062)
    accounts = run(db, "breakdown", {"by": "account"})
    assert [(r["label"], r["requests"]) for r in accounts][:2] == [("alice@example.com", 4), ("bob@example.com", 3)]


def test_usage_by_model_cost_first(db):
    out = run(db, "usage", {"by": "model"})
    assert [(r["key"], r["requests"], r["input_tokens"], r["output_tokens"], r["total_tokens"]) for r in out] == [
        ("alpha-1", 5, 3010, 710, 3720), ("beta-2", 3, 100, 50, 150), ("gamma-3", 2, 350, 100, 450)]
    assert out[0]["cache_hit_rate"] == pytest.approx(400 / 3010)
    assert out[0]["cost_share"] == pytest.approx(0.00423 / 0.00623)
    assert out[2]["est_cost_usd"] == 0 and out[2]["cost_share"] == 0


def test_account_actions_events_and_credential_errors(db):
    out = run(db, "account_actions")
    assert [(r["account_key"], r["action"], r["reason_code"], r["hits"]) for r in out] == [
        (A, "reauth", "credential_unauthorized", 1), (A, "wait_quota_reset", "quota_exhausted", 2),
        (B, "reauth", "token_revoked", 2)]
    cred, quota, reauth = out
    assert (cred["last_status"], cred["account"], cred["auth_file"], cred["last_evidence"]) == (
        401, "alice@example.com", "alice.json", "token expired")
    assert (quota["first_seen"], quota["last_seen"], quota["last_status"]) == (T10 + 15 * MIN, T10 + 33 * MIN, 429)
    assert quota["quota_recover_at"] == T10 + 2 * HOUR  # the later of the event (11:15) and CPA (12:00)
    assert "a***@example.com" in quota["last_evidence"] and "alice@" not in quota["last_evidence"]
    assert (reauth["first_seen"], reauth["last_seen"], reauth["last_status"]) == (T10 + 25 * MIN, T10 + 30 * MIN, 401)


def test_account_actions_count_from_the_covering_action_index(db):
    """The per-group counts of EVENT_ACTIONS_SQL read only the partial covering index (schema step
    9); the newest event of each group is one seek. With a filter the index cannot cover, the
    answer is the same rows (hand-checked above), read through the table."""
    from datasource.query_actions import EVENT_ACTIONS_SQL

    where = "ts_ms >= ? AND ts_ms < ?"
    params = [T10, T10 + 60 * MIN] * 2
    plan = " / ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + EVENT_ACTIONS_SQL.format(where=where), params))
    assert "COVERING INDEX events_action_ts" in plan, plan
    rows = db.execute(EVENT_ACTIONS_SQL.format(where=where), params).fetchall()
    # the events' side of the test above (A's quota row there also counts CPA's credential error)
    assert sorted((r[1], r[2], r[3], r[6], r[4]) for r in rows) == [
        (A, "wait_quota_reset", "quota_exhausted", 1, T10 + 15 * MIN),
        (B, "reauth", "token_revoked", 2, T10 + 30 * MIN)]
    filtered = f"{where} AND provider = ?"  # provider is not in the index: rows read from the table
    for provider, want in (("codex", sorted(rows)), ("claude", [])):
        got = db.execute(EVENT_ACTIONS_SQL.format(where=filtered), [T10, T10 + 60 * MIN, provider] * 2).fetchall()
        assert sorted(got) == want


def test_collector_rows_without_credentials_in_url(db):
    [row] = run(db, "collector")
    assert (row["instance"], row["url"], row["state"], row["transport"], row["lag_s"]) == (
        "default", "http://127.0.0.1:8317/", "running", "subscribe", 60.0)
    assert (row["inserted"], row["duplicates"], row["dead_letters"], row["usage_publishing"]) == (13, 2, 1, True)
    assert "w1" in row["warnings"] and "secret" not in json.dumps(row)


def test_annotations_spikes_gaps_and_status_changes(db):
    out = run(db, "annotations", interval_ms=30 * MIN)
    assert [(r["time"], r["timeEnd"], r["title"]) for r in out] == [
        (T10 + 12 * MIN, T10 + 14 * MIN, "Collector gap: default"),
        (T10 + 30 * MIN, T10 + 60 * MIN, "Failure spike: 3 failures"),
        (T10 + 32 * MIN, T10 + 32 * MIN, "bob.json: active -> error")]
    assert out[1]["tags"] == "failure_spike" and out[2]["tags"] == "account_status,error"
    assert [r["title"] for r in run(db, "annotations", {"kind": "failure_spikes"}, interval_ms=HOUR)] == [
        "Failure spike: 5 failures"]
    assert run(db, "annotations", {"kind": "failure_spikes"}) == []  # 15 min buckets: at most 2 failures
    assert [r["title"] for r in run(db, "annotations", {"kind": ["collector_gaps"]})] == ["Collector gap: default"]


def test_unknown_target_and_inverted_range(db):
    from datasource.model import BadRequest
    with pytest.raises(BadRequest, match="unknown target"):
        query.execute(db, spec("nope"))
    with pytest.raises(BadRequest):
        query.execute(db, spec("summary", from_ms=T10, to_ms=T10))
    with pytest.raises(BadRequest):
        query.execute(db, spec("annotations", {"kind": "deploys"}))


@pytest.mark.parametrize("where", ["ts_ms >= ? AND ts_ms < ?", "ts_ms >= ? AND ts_ms < ? AND provider IN (?)"])
def test_account_quota_seek_uses_the_partial_quota_index(db, where):
    """Account Overview's newest-quota seek is pinned (INDEXED BY) to events_quota_account_ts, the
    events carrying quota headers: on the 10 M dataset's statistics SQLite chose events_account_ts
    and walked every event of the account in the window (438 vs 2 ms at 30 d). INDEXED BY fails
    the statement outright if a filter's WHERE ever stops the index applying: the values guard that."""
    from datasource.query_tables import QUOTA_SQL

    sql = QUOTA_SQL.format(where=where)
    # one statement for every account: [instance, account key, unused time] per account
    accounts = json.dumps([["default", A, None], ["default", "no-such-account", None]])
    # the window twice: the seek on event_rows, then the filters' own (checked on the view)
    params = [accounts, T10, T10 + 60 * MIN, T10, T10 + 60 * MIN, *(["codex"] if "provider" in where else [])]
    db.execute("ANALYZE")
    plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "USING INDEX events_quota_account_ts" in plan
    assert db.execute(sql, params).fetchall() == [("default", A, "plus", 100.0, T10 + 75 * MIN)]
