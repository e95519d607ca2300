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
