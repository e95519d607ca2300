"""HTTP behaviour of every route: Grafana bodies, the one error shape, limits, fuzz (no 5xx)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from datasource.config import Settings
from datasource import app as app_module
from datasource.app import AliasError, create_app, load_aliases

FIXTURES = Path(__file__).parent / "fixtures"
POST_ROUTES = ["/metrics", "/search", "/metric-payload-options", "/query", "/variable", "/tag-keys",
               "/tag-values", "/annotations"]


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"grafana_{name}.json").read_text())


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()


def assert_error(response, status: int, code: str, message: str | None = None) -> None:
    body = response.get_json()
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert set(body) == {"ok", "status", "message", "error"}
    assert (body["ok"], body["status"], body["error"]["code"]) == (False, status, code)
    assert body["error"]["message"] == body["message"]
    if message is not None:
        assert body["message"] == message


def test_root_and_healthz(client):
    root = client.get("/")
    assert (root.status_code, root.get_json()) == (200, {"ok": True, "service": "cpa-monitor", "version": "0.1.0"})
    health = client.get("/healthz").get_json()
    assert health["ok"] is True and health["version"] == "0.1.0"
    assert all("url" not in row and "last_error" not in row for row in health["collectors"])


def test_not_found_and_method_not_allowed_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "NOT_FOUND")
    response = client.get("/query")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}


def test_body_over_the_limit_is_413(db_path):
    client = create_app(Settings.from_env({}, db=db_path, collector="off", max_body_bytes=100)).test_client()
    assert_error(client.post("/query", data=b"{" + b" " * 200 + b"}",
                             content_type="application/json"), 413, "REQUEST_ENTITY_TOO_LARGE")
    assert client.post("/query", data=b'{"targets": []}', content_type="application/json").status_code == 200


def test_deep_and_invalid_json_is_400(client):
    assert_error(client.post("/query", data="[" * 65 + "]" * 65), 400, "TOO_DEEP",
                 "request body is nested deeper than 64 levels")
    assert_error(client.post("/query", data="[" * 5000), 400, "TOO_DEEP")
    assert_error(client.post("/query", data='{"targets": ['), 400, "INVALID_JSON")
    assert_error(client.post("/variable", data=b"\xff"), 400, "INVALID_JSON", "request body is not UTF-8")


def test_empty_body_means_empty_object(client):
    response = client.post("/metrics")
    assert response.status_code == 200 and isinstance(response.get_json(), list)
    assert client.post("/query").get_json() == []


def test_bad_requests_from_protocol_and_filters_are_400(client):
    body = fixture("query_panel")
    body["range"] = {"from": body["range"]["to"], "to": body["range"]["from"]}
    assert_error(client.post("/query", json=body), 400, "BAD_RANGE", "range.from must be before range.to")
    bad_filter = {"targets": [{"refId": "A", "target": "summary", "payload": {"status": "sometimes"}}]}
    assert_error(client.post("/query", json=bad_filter), 400, "BAD_REQUEST")
    unknown = {"targets": [{"refId": "A", "target": "no_such_target"}]}
    assert_error(client.post("/query", json=unknown), 400, "BAD_REQUEST")
    assert_error(client.post("/tag-values", json={}), 400, "BAD_REQUEST", "key must be a non-empty string")
    assert_error(client.post("/metric-payload-options", json={"metric": "x"}), 400, "BAD_REQUEST",
                 "name must be a non-empty string")


def test_query_answers_every_visible_target_with_its_ref_id(client):
    frames = client.post("/query", json=fixture("query_panel")).get_json()
    assert sorted({f["refId"] for f in frames}) == ["A", "C"]
    for frame in frames:
        assert set(frame) >= {"refId", "name", "fields"}
        assert all(set(f) == {"name", "type", "values", "config", "labels"} for f in frame["fields"])


def test_internal_errors_are_500_with_the_shape_and_no_detail(client, monkeypatch, caplog):
    def explode(*args, **kwargs):
        raise RuntimeError("secret internals sk-boom")
    monkeypatch.setattr("datasource.web.query.tag_keys", explode)
    response = client.post("/tag-keys", json={})
    assert_error(response, 500, "INTERNAL", "internal error; see the server log")
    assert "sk-boom" not in response.get_data(as_text=True)
    assert "unhandled error on POST /tag-keys" in caplog.text


def test_unavailable_is_503(client, monkeypatch):
    from datasource.model import Unavailable

    def busy(*args, **kwargs):
        raise Unavailable("database is busy; retry")
    monkeypatch.setattr("datasource.web.query.tag_keys", busy)
    assert_error(client.post("/tag-keys", json={}), 503, "UNAVAILABLE", "database is busy; retry")


def test_aliases_inline_file_and_errors(tmp_path):
    digest = "faa210d78e64b975e87ea4585883b7f8c8d5b0c95719a5d70ba0c3a348bc5e24"  # sha256("sk-client-demo-0001")
    assert load_aliases("sk-client-demo-0001=ci-bot") == {digest: "ci-bot"}
    upper = "ab" * 32
    assert load_aliases(f" sha256:{upper.upper()} = team-a , {digest}=b") == {upper: "team-a", digest: "b"}
    path = tmp_path / "aliases.txt"
    path.write_text("# caller keys\n\nsk-client-demo-0001 = ci bot\n")
    assert load_aliases(str(path)) == {digest: "ci bot"}
    assert load_aliases("") == {}
    path.write_text("sk-client-demo-0001\n")
    with pytest.raises(AliasError) as info:
        load_aliases(str(path))
    assert str(info.value) == "api_key_aliases aliases.txt:1: expected `key-or-sha256=alias`"
    assert "sk-client" not in str(info.value)


def test_collector_starts_only_when_on_with_upstreams(db_path, monkeypatch):
    started = []

    class Service:
        def __init__(self, settings):
            self.settings = settings

        def start(self):
            started.append(self.settings.cpa_url)

        def stop(self):
            started.append("stopped")

    fake_module = type("M", (), {"CollectorService": Service})
    monkeypatch.setattr(app_module.importlib, "import_module", lambda name: fake_module)
    monkeypatch.setattr(app_module.atexit, "register", lambda fn: None)
    create_app(Settings.from_env({}, db=db_path, collector="off", cpa_url="http://127.0.0.1:1"))
    create_app(Settings.from_env({}, db=db_path, collector="on"))
    app = create_app(Settings.from_env({}, db=db_path, collector="on", cpa_url="http://127.0.0.1:1"))
    assert started == ["http://127.0.0.1:1"]
    assert app.extensions["cpa_monitor"].collector.settings.cpa_url == "http://127.0.0.1:1"


bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["range", "from", "to", "targets", "target", "payload", "refId", "filters",
                         "key", "operator", "value", "annotation", "query", "metric", "name", "hide",
                         "maxDataPoints", "intervalMs", "provider", "status", "by", "measure", "limit"]),
        c, max_size=5),
    max_leaves=15,
)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(POST_ROUTES), bodies)
def test_fuzz_no_5xx(client, path, body):
    response = client.post(path, data=json.dumps(body), content_type="application/json")
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        assert response.get_json()["ok"] is False


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(POST_ROUTES), st.binary(max_size=64))
def test_fuzz_raw_bytes_no_5xx(client, path, raw):
    response = client.post(path, data=raw, content_type="application/json")
    assert response.status_code < 500


# --- real data: Grafana bodies against ingested events, exact numbers ------------------

DAY = 1795824000000  # 2026-11-28T00:00:00Z
ALICE, BOB, CAROL = "9f2c4e1a7b3d5c60", "1b2b3b4b5b6b7b8b", "c0c0c0c0c0c0c0c0"


def cpa_event(minute: int, request_id: str, *, provider: str = "codex", model: str = "gpt-5.4",
              status: int = 200, latency: int = 1000, tokens: tuple[int, int] = (100, 20),
              api_key: str = "sk-client-a-0001", source: str = "alice@example.com",
              auth_index: str = ALICE, body: str = "", headers: dict | None = None) -> dict:
    """One CPA usage event as CPA publishes it, `minute` minutes after DAY."""
    stamp = f"2026-11-28T{minute // 60:02d}:{minute % 60:02d}:00Z"
    return {
        "timestamp": stamp, "latency_ms": latency, "ttft_ms": 0, "source": source, "auth_index": auth_index,
        "client_ip": "192.0.2.10", "x_forwarded_for": "", "user_agent": "test/1.0",
        "tokens": {"input_tokens": tokens[0], "output_tokens": tokens[1], "reasoning_tokens": 0,
                   "cached_tokens": 0, "cache_read_tokens": 0, "cache_read_tokens_present": True,
                   "cache_creation_tokens": 0, "total_tokens": sum(tokens)},
        "failed": status != 200, "generate": True, "fail": {"status_code": status, "body": body},
        "response_headers": headers or {"Content-Type": ["application/json"]}, "accounting_version": 2,
        "provider": provider, "executor_type": "CodexExecutor", "model": model, "alias": model,
        "endpoint": "POST /v1/responses", "auth_type": "oauth", "api_key": api_key, "request_id": request_id,
    }


EVENTS = [
    cpa_event(10, "r1"),
    cpa_event(20, "r2", status=429, latency=3000, tokens=(0, 0)),
    cpa_event(30, "r3", provider="claude", model="claude-sonnet-4-5", latency=2000, tokens=(200, 50),
              api_key="sk-client-b-0002", source="bob@example.com", auth_index=BOB),
    cpa_event(40, "r4", provider="gemini", model="gemini-2.5-pro", status=500, latency=4000, tokens=(10, 0),
              api_key="sk-client-b-0002", source="carol@example.com", auth_index=CAROL),
    cpa_event(300, "r5", latency=500, tokens=(50, 10)),
]


def ingest(db_path: str, events: list[dict]) -> int:
    from datasource import normalize, store
    from datasource.db import open_database

    conn = open_database(db_path)
    try:
        items = [normalize.normalize(json.dumps(e), now_ms=DAY) for e in events]
        return store.insert_batch(conn, items, origin="test", now_ms=DAY).inserted
    finally:
        conn.close()


@pytest.fixture
def data_client(settings, db_path):
    assert ingest(db_path, EVENTS) == 5
    return create_app(settings).test_client()


def grafana_query(targets: list[dict], filters: list | None = None, interval_ms: int = 300000) -> dict:
    """A /query body shaped like Grafana 11.3 sends it, for 00:00-06:00 on DAY."""
    body = fixture("query_panel")
    body.update(range={"from": "2026-11-28T00:00:00.000Z", "to": "2026-11-28T06:00:00.000Z",
                       "raw": {"from": "now-6h", "to": "now"}}, intervalMs=interval_ms, maxDataPoints=1000,
                targets=targets, filters=filters or [])
    return body


def columns(frame: dict) -> dict:
    return {f["name"]: f["values"] for f in frame["fields"]}


def test_summary_with_multi_value_all_and_adhoc(data_client):
    target = {"refId": "A", "target": "summary", "editorMode": "code",
              "payload": {"provider": ["codex", "claude"], "account": "__all__"}}
    (frame,) = data_client.post("/query", json=grafana_query([target])).get_json()
    got = columns(frame)
    # r1, r2, r3, r5 (codex or claude): r2 failed with 429
    assert (frame["refId"], got["requests"], got["successes"], got["failures"]) == ("A", [4], [3], [1])
    assert got["success_rate"] == [0.75]
    assert (got["input_tokens"], got["output_tokens"]) == ([350], [80])
    no_429 = [{"key": "status", "operator": "!=", "value": "429"}]
    (frame,) = data_client.post("/query", json=grafana_query([target], no_429)).get_json()
    assert (columns(frame)["requests"], columns(frame)["failures"]) == ([3], [0])


def test_hidden_target_and_code_mode_breakdown(data_client):
    hidden = {"refId": "H", "target": "summary", "hide": True}
    breakdown = {"refId": "B", "target": "breakdown", "editorMode": "code",
                 "payload": "{\"by\": \"status_code\", \"provider\": [\"codex\",\"gemini\"], \"model\": \"__all__\"}"}
    frames = data_client.post("/query", json=grafana_query([hidden, breakdown])).get_json()
    assert [f["refId"] for f in frames] == ["B"]
    got = columns(frames[0])
    # codex/gemini: r1, r5 -> 200; r2 -> 429; r4 -> 500
    assert dict(zip(got["key"], got["requests"])) == {"200": 2, "429": 1, "500": 1}
    assert got["requests"] == [2, 1, 1]


def test_timeseries_hourly_buckets_are_all_present(data_client):
    target = {"refId": "T", "target": "timeseries", "payload": {"measure": "requests"}}
    (frame,) = data_client.post("/query", json=grafana_query([target], interval_ms=3600000)).get_json()
    got = columns(frame)
    assert got["time"] == [DAY + h * 3600000 for h in range(6)]
    assert got["requests"] == [4, 0, 0, 0, 0, 1]


def test_requests_newest_first_with_masked_keys(data_client):
    target = {"refId": "R", "target": "requests", "payload": {"limit": 3}}
    (frame,) = data_client.post("/query", json=grafana_query([target])).get_json()
    got = columns(frame)
    assert got["request_id"] == ["r5", "r4", "r3"]
    assert got["api_key"] == ["sk******01", "sk******02", "sk******02"]


def test_variable_tag_keys_and_tag_values(data_client):
    body = fixture("variable")
    body["payload"] = {"target": "provider", "model": "__all__"}
    body["range"] = {"from": "2026-11-28T00:00:00.000Z", "to": "2026-11-28T06:00:00.000Z"}
    values = data_client.post("/variable", json=body).get_json()
    assert sorted(v["__value"] for v in values) == ["claude", "codex", "gemini"]
    keys = [k["text"] for k in data_client.post("/tag-keys", json=fixture("tag_keys")).get_json()]
    assert keys[:3] == ["instance", "provider", "model"]
    tag_body = fixture("tag_values")
    tag_body["filters"] = [{"key": "provider", "operator": "!=", "value": "codex"}]
    assert data_client.post("/tag-values", json=tag_body).get_json() == [
        {"text": "claude-sonnet-4-5"}, {"text": "gemini-2.5-pro"}]


# --- leak test: planted secrets never come back from any route ------------------------

PLANTED = {
    "caller key": "sk-callerLEAKkey0001xyz",
    "upstream key source": "sk-upstreamLEAKsource0002abcdefgh",
    "bearer in body": "LEAKbearer0003tokenvalue",
    "anthropic key in body": "sk-ant-api03-LEAKanthropic0004key",
    "email in body": "leaked.person.LEAK0005@corp-example.net",
    "cookie in body": "LEAKcookie0006value",
    "api_key field in body": "LEAKapikeyfield0007value",
    "set-cookie header": "LEAKsetcookie0008",
    "authorization header": "LEAKauthheader0009token",
    "client ip": "198.51.100.77",
    "forwarded ip": "203.0.113.99",
}
OWNER_EMAIL = "owner.LEAK0010@mail-example.org"
VARIABLES = ("instance", "provider", "model", "project", "account", "api_key", "status", "failure_type",
             "request_type", "endpoint", "cache")  # docs/api.md "Variables"


def planted_events() -> list[dict]:
    body = json.dumps({"error": {
        "message": f"token rejected: Authorization: Bearer {PLANTED['bearer in body']} and key "
                   f"{PLANTED['anthropic key in body']} for {PLANTED['email in body']}",
        "cookie": f"session={PLANTED['cookie in body']}", "api_key": PLANTED["api_key field in body"],
        "code": "token_invalidated"}, "status": 401})
    headers = {"Set-Cookie": [f"sid={PLANTED['set-cookie header']}; HttpOnly"],
               "Authorization": [f"Bearer {PLANTED['authorization header']}"], "X-Request-Id": ["req_leak"]}
    leaky = [
        cpa_event(50, "leak1", api_key=PLANTED["caller key"], source=PLANTED["upstream key source"],
                  auth_index="5ec7e75ec7e75ec7", headers=headers),
        cpa_event(55, "leak2", status=401, api_key=PLANTED["caller key"], source=OWNER_EMAIL,
                  auth_index="6ec7e75ec7e75ec7", body=body, headers=headers),
        cpa_event(58, "leak3", status=429, api_key=PLANTED["caller key"], source=OWNER_EMAIL,
                  auth_index="6ec7e75ec7e75ec7", body=body),
    ]
    for event in leaky:
        event.update(client_ip=PLANTED["client ip"], x_forwarded_for=f"{PLANTED['forwarded ip']}, 10.0.0.1")
    return EVENTS + leaky


def every_request(client) -> list[tuple[str, str, dict | None]]:
    """(method, path, body) for every route, every target with every select option, every lookup."""
    calls: list[tuple[str, str, dict | None]] = [("get", p, None) for p in ("/", "/healthz", "/status")]
    calls += [("post", "/metrics", {}), ("post", "/search", {"target": ""}), ("post", "/tag-keys", {})]
    window = {"from": "2026-11-28T00:00:00.000Z", "to": "2026-11-28T06:00:00.000Z"}
    targets = []
    for metric in client.post("/metrics", json={}).get_json():
        targets.append({"refId": metric["value"], "target": metric["value"], "payload": {}})
        for option in metric.get("payloads", []):
            for choice in option.get("options", []):
                payload = {option["name"]: choice["value"]}
                targets.append({"refId": "X", "target": metric["value"], "payload": payload})
                calls.append(("post", "/metric-payload-options",
                              {"metric": metric["value"], "name": option["name"], "payload": {}}))
    calls += [("post", "/query", {"range": window, "intervalMs": 600000, "targets": [t]}) for t in targets]
    for key in [k["text"] for k in client.post("/tag-keys", json={}).get_json()]:
        calls.append(("post", "/tag-values", {"key": key, "timeRange": window}))
    for name in VARIABLES:
        calls.append(("post", "/variable", {"payload": {"target": name}, "range": window}))
    calls.append(("post", "/annotations", {"range": window, "annotation": {"name": "a", "query": ""}}))
    return calls


MANAGEMENT_KEY = "MGMT-LEAKkey0011-planted"
API_TOKEN = "api-LEAKtoken0012-planted"
PRESENTED = {"guessed bearer token": "LEAKguess0013token", "bare token": "LEAKbare0014token",
             "basic password": "LEAKbasic0015pw"}


@pytest.fixture
def upstreams():
    """A CPA queue that takes the planted management key, one that refuses it, one that is down,
    and the down one again named by URLs that carry the key (userinfo, query string)."""
    from redis_server import RedisServer, free_port

    good, other = RedisServer(MANAGEMENT_KEY).start(), RedisServer("another-key-0016").start()
    closed = free_port()
    urls = (f"ok=http://127.0.0.1:{good.port},wrong=http://127.0.0.1:{other.port},down=http://127.0.0.1:{closed},"
            f"userinfo=http://admin:{MANAGEMENT_KEY}@127.0.0.1:{closed},"
            f"query=http://127.0.0.1:{closed}/?key={MANAGEMENT_KEY}")
    yield good, urls
    good.stop()
    other.stop()


def _wait(predicate, timeout: float = 20.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _count(db_path: str, sql: str) -> int:
    """A count, or -1 while SQLite answers busy (the collector's loops open and migrate the file at
    start; a BusyError can come back without the busy handler, e.g. during WAL recovery)."""
    import apsw

    from datasource.db import connect

    conn = connect(db_path, readonly=True)
    try:
        return conn.execute(sql).fetchall()[0][0]
    except apsw.BusyError:
        return -1
    finally:
        conn.close()


@pytest.mark.parametrize("mask_emails", [False, True])
def test_no_planted_secret_leaves_any_route_or_log_line(db_path, mask_emails, upstreams, caplog):
    """Planted events go through the real collector (a real redis-server queue, the `errors` channel),
    the management key sits in the settings and in two upstream URLs, clients present wrong tokens;
    then every route, target, option and lookup, /status, export and every log line at DEBUG are
    searched for every secret."""
    import base64
    import logging

    from click.testing import CliRunner
    from datasource.cli import cli
    from datasource.traffic_failures import credential_error

    caplog.set_level(logging.DEBUG)
    good, urls = upstreams
    assert ingest(db_path, EVENTS) == 5
    settings = Settings.from_env({}, db=db_path, collector="on", cpa_url=urls, cpa_management_key=MANAGEMENT_KEY,
                                 mask_emails=mask_emails, api_token=API_TOKEN, log_level="DEBUG")
    app = create_app(settings)
    try:
        leaky = planted_events()[len(EVENTS):]
        for event in leaky:  # published to the live subscriber, or queued and drained: CPA's rule
            good.enqueue(json.dumps(event))
        _wait(lambda: _count(db_path, "SELECT count(*) FROM events") == 8)
        broker = good.client()
        _wait(lambda: broker.pubsub_numsub("errors")[0][1] > 0)
        error_event = credential_error(leaky[1], f"codex-{PLANTED['caller key']}.json")
        assert broker.publish("errors", json.dumps(error_event)) == 1
        _wait(lambda: _count(db_path, "SELECT count(*) FROM credential_errors") == 1)
        _wait(lambda: _count(db_path, "SELECT count(*) FROM collector_status WHERE state = 'error'") == 4)
        client = app.test_client()
        for header in (f"Bearer {PRESENTED['guessed bearer token']}", PRESENTED["bare token"],
                       "Basic " + base64.b64encode(f"grafana:{PRESENTED['basic password']}".encode()).decode()):
            assert client.post("/query", json={}, headers={"Authorization": header}).status_code == 403
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {API_TOKEN}"
        calls = every_request(client)
        assert len(calls) > 60
        answered, seen = 0, ""
        for method, path, body in calls:
            response = getattr(client, method)(path, json=body) if body is not None else client.get(path)
            text = response.get_data(as_text=True)
            assert response.status_code < 500, (path, body, text)
            answered += response.status_code == 200
            seen += text
            for what, secret in {**PLANTED, "management key": MANAGEMENT_KEY, "api token": API_TOKEN}.items():
                assert secret not in text, (what, path, body)
            if mask_emails:
                assert OWNER_EMAIL not in text, (path, body)
        assert answered == len(calls)
    finally:
        app.extensions["cpa_monitor"].collector.stop()
    # the planted rows did reach the answers (masked caller key, request ids) and /status reports the errors
    assert "sk******yz" in seen and "leak2" in seen
    status = {row["instance"]: row for row in client.get("/status").get_json()["collectors"]}
    assert (status["ok"]["state"], status["wrong"]["last_error_stage"]) == ("stopped", "auth")
    assert status["userinfo"]["url"] == status["down"]["url"] and status["query"]["last_error_stage"] == "connect"
    exported = CliRunner().invoke(cli, ["export", "--db", db_path], catch_exceptions=False).stdout
    assert len(exported.splitlines()) == 8
    logs = caplog.text
    assert "auth failed: wrong credentials (scheme other) for POST /query" in logs  # the log was captured
    assert "wrong key or IP banned" in logs
    for what, secret in {**PLANTED, **PRESENTED, "management key": MANAGEMENT_KEY, "api token": API_TOKEN}.items():
        assert secret not in exported, what
        assert secret not in logs, what


def test_simplejson_annotations_and_collector_status(settings, conn):
    conn.execute("INSERT INTO collector_episodes(instance, kind, start_ms, end_ms, detail) VALUES (?, ?, ?, ?, ?)",
                 ("eu", "gap", DAY + 600000, DAY + 1200000, "no events for 10 min"))
    conn.execute("INSERT INTO collector_status(instance, url, state, last_error, inserted) VALUES (?, ?, ?, ?, ?)",
                 ("eu", "http://127.0.0.1:8317", "running", "auth failed for key", 7))
    client = create_app(settings).test_client()
    body = fixture("simplejson_annotations")
    assert client.post("/annotations", json=body).get_json() == [{
        "annotation": body["annotation"], "time": DAY + 600000, "timeEnd": DAY + 1200000,
        "title": "Collector gap: eu", "text": "no events for 10 min", "tags": ["collector", "gap"],
    }]
    health = client.get("/healthz").get_json()
    assert health["collectors"] == [{"instance": "eu", "state": "running", "transport": None, "mode": None,
                                     "last_consumed": None, "last_inserted": None, "lag_s": None}]
    status = client.get("/status").get_json()["collectors"]
    assert (status[0]["url"], status[0]["last_error"], status[0]["inserted"]) == (
        "http://127.0.0.1:8317", "auth failed for key", 7)
