"""protocol.py: the request bodies Grafana really sends, parsed to exact TargetSpecs; responses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from datasource import protocol
from datasource.model import BadRequest, Clause, Field, Frame, TargetSpec
from datasource.protocol import ProtocolError

FIXTURES = Path(__file__).parent / "fixtures"
NOW = 1795839300000
# 2026-11-27T22:13:20.446Z and 2026-11-28T04:13:20.445Z (6 h minus 1 ms later)
PANEL_FROM, PANEL_TO = 1795817600446, 1795839200445
DAY_START = 1795824000000  # 2026-11-28T00:00:00Z


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"grafana_{name}.json").read_text())


def test_scenes_panel_body_skips_hidden_and_metricless_targets():
    targets = protocol.parse_query(fixture("query_panel"), now_ms=NOW)
    assert [t.ref_id for t in targets] == ["A", "C"]
    adhoc = (Clause("model", "=~", ("gpt-.*",)), Clause("status", "!=", ("429",)))
    assert targets[0].spec == TargetSpec(
        target="summary",
        payload={"provider": ["codex", "claude"], "account": "__all__", "status": "failed"},
        from_ms=PANEL_FROM, to_ms=PANEL_TO, interval_ms=300000, max_data_points=100,
        clauses=(Clause("provider", "=", ("codex", "claude")), Clause("status", "=", ("failed",))) + adhoc,
        now_ms=NOW,
    )
    # builder mode regex-formats multi values: (a|b\.c) -> two alternatives, dot unescaped
    assert targets[1].spec.target == "timeseries"
    assert targets[1].spec.clauses == (Clause("model", "=", ("gpt-5", "claude-sonnet-4.5")),) + adhoc


def test_legacy_body_reads_data_string_and_adhoc_filters():
    targets = protocol.parse_query(fixture("query_legacy"), now_ms=NOW)
    assert len(targets) == 1
    spec = targets[0].spec
    assert (targets[0].ref_id, spec.target, spec.payload) == ("A", "breakdown", {"by": "model", "provider": "codex"})
    assert (spec.from_ms, spec.to_ms, spec.interval_ms, spec.max_data_points) == (
        DAY_START, DAY_START + 3600000, 60000, 60)
    assert spec.clauses == (Clause("provider", "=", ("codex",)), Clause("instance", "=", ("eu",)))


def test_code_mode_payload_string_and_epoch_range():
    (target,) = protocol.parse_query(fixture("query_codemode_string"), now_ms=NOW)
    assert target.spec.payload == {"by": "status_code", "provider": ["codex", "gemini"],
                                   "model": "__all__", "status": "5xx"}
    assert (target.spec.from_ms, target.spec.to_ms) == (1795910400000, 1795914000000)
    assert target.spec.clauses == (Clause("provider", "=", ("codex", "gemini")), Clause("status", "=", ("5xx",)))


def test_annotation_query_has_no_filters():
    (target,) = protocol.parse_query(fixture("query_annotation"), now_ms=NOW)
    assert target.ref_id == "Anno"
    assert target.spec == TargetSpec("annotations", {"kind": ["failure_spikes", "collector_gaps"]},
                                     DAY_START, DAY_START + 6 * 3600000, 20000, 1462, (), NOW)


def test_defaults_without_range_interval_or_max_points():
    (target,) = protocol.parse_query({"targets": [{"target": "summary"}]}, now_ms=NOW)
    # last 6 h, 1000 points -> 21600 ms buckets; refId defaults to A
    assert target.ref_id == "A"
    assert (target.spec.from_ms, target.spec.to_ms) == (NOW - 21600000, NOW)
    assert (target.spec.interval_ms, target.spec.max_data_points) == (21600, 1000)


def test_default_interval_never_below_one_second():
    body = {"range": {"from": 0, "to": 60000}, "maxDataPoints": 1000, "targets": [{"target": "summary"}]}
    assert protocol.parse_query(body, now_ms=NOW)[0].spec.interval_ms == 1000


def test_empty_payload_string_and_filters_fallback():
    body = {"range": {"from": 0, "to": 10}, "targets": [{"target": "requests", "payload": ""}],
            "filters": [], "adhocFilters": [{"key": "provider", "operator": "=", "value": "codex"}]}
    (target,) = protocol.parse_query(body, now_ms=NOW)
    assert target.spec.payload == {}
    assert target.spec.clauses == (Clause("provider", "=", ("codex",)),)


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ([], "BAD_REQUEST", "request body must be a JSON object"),
        ({"range": {"from": 10, "to": 10}}, "BAD_RANGE", "range.from must be before range.to"),
        ({"range": {"from": "2026-11-28T01:00:00Z", "to": "2026-11-28T00:00:00Z"}}, "BAD_RANGE",
         "range.from must be before range.to"),
        ({"range": {"from": "yesterday", "to": 5}}, "BAD_RANGE", "range.from is not an ISO-8601 time: 'yesterday'"),
        ({"range": {"from": True, "to": 5}}, "BAD_RANGE", "range.from must be an ISO time or epoch milliseconds"),
        ({"range": {"to": 5}}, "BAD_RANGE", "range.from must be an ISO time or epoch milliseconds"),
        ({"range": "now-6h"}, "BAD_REQUEST", "range must be a JSON object"),
        ({"intervalMs": 0}, "BAD_REQUEST", "intervalMs must be a positive number up to 9007199254740992"),
        ({"maxDataPoints": "many"}, "BAD_REQUEST", "maxDataPoints must be a positive number up to 9007199254740992"),
        ({"maxDataPoints": 10**400}, "BAD_REQUEST", "maxDataPoints must be a positive number up to 9007199254740992"),
        ({"intervalMs": 2**53 + 2}, "BAD_REQUEST", "intervalMs must be a positive number up to 9007199254740992"),
        ({"range": {"from": 0, "to": 10**400}}, "BAD_RANGE", "range.to is out of range (epoch ms of the years 1 to 9999)"),
        ({"range": {"from": 0, "to": 2**63}}, "BAD_RANGE", "range.to is out of range (epoch ms of the years 1 to 9999)"),
        ({"range": {"from": -1e300, "to": 0}}, "BAD_RANGE", "range.from is out of range (epoch ms of the years 1 to 9999)"),
        ({"range": {"from": "0", "to": "1" + "0" * 30}}, "BAD_RANGE",
         "range.to is out of range (epoch ms of the years 1 to 9999)"),
        ({"range": {"from": "0", "to": "9" * 20}}, "BAD_RANGE",
         "range.to is out of range (epoch ms of the years 1 to 9999)"),
        (None, "BAD_REQUEST", "request body must be a JSON object"),
        ({"targets": [None]}, "BAD_REQUEST", "targets[0] must be a JSON object"),
        ({"targets": [{"target": "", "payload": [1]}]}, "BAD_REQUEST",
         "targets[0].payload must be a JSON object or its JSON text"),
        ({"targets": [{"target": "summary", "payload": {}, "data": 5}]}, "BAD_REQUEST",
         "targets[0].data must be a JSON object or its JSON text"),
        ({"filters": [], "adhocFilters": {}}, "BAD_REQUEST", "adhocFilters must be a list of {key, operator, value}"),
        ({"targets": {"target": "summary"}}, "BAD_REQUEST", "targets must be a list"),
        ({"targets": ["summary"]}, "BAD_REQUEST", "targets[0] must be a JSON object"),
        ({"targets": [{"target": 5}]}, "BAD_REQUEST", "targets[0].target must be a non-empty string"),
        ({"targets": [{"target": "summary", "payload": [1]}]}, "BAD_REQUEST",
         "targets[0].payload must be a JSON object or its JSON text"),
        ({"targets": [{"target": "summary", "payload": "{\"a\": "}]}, "INVALID_JSON",
         "targets[0].payload is not valid JSON: Expecting value: line 1 column 7 (char 6)"),
        ({"filters": {"key": "provider"}}, "BAD_REQUEST", "filters must be a list of {key, operator, value}"),
    ],
)
def test_bad_query_bodies(body, code, message):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_query(body, now_ms=NOW)
    assert (info.value.code, str(info.value)) == (code, message)


def test_bad_filter_values_raise_bad_request():
    body = {"targets": [{"target": "summary", "payload": {"status": "sometimes"}}]}
    with pytest.raises(BadRequest):
        protocol.parse_query(body, now_ms=NOW)


def test_variable_request():
    req = protocol.parse_variable(fixture("variable"), now_ms=NOW)
    assert req == protocol.LookupRequest("account", DAY_START - 86400000, DAY_START,
                                         (Clause("provider", "=", ("codex", "claude")),))
    raw = protocol.parse_variable({"payload": "{\"target\": \"provider\"}"}, now_ms=NOW)
    assert raw == protocol.LookupRequest("provider", NOW - 7 * 86400000, NOW, ())
    with pytest.raises(ProtocolError, match="payload.target must be a non-empty string"):
        protocol.parse_variable({"payload": {}}, now_ms=NOW)


def test_tag_values_request():
    req = protocol.parse_tag_values(fixture("tag_values"), now_ms=NOW)
    assert req == protocol.LookupRequest(
        "model", DAY_START, DAY_START + 6 * 3600000,
        (Clause("provider", "=", ("codex",)), Clause("status", "=", ("429", "5xx"))))
    with pytest.raises(ProtocolError, match="key must be a non-empty string"):
        protocol.parse_tag_values({"key": ""}, now_ms=NOW)


def test_payload_options_and_simplejson_annotations():
    req = protocol.parse_payload_options(fixture("metric_payload_options"))
    assert req == protocol.PayloadOptionsRequest("timeseries", "split_by", {"measure": "requests"})
    ann = protocol.parse_annotations(fixture("simplejson_annotations"), now_ms=NOW)
    assert ann.annotation["name"] == "Collector gaps"
    assert ann.spec == TargetSpec("annotations", {"kind": "collector_gaps"}, DAY_START,
                                  DAY_START + 6 * 3600000, 21600, 1000, (), NOW)
    as_json = protocol.parse_annotations({"annotation": {"query": "{\"kind\": \"failure_spikes\", \"provider\": \"codex\"}"}},
                                         now_ms=NOW)
    assert as_json.spec.payload == {"kind": "failure_spikes", "provider": "codex"}
    assert as_json.spec.clauses == (Clause("provider", "=", ("codex",)),)


def test_json_depth_limit_and_decoding():
    assert protocol.json_depth('{"a": "[[[[{{{{", "b": [[1]]}') == 3
    assert protocol.decode_json(b"") == {}
    with pytest.raises(ProtocolError) as info:
        protocol.decode_json("[" * 65 + "]" * 65)
    assert (info.value.code, str(info.value)) == ("TOO_DEEP", "request body is nested deeper than 64 levels")
    with pytest.raises(ProtocolError, match="not UTF-8"):
        protocol.decode_json(b"\xff\xfe")
    with pytest.raises(ProtocolError, match="NaN is not allowed"):
        protocol.decode_json('{"a": NaN}')


def test_decode_depth_64_is_accepted():
    nested = protocol.decode_json("[" * 64 + "]" * 64)
    depth = 0
    while isinstance(nested, list) and nested:
        nested, depth = nested[0], depth + 1
    assert depth == 63


def test_frames_response_shape():
    frame = Frame("summary", [Field("requests", "number", [3]),
                              Field("p95", "number", [float("nan")], {"unit": "ms"}, {"provider": "codex"})],
                  {"notices": []})
    assert protocol.frames_response("A", [frame]) == [{
        "refId": "A", "name": "summary", "meta": {"notices": []},
        "fields": [
            {"name": "requests", "type": "number", "values": [3], "config": {}, "labels": {}},
            {"name": "p95", "type": "number", "values": [None], "config": {"unit": "ms"}, "labels": {"provider": "codex"}},
        ],
    }]


def test_small_responses():
    assert protocol.variable_response([("ali***@example.com", "9f2c4e1a7b3d5c60")]) == [
        {"__text": "ali***@example.com", "__value": "9f2c4e1a7b3d5c60"}]
    assert protocol.tag_keys_response(["provider", "min_latency_ms"]) == [
        {"type": "string", "text": "provider"}, {"type": "number", "text": "min_latency_ms"}]
    assert protocol.tag_values_response(["gpt-5"]) == [{"text": "gpt-5"}]
    metrics = [{"value": "summary", "label": "Summary", "payloads": []}]
    assert protocol.metrics_response(metrics) == metrics
    assert protocol.search_response(metrics) == ["summary"]
    assert protocol.error_body(400, "BAD_RANGE", "bad") == {
        "ok": False, "status": 400, "message": "bad", "error": {"code": "BAD_RANGE", "message": "bad"}}


def test_annotations_response_and_frame_rows():
    frame = Frame("annotations", [
        Field("time", "time", [1000, 2000]), Field("timeEnd", "time", [1500, None]),
        Field("title", "string", ["Failure spike", "Collector gap"]),
        Field("text", "string", ["12 failures", "no events"]),
        Field("tags", "other", [["failure_spikes", "codex"], "collector_gaps, eu"]),
    ])
    annotation = {"name": "Gaps", "query": "collector_gaps"}
    assert protocol.annotations_response(annotation, [frame]) == [
        {"annotation": annotation, "time": 1000, "timeEnd": 1500, "title": "Failure spike",
         "text": "12 failures", "tags": ["failure_spikes", "codex"]},
        {"annotation": annotation, "time": 2000, "timeEnd": None, "title": "Collector gap",
         "text": "no events", "tags": ["collector_gaps", "eu"]},
    ]
    rows = [{"instance": "eu", "url": "http://x", "state": "running", "last_error": "boom"}]
    health = protocol.health_response("0.1.0", rows)
    assert health["collectors"] == [{"instance": "eu", "state": "running", "transport": None, "mode": None,
                                     "last_consumed": None, "last_inserted": None, "lag_s": None}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["range", "from", "to", "targets", "target", "payload", "data", "hide", "refId",
                         "filters", "adhocFilters", "key", "operator", "value", "intervalMs",
                         "maxDataPoints", "provider", "status", "annotation", "query", "metric", "name"]),
        children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_parsers_raise_only_client_errors(body):
    parsers = {protocol.parse_query: list, protocol.parse_variable: protocol.LookupRequest,
               protocol.parse_tag_values: protocol.LookupRequest,
               protocol.parse_annotations: protocol.AnnotationRequest}
    for parse, kind in parsers.items():
        try:
            result = parse(body, now_ms=NOW)
        except (ProtocolError, BadRequest):
            continue
        assert isinstance(result, kind)
        specs = [t.spec for t in result] if kind is list else [getattr(result, "spec", None)]
        assert all(s is None or s.from_ms < s.to_ms for s in specs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_decode_json(raw):
    try:
        value = protocol.decode_json(raw)
    except ProtocolError as exc:
        assert exc.code in ("INVALID_JSON", "TOO_DEEP")
    else:
        assert value is None or isinstance(value, (dict, list, str, int, float, bool))
