"""Pure filter parsing and SQL building, plus the guarantees that need a real database."""

from __future__ import annotations

import json
import time

import pytest

from datasource import filters, query
from datasource.filters import Clause, clauses_from_adhoc, clauses_from_payload, expand_value, where_sql
from datasource.model import BadRequest, Unavailable
from test_query import HOUR, T10, columns, db, rows, spec  # noqa: F401


@pytest.mark.parametrize("raw,expected", [
    ("codex", ("codex",)),
    (["codex", "claude"], ("codex", "claude")),
    ("(a|b\\.c)", ("a", "b.c")),
    ("(gpt\\-5|x\\(high\\))", ("gpt\\-5", "x(high)")),  # Grafana does not escape '-'
    ("{a,b}", ("a", "b")),
    ("gpt-5\\.4\\(high\\)", ("gpt-5.4(high)",)),  # builder mode: a single regex-escaped value
    (429, ("429",)),
    (["a", "a", " b "], ("a", "b")),
    ("All", ()), ("all", ()), ("$__all", ()), ("__all__", ()), ("*", ()), (".*", ()), ("", ()),
    ([], ()), (["x", "__all__"], ()), (None, ()), ("{}", ()),
])
def test_expand_value_forms(raw, expected):
    assert expand_value(raw, "model") == expected


@pytest.mark.parametrize("raw", [{"a": 1}, True, [["x"]], [{"a": 1}]])
def test_expand_value_rejects_objects(raw):
    with pytest.raises(BadRequest):
        expand_value(raw, "model")


def test_clauses_from_payload_keeps_filter_keys_only():
    clauses = clauses_from_payload({"measure": "requests", "provider": ["codex"], "status": "4xx",
                                    "min_latency_ms": 3000, "search": " 50% ", "model": "All"})
    assert clauses == (Clause("provider", "=", ("codex",)), Clause("status", "=", ("4xx",)),
                       Clause("min_latency_ms", "=", ("3000",)), Clause("search", "=", ("50%",)))


@pytest.mark.parametrize("payload,message", [
    ({"status": "maybe"}, "status"),
    ({"cache": "warm"}, "cache"),
    ({"min_latency_ms": "fast"}, "not a number"),
    ({"max_latency_ms": "inf"}, "finite"),
    ({"min_latency_ms": [1, 2]}, "one number"),
    ({"search": "x" * 201}, "longer"),
    ({"provider": "x" * 513}, "longer"),
    ({"provider": [str(i) for i in range(501)]}, "more than"),
])
def test_bad_payload_values(payload, message):
    with pytest.raises(BadRequest, match=message):
        clauses_from_payload(payload)


def test_adhoc_filters_parse_and_refuse():
    assert clauses_from_adhoc([{"key": "model", "operator": "=~", "value": "^gpt"},
                               {"key": "min_latency_ms", "operator": "<", "value": "10"}]) == (
        Clause("model", "=~", ("^gpt",)), Clause("min_latency_ms", "<", ("10",)))
    assert clauses_from_adhoc(None) == () and clauses_from_adhoc([]) == ()
    for bad in ([{"key": "email", "operator": "=", "value": "x"}],
                [{"key": "model", "operator": "LIKE", "value": "x"}],
                [{"key": "model", "operator": "<", "value": "5"}],
                [{"key": "search", "operator": "=~", "value": "x"}],
                [{"key": "min_latency_ms", "operator": ">", "value": "soon"}],
                ["provider=codex"], {"key": "model"}):
        with pytest.raises(BadRequest):
            clauses_from_adhoc(bad)


def test_where_sql_uses_bound_parameters_only():
    sql, params = where_sql((Clause("provider", "=", ("codex", "claude")), Clause("status", "=", ("4xx", "failed")),
                             Clause("min_latency_ms", "=", ("3000",)), Clause("search", "=", ("50%_x",)),
                             Clause("model", "!=", ("a",))))
    assert sql.count("?") == len(params)
    assert params[:2] == ['["codex", "claude"]', '["codex", "claude"]']
    assert "'%\\50\\%\\_x%'" not in sql and "%50\\%\\_x%" in params
    assert where_sql(()) == ("1", [])


INJECTIONS = ["x' OR 1=1 --", "'); DROP TABLE events; --", "\" OR \"\"=\"", "1; ATTACH 'x' AS y",
              "%' OR '%'='", "\\' OR 1 --", "a) OR (1=1"]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("key", ["provider", "model", "account", "api_key", "trace_id", "search", "endpoint"])
def test_values_cannot_change_the_sql(db, key, value):
    plain_sql, _ = where_sql(clauses_from_payload({key: "plain"}))
    sql, params = where_sql(clauses_from_payload({key: value}))
    assert sql == plain_sql
    if key == "search":
        escaped = value.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        assert params[0] == f"%{escaped}%"
    else:
        assert json.loads(params[0]) == [value.strip()]
    [row] = rows(query.execute(db, spec("summary", {}, clauses_from_payload({key: value})))[0])
    assert row["requests"] == 0
    assert db.execute("SELECT count(*) FROM events").fetchall()[0][0] == 13


def test_adhoc_regex_bounded():
    for pattern in ("(a+)+$", "(x*)*y", "(a|aa){2,}+", "(\\w+)\\1", "(?<=a)b", "a" * 201):
        with pytest.raises(BadRequest):
            clauses_from_adhoc([{"key": "model", "operator": "=~", "value": pattern}])
    with pytest.raises(BadRequest, match="invalid regex"):
        clauses_from_adhoc([{"key": "model", "operator": "=~", "value": "("}])
    start = time.monotonic()
    assert filters.regexp("a.*b.*c.*d", "a" * 100_000) == 0  # subject cut to 512 characters
    assert time.monotonic() - start < 1.0
    assert filters.regexp("^gam", "gamma-3") == 1 and filters.regexp(None, "x") == 0
    with pytest.raises(ValueError):
        filters.regexp("a" * 201, "a")


def test_regex_filter_on_database_and_compiled_once(db):
    filters._compile.cache_clear()
    clauses = clauses_from_adhoc([{"key": "endpoint", "operator": "=~", "value": "responses$"}])
    [row] = rows(query.execute(db, spec("summary", {}, clauses))[0])
    assert row["requests"] == 10
    info = filters._compile.cache_info()
    assert info.misses == 1 and info.hits >= 10


def test_where_sql_for_side_tables_skips_keys_they_lack():
    clauses = (Clause("instance", "=", ("east",)), Clause("api_key", "=", ("k",)), Clause("search", "=", ("x",)))
    sql, params = where_sql(clauses, filters.COLLECTOR_COLUMNS)
    assert sql == "(coalesce(instance, '') IN (SELECT value FROM json_each(?)))" and params == ['["east"]']


def test_query_limit_turns_into_unavailable(db):
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    start = time.monotonic()
    with pytest.raises(Unavailable, match="longer than"):
        query._limited(db, 0.2, lambda: db.execute(endless).fetchall())
    assert time.monotonic() - start < 2.0
    with pytest.raises(Unavailable, match="rows"):
        old = query.ROW_LIMIT
        query.ROW_LIMIT = 3
        try:
            query._limited(db, 5.0, lambda: db.execute("SELECT id FROM events").fetchall())
        finally:
            query.ROW_LIMIT = old


def test_query_limit_counts_rows_across_the_block_and_leaves_nothing_behind(db, monkeypatch):
    ids = [r[0] for r in db.execute("SELECT id FROM events ORDER BY id LIMIT 4")]
    assert len(ids) == 4
    two = "SELECT id FROM events ORDER BY id LIMIT 2"
    monkeypatch.setattr(query, "ROW_LIMIT", 3)
    # 2 + 2 rows in one block: over a limit of 3, like apsw.ext.query_limit (rows of all its statements)
    with pytest.raises(Unavailable, match="more than 3 rows"):
        query._limited(db, 5.0, lambda: [db.execute(two).fetchall() for _ in range(2)])
    # each block has its own count, and the handler and row tracer are gone after a block
    assert query._limited(db, 5.0, lambda: db.execute(two).fetchall()) == [(ids[0],), (ids[1],)]
    assert query._limited(db, 5.0, lambda: db.execute(two).fetchall()) == [(ids[0],), (ids[1],)]
    assert db.row_trace is None
    assert db.execute("SELECT id FROM events ORDER BY id").fetchall()[:4] == [(i,) for i in ids]
    # a row tracer set by the caller still sees (and may change) the rows, and is restored
    seen = []
    db.row_trace = lambda cursor, row: seen.append(row) or (row[0] * 10,)
    try:
        assert query._limited(db, 5.0, lambda: db.execute(two).fetchall()) == [(ids[0] * 10,), (ids[1] * 10,)]
        assert seen == [(ids[0],), (ids[1],)]
        assert db.execute("SELECT 7").fetchall() == [(70,)] and seen[-1] == (7,)
    finally:
        db.row_trace = None
    # after a timeout the connection answers the next block at once
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    with pytest.raises(Unavailable, match="longer than"):
        query._limited(db, 0.05, lambda: db.execute(endless).fetchall())
    assert query._limited(db, 5.0, lambda: db.execute("SELECT count(*) FROM events").fetchone()) == (
        db.execute("SELECT count(*) FROM events").fetchone())


def test_busy_database_is_unavailable(db):
    import apsw

    def busy():
        raise apsw.BusyError("database is locked")
    with pytest.raises(Unavailable, match="busy"):
        query._limited(db, 1.0, busy)


def test_variables_tag_keys_and_values(db):
    window = (T10, T10 + HOUR)
    assert query.variable_values(db, "provider", *window, ()) == [("claude", "claude"), ("codex", "codex")]
    accounts = query.variable_values(db, "account", *window, ())
    assert accounts == [("-", "-"), ("alice@example.com", "aaaa000000000001"),
                        ("bob@example.com", "bbbb000000000002"), ("carol@example.com", "cccc000000000003")]
    keys = query.variable_values(db, "api_key", *window, (), aliases={
        "faa210d78e64b975e87ea4585883b7f8c8d5b0c95719a5d70ba0c3a348bc5e24": "ci-bot"})
    assert [t for t, _ in keys] == ["sk******02", "ci-bot"]  # ordered by hash value
    own = clauses_from_payload({"provider": "claude", "instance": "east"})
    assert query.variable_values(db, "provider", *window, own) == [("claude", "claude")]  # own filter ignored
    assert query.variable_values(db, "model", *window, own) == [("gamma-3", "gamma-3")]
    status = query.variable_values(db, "status", *window, ())
    assert [v for _, v in status] == ["success", "failed", "unusual", "200", "302", "401", "429", "500", "503"]
    assert [v for _, v in query.variable_values(db, "cache", *window, ())] == ["hit", "miss", "read", "creation"]
    with pytest.raises(BadRequest):
        query.variable_values(db, "email", *window, ())
    assert query.tag_keys() == list(filters.FILTER_KEYS)
    assert query.tag_values(db, "instance", *window, ()) == ["default", "east"]
    assert query.tag_values(db, "api_key", *window, ()) == ["sk******02", "sk******01"]
    assert query.tag_values(db, "account", *window, (), mask_emails=True)[1] == "aaaa000000000001"
    assert query.tag_values(db, "search", *window, ()) == []


def test_metrics_catalogue_and_payload_options():
    catalogue = {m["value"]: m for m in query.metrics()}
    assert list(catalogue) == ["summary", "timeseries", "accounts", "api_keys", "requests", "breakdown",
                               "account_actions", "usage", "collector", "annotations"]
    payloads = {p["name"]: p for p in catalogue["timeseries"]["payloads"]}
    assert payloads["measure"]["type"] == "select" and payloads["provider"]["type"] == "input"
    assert {"label": "latency_p95", "value": "latency_p95"} in payloads["measure"]["options"]
    assert [o["value"] for o in query.payload_options("usage", "by", {})] == ["model", "api_key", "account", "provider"]
    with pytest.raises(BadRequest):
        query.payload_options("usage", "measure", {})
    with pytest.raises(BadRequest):
        query.payload_options("nope", "by", {})


def test_mask_emails_applies_to_labels(db):
    frames = query.execute(db, spec("annotations", {"kind": "account_status"}), mask_emails=True)
    assert rows(frames[0])[0]["title"] == "bob.json: active -> error"
    frames = query.execute(db, spec("accounts"), mask_emails=True)
    assert all("@" not in (r["account"] or "") or "***@" in r["account"] for r in rows(frames[0]))


# --- regex cost and ad hoc injection (issue 7) -------------------------------------------------

@pytest.mark.parametrize(("pattern", "nested"), [
    ("(a+)+$", True), ("((a)+)+b", True), ("((a+))+b", True), ("(?:(?:a)*)*b", True), ("x|((a)*)*b", True),
    ("(x|xy)*z", True), ("(a|aa){2,}", True), ("(\\(a+\\))+", True), ("([(]+)+", True),
    ("(a|b|c)", False), ("^(gpt-5|claude)$", False), ("(gpt|claude).*", False), ("(a)+", False),
    ("([a-z]+)?x", False), ("(a){2}(b)+", False), ("((a)(b))+", False), ("([)]a+)", False), ("\\(a+\\)+", False),
])
def test_nested_quantifiers_are_found_at_any_depth(pattern, nested):
    assert filters.nested_quantifier(pattern) is nested


@pytest.mark.parametrize(("pattern", "wide"), [
    (".*a.*b", 2), (".*.*.*=", 3), ("[*+]*a+", 2), ("\\*\\+.*", 1), ("a{0,1000}a{0,1000}b", 2),
    ("a{2,5}b{,3}c*", 1), ("a{3}b{0,16}", 0), ("a{,17}", 1), ("[a-z]*[a-z]*[a-z]*[a-z]*0", 4), ("[]*+]x*", 1),
])
def test_wide_quantifiers_are_counted_outside_classes_and_escapes(pattern, wide):
    assert filters.wide_quantifiers(pattern) == wide


@pytest.mark.parametrize("pattern", [
    "((a)+)+b", "(?:(?:a)*)*b", "x|((a)*)*b",      # exponential: nested one group deeper than before
    ".*.*.*=", "a*a*a*a*a*b", "[a-z]+[0-9]*[a-z]+!", "a{0,999}a{0,999}a{0,999}b",  # polynomial, degree > 3
])
def test_catastrophic_patterns_are_refused_before_any_query(pattern):
    with pytest.raises(BadRequest):
        clauses_from_adhoc([{"key": "model", "operator": "=~", "value": pattern}])
    with pytest.raises(BadRequest):
        clauses_from_adhoc([{"key": "model", "operator": "!~", "value": pattern}])


def test_accepted_patterns_still_work_and_the_subject_is_cut_to_a_label(db):
    for pattern in (".*a.*b", "^gpt-.*-mini$", "(codex|claude)", "^5\\d\\d$"):
        assert clauses_from_adhoc([{"key": "model", "operator": "=~", "value": pattern}])
    # labels are at most 512 bytes, so REGEXP looks at no more: the cost of two wide quantifiers
    # is bounded by 512^3 steps per value
    assert filters.MAX_SUBJECT_LEN == 512
    assert filters.regexp("b$", "a" * 511 + "b") == 1
    assert filters.regexp("b$", "a" * 512 + "b") == 0
    [row] = rows(query.execute(db, spec("summary", {}, clauses_from_adhoc(
        [{"key": "model", "operator": "=~", "value": ".*g.*t"}])))[0])
    assert row["requests"] == rows(query.execute(db, spec("summary", {}, clauses_from_adhoc(
        [{"key": "model", "operator": "=~", "value": "g.*t"}])))[0])[0]["requests"]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("key", ["provider", "model", "account", "api_key", "trace_id", "endpoint", "instance",
                                 "failure_type", "request_type"])
@pytest.mark.parametrize("op", ["=", "!=", "=~", "!~"])
def test_adhoc_values_cannot_change_the_sql(db, key, value, op):
    plain_sql, _ = where_sql(clauses_from_adhoc([{"key": key, "operator": op, "value": "plain"}]))
    try:
        clauses = clauses_from_adhoc([{"key": key, "operator": op, "value": value}])
    except BadRequest:
        assert op in ("=~", "!~")  # some injections are not valid regexes: refused, never run
        return
    sql, params = where_sql(clauses)
    assert sql == plain_sql
    assert all(p == value or json.loads(p) == [value] for p in params)  # only the value, bound
    query.execute(db, spec("summary", {}, clauses))
    assert db.execute("SELECT count(*) FROM events").fetchall()[0][0] == 13


@pytest.mark.parametrize("key", ["model) OR 1=1 --", "events; DROP TABLE events", "status_code", "fail_body",
                                 "client_ip", "api_key_hash", "MODEL", " model\x00"])
def test_adhoc_keys_outside_the_filter_list_are_refused(key):
    with pytest.raises(BadRequest):
        clauses_from_adhoc([{"key": key, "operator": "=", "value": "x"}])


def _ids(db, clauses, from_ms, to_ms, span=True) -> list[str]:
    sql, params = where_sql(clauses, span=(from_ms, to_ms) if span else None)
    return [r for r, in db.execute(f"SELECT request_id FROM events WHERE ts_ms >= ? AND ts_ms < ? AND {sql} "
                                   "ORDER BY ts_ms", (from_ms, to_ms, *params))]


def test_trace_filter_seeks_each_hour_of_its_window(db):
    clauses = clauses_from_payload({"trace_id": ["req_trace_10", "p01"]})
    sql, params = where_sql(clauses, span=(T10 - 1, T10 + HOUR + 1))
    hour = T10 // HOUR  # T10 is 10:00 sharp: the window touches 09:00, 10:00 and 11:00
    assert params == [json.dumps([hour - 1, hour, hour + 1]), '["req_trace_10", "p01"]'] * 2
    plan = " ".join(r[3] for r in db.execute(
        f"EXPLAIN QUERY PLAN SELECT id FROM events WHERE ts_ms >= ? AND ts_ms < ? AND {sql}",
        (T10 - 1, T10 + HOUR + 1, *params)))
    assert "events_trace_hour" in plan and "events_request_hour" in plan, plan
    # r10 by its trace id (10:50), p01 by its request id (09:30); each window gives what it holds
    assert _ids(db, clauses, T10 - HOUR, T10 + HOUR) == ["p01", "r10"]
    assert _ids(db, clauses, T10, T10 + HOUR) == ["r10"]
    assert _ids(db, clauses, T10 - HOUR, T10) == ["p01"]
    r10_ts = db.execute("SELECT ts_ms FROM events WHERE request_id = 'r10'").fetchall()[0][0]
    assert _ids(db, clauses, r10_ts, r10_ts + 1) == ["r10"]
    assert _ids(db, clauses, r10_ts + 1, T10 + 2 * HOUR) == []
    # the negation keeps the other eleven rows of the three hours, as the scan form does
    negated = clauses_from_adhoc([{"key": "trace_id", "operator": "!=|", "values": ["req_trace_10", "p01"]}])
    kept = _ids(db, negated, T10 - HOUR, T10 + 2 * HOUR)
    assert len(kept) == 11 and "r10" not in kept and "p01" not in kept
    assert kept == _ids(db, negated, T10 - HOUR, T10 + 2 * HOUR, span=False)


def test_trace_filter_scans_where_the_hour_indexes_cannot_serve(db):
    # an empty value also matches rows without a trace id, which the partial indexes leave out
    empty = (Clause("trace_id", "=", ("",)),)
    sql, _ = where_sql(empty, span=(T10, T10 + HOUR))
    assert "coalesce(trace_id, '')" in sql and "3600000" not in sql
    assert len(_ids(db, empty, T10, T10 + HOUR)) == 9  # every row of the window but r10's
    # a window longer than MAX_TRACE_BUCKETS hours, or one before 1970, is scanned
    clauses = clauses_from_payload({"trace_id": "r04"})
    far = T10 - filters.MAX_TRACE_BUCKETS * HOUR
    for window in ((far, T10 + HOUR), (-HOUR, T10 + HOUR)):
        sql, _ = where_sql(clauses, span=window)
        assert "coalesce(request_id, '')" in sql
        assert _ids(db, clauses, *window) == ["r04"]
    assert "3600000" in where_sql(clauses, span=(far + HOUR, T10 + HOUR))[0]
    assert _ids(db, clauses, far + HOUR, T10 + HOUR) == ["r04"]


def test_distinct_keys_under_a_trace_id_read_its_rows_instead_of_seeking_every_key(db, monkeypatch):
    from datasource import query_plan
    from test_api_key_sets import statements

    # six hours: past SCAN_DISTINCT_MS, where an unselective filter seeks one stored key at a time
    lo, hi = T10 - 4 * HOUR, T10 + 2 * HOUR
    traced = query_plan.Reader(db, clauses_from_payload({"trace_id": ["req_trace_10", "r04"]}), rollups=False)
    assert traced.selective()
    seen = statements(db, lambda: traced.distinct("account_key", lo, hi, "-"))
    assert not any("LIMIT 1" in sql for sql, _ in seen)
    assert traced.distinct("account_key", lo, hi, "-") == {"aaaa000000000001", "bbbb000000000002"}  # r10 A, r04 B
    # a filter that keeps many rows still seeks per key, and agrees
    broad = query_plan.Reader(db, clauses_from_payload({"model": "alpha-1"}), rollups=False)
    assert not broad.selective()
    seen = statements(db, lambda: broad.distinct("account_key", lo, hi, "-"))
    assert any("LIMIT 1" in sql for sql, _ in seen)
    assert broad.distinct("account_key", lo, hi, "-") == {"aaaa000000000001"}  # p01 r01 r02 r03 r10; r09 none
    assert not query_plan.Reader(db, (Clause("trace_id", "!=", ("r04",)),)).selective()
    assert not query_plan.Reader(db, (Clause("trace_id", "=", ("",)),)).selective()
    # a search is selective where its matching ids are known (under SEARCH_IDS_MAX), not past that
    searched = query_plan.Reader(db, clauses_from_payload({"search": "beta"}), rollups=False)
    assert searched.selective((lo, hi)) and not searched.selective()
    seen = statements(db, lambda: searched.distinct("account_key", lo, hi, "-"))
    assert not any("LIMIT 1" in sql for sql, _ in seen)
    assert searched.distinct("account_key", lo, hi, "-") == {"bbbb000000000002"}  # r04 r05 r06: B
    monkeypatch.setattr(query_plan, "SEARCH_IDS_MAX", 0)
    query_plan._search_cache.clear()
    assert not searched.selective((lo, hi))
    assert searched.distinct("account_key", lo, hi, "-") == {"bbbb000000000002"}


def test_a_search_scans_its_window_once_and_reads_the_matching_ids_after(db, monkeypatch):
    from datasource import query_plan
    from test_api_key_sets import statements
    from test_query import run

    alpha = clauses_from_payload({"search": "alpha"})
    query_plan._search_cache.clear()
    # 'alpha' matches the five alpha-1 events of 10:00-11:00: r01 r02 r03 r09 r10
    seen = statements(db, lambda: [run(db, "summary", clauses=alpha, rollups=False),
                                   run(db, "summary", clauses=alpha, rollups=False)])
    scans = [sql for sql, _ in seen if "LIKE" in sql]
    # one scan for the window and one for the previous window (the summary's change), not one per read
    assert len(scans) == 2 and all(sql.startswith("SELECT id FROM events") for sql in scans)
    assert any("id IN (SELECT value FROM json_each(?))" in sql for sql, _ in seen)
    [row] = run(db, "summary", clauses=alpha)
    assert (row["requests"], row["failures"], row["prev_requests"]) == (5, 2, 1)  # r03 429, r10 503; p01
    # past SEARCH_IDS_MAX matches every read scans, with the same answer
    monkeypatch.setattr(query_plan, "SEARCH_IDS_MAX", 0)
    query_plan._search_cache.clear()
    seen = statements(db, lambda: run(db, "summary", clauses=alpha, rollups=False))
    assert not any("id IN (SELECT value FROM json_each(?))" in sql for sql, _ in seen)
    [row] = run(db, "summary", clauses=alpha)
    assert (row["requests"], row["failures"], row["prev_requests"]) == (5, 2, 1)


def test_search_ids_follow_new_events_and_expire(db, monkeypatch):
    from datasource import query_plan, store
    from test_query import MIN
    from test_store import event

    query_plan._search_cache.clear()
    span = (T10, T10 + HOUR)
    first = query_plan.search_ids(db, "alpha", span)
    assert len(json.loads(first)) == 5
    assert query_plan.search_ids(db, "alpha", span) is first  # cached
    # a new matching event in the window: the newest id changed, so the window is scanned again
    store.insert_batch(db, [event(77, ts_ms=T10 + 55 * MIN, row={"model": "alpha-9", "analytics_model": "alpha-9"})],
                       origin="test")
    again = query_plan.search_ids(db, "alpha", span)
    assert len(json.loads(again)) == 6 and set(json.loads(first)) < set(json.loads(again))
    monkeypatch.setattr(query_plan, "SEARCH_IDS_TTL_S", 0.0)
    assert query_plan.search_ids(db, "alpha", span) is not again  # expired: scanned again


def test_search_ids_read_the_table_in_id_order_unless_the_window_is_spread(db):
    from datasource import query_plan
    from test_api_key_sets import statements
    from test_query import MIN

    query_plan._search_cache.clear()
    # ids follow the fixture's lines: r01-r10 are 1-10, p01 11, p02 12, o01 13
    # 09:00-10:00 holds p01 and p02 (ids 11-12): one stretch, read in id order
    seen = statements(db, lambda: query_plan.search_ids(db, "p0", (T10 - HOUR, T10)))
    (by_id, args), = [(sql, args) for sql, args in seen if "id >= ? AND id <= ? AND +ts_ms" in sql]
    plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + by_id, args))
    assert "USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan and "events_ts" not in plan
    assert query_plan.search_ids(db, "p0", (T10 - HOUR, T10)) == "[11, 12]"
    # 09:00-10:10 adds r01 (10:05, id 1; r02 at 10:10 is out): 3 events over ids 1-12, more than
    # twice as many ids as events: through events_ts
    seen = statements(db, lambda: query_plan.search_ids(db, "0", (T10 - HOUR, T10 + 10 * MIN)))
    assert not any("+ts_ms" in sql for sql, _ in seen)
    assert sorted(json.loads(query_plan.search_ids(db, "0", (T10 - HOUR, T10 + 10 * MIN)))) == [1, 11, 12]
    assert query_plan.search_ids(db, "0", (T10 + 3 * HOUR, T10 + 4 * HOUR)) == "[]"  # no events there
