"""Access control: bearer token or basic auth, constant-time compare, 403 with the error shape."""

from __future__ import annotations

import base64
import logging

import pytest

from datasource.config import Settings

from datasource.app import create_app

TOKEN = "tok-Secret-123"


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@pytest.fixture
def client(db_path):
    settings = Settings.from_env({}, db=db_path, collector="off", api_token=TOKEN,
                                 basic_auth_user="grafana", basic_auth_password="pw-Secret-456")
    return create_app(settings).test_client()


def test_health_routes_need_no_credentials(client):
    assert client.get("/").status_code == 200
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/search", "/tag-keys"])
def test_bearer_and_basic_are_accepted(client, path):
    assert client.post(path, json={}, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.post(path, json={}, headers=basic("grafana", "pw-Secret-456")).status_code == 200
    assert client.get("/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_missing_credentials_get_403_auth_required(client):
    response = client.post("/metrics", json={})
    assert response.status_code == 403
    assert response.get_json() == {
        "ok": False, "status": 403,
        "message": "authentication required: send Authorization: Bearer <token> or basic auth",
        "error": {"code": "AUTH_REQUIRED",
                  "message": "authentication required: send Authorization: Bearer <token> or basic auth"},
    }


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer tok-Secret-12"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"bearer{TOKEN}"},
        {"Authorization": f"Token {TOKEN}"},
        basic("grafana", "wrong"),
        basic("admin", "pw-Secret-456"),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
    ],
)
def test_wrong_credentials_get_403_auth_failed(client, headers):
    for method, path in (("post", "/query"), ("get", "/status"), ("post", "/nope")):
        response = getattr(client, method)(path, json={}, headers=headers)
        assert response.status_code == 403
        assert response.get_json()["error"] == {"code": "AUTH_FAILED", "message": "credentials rejected"}


def test_failed_attempts_are_logged_without_the_secret(client, caplog):
    caplog.set_level(logging.WARNING, logger="datasource.web")
    client.post("/query", json={}, headers={"Authorization": "Bearer guessed-Secret-789"})
    client.post("/query", json={}, headers=basic("grafana", "guessed-pw-000"))
    messages = [r.getMessage() for r in caplog.records if r.name == "datasource.web"]
    assert messages == [
        "auth failed: wrong credentials (scheme Bearer) for POST /query from 127.0.0.1",
        "auth failed: wrong credentials (scheme Basic) for POST /query from 127.0.0.1",
    ]
    assert "guessed" not in caplog.text


def test_basic_auth_alone_and_no_auth(db_path):
    only_basic = Settings.from_env({}, db=db_path, collector="off", basic_auth_user="u", basic_auth_password="p")
    client = create_app(only_basic).test_client()
    assert client.post("/metrics", json={}, headers=basic("u", "p")).status_code == 200
    # a bearer token is not accepted when none is configured
    assert client.post("/metrics", json={}, headers={"Authorization": "Bearer "}).status_code == 403
    open_app = create_app(Settings.from_env({}, db=db_path, collector="off")).test_client()
    assert open_app.post("/metrics", json={}).status_code == 200


def test_cors_only_when_configured(db_path):
    off = create_app(Settings.from_env({}, db=db_path, collector="off")).test_client()
    response = off.post("/metrics", json={}, headers={"Origin": "http://grafana.local"})
    assert "Access-Control-Allow-Origin" not in response.headers
    on = create_app(Settings.from_env({}, db=db_path, collector="off", api_token=TOKEN,
                                      cors_origins="http://grafana.local, http://other")).test_client()
    preflight = on.options("/query", headers={"Origin": "http://grafana.local",
                                              "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://grafana.local"
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert preflight.headers["Access-Control-Allow-Headers"] == "accept, authorization, content-type"
    ok = on.post("/metrics", json={}, headers={"Origin": "http://other", "Authorization": f"Bearer {TOKEN}"})
    assert (ok.status_code, ok.headers["Access-Control-Allow-Origin"]) == (200, "http://other")
    stranger = on.post("/metrics", json={}, headers={"Origin": "http://evil", "Authorization": f"Bearer {TOKEN}"})
    assert "Access-Control-Allow-Origin" not in stranger.headers


# --- every route in the url_map: a route added later cannot slip through -------------------

PUBLIC = {"/", "/healthz"}


def routes(app) -> list[tuple[str, str]]:
    """(method, path) for every rule and method Flask serves, HEAD and OPTIONS included."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        assert not rule.arguments, f"{rule.rule}: give the table a sample value for its arguments"
        out += [(method, rule.rule) for method in sorted(rule.methods)]
    return out


def test_every_route_but_the_health_checks_needs_credentials(db_path):
    app = create_app(Settings.from_env({}, db=db_path, collector="off", api_token=TOKEN,
                                       basic_auth_user="grafana", basic_auth_password="pw-Secret-456"))
    client = app.test_client()
    table = routes(app)
    assert {p for _, p in table} >= {"/", "/healthz", "/status", "/query", "/metrics", "/variable"}
    assert len(table) >= 20
    for method, path in table:
        def call(headers):
            return client.open(path, method=method, data=b"{}", content_type="application/json", headers=headers)
        anonymous, wrong = call({}), call({"Authorization": "Bearer wrong-token"})
        bearer, basic_ok = call({"Authorization": f"Bearer {TOKEN}"}), call(basic("grafana", "pw-Secret-456"))
        if path in PUBLIC:
            assert (anonymous.status_code, wrong.status_code) == (200, 200), (method, path)
            continue
        assert anonymous.status_code == 403, (method, path, anonymous.status_code)
        assert wrong.status_code == 403, (method, path)
        if method != "HEAD":
            assert anonymous.get_json()["error"]["code"] == "AUTH_REQUIRED", (method, path)
            assert wrong.get_json()["error"]["code"] == "AUTH_FAILED", (method, path)
        # with credentials the route itself answers (a 400 for a body it needs, never a 403)
        assert bearer.status_code != 403 and bearer.status_code < 500, (method, path, bearer.status_code)
        assert basic_ok.status_code == bearer.status_code, (method, path)


def test_unknown_routes_need_credentials_before_they_are_told_apart(client):
    assert client.get("/admin").status_code == 403
    assert client.post("/query/../status", json={}).status_code == 403
    found = client.get("/admin", headers={"Authorization": f"Bearer {TOKEN}"})
    assert found.status_code == 404


def test_credentials_are_compared_with_hmac_compare_digest(client, monkeypatch):
    import hmac

    seen, original = [], hmac.compare_digest

    def recording(a, b):
        seen.append((a, b))
        return original(a, b)

    monkeypatch.setattr("datasource.web.hmac.compare_digest", recording)
    assert client.post("/metrics", json={}, headers={"Authorization": "Bearer guess"}).status_code == 403
    assert seen == [(b"guess", TOKEN.encode())]
    seen.clear()
    assert client.post("/metrics", json={}, headers=basic("grafana", "pw-Secret-456")).status_code == 200
    # user and password are both compared, even though the user alone could decide a failure
    assert seen == [(b"grafana", b"grafana"), (b"pw-Secret-456", b"pw-Secret-456")]
    seen.clear()
    assert client.post("/metrics", json={}, headers=basic("nobody", "pw-Secret-456")).status_code == 403
    assert len(seen) == 2


@pytest.mark.parametrize(("header", "scheme"), [
    ("tok-Secret-123", "other"),                     # a bare token: no space, no scheme
    ("tok-Secret-123x extra", "other"),
    ("Bearer tok-Secret-12", "Bearer"),
    ("bEaReR   tok-Secret-1234", "Bearer"),
    ("Basic dG9rLVNlY3JldC0xMjM6eA==", "Basic"),
    ("Digest username=tok-Secret-123", "other"),
])
def test_failed_attempt_log_never_holds_the_presented_text(client, caplog, header, scheme):
    caplog.set_level(logging.DEBUG)
    assert client.post("/query", json={}, headers={"Authorization": header}).status_code == 403
    messages = [r.getMessage() for r in caplog.records if r.name == "datasource.web"]
    assert messages == [f"auth failed: wrong credentials (scheme {scheme}) for POST /query from 127.0.0.1"]
    assert "tok-Secret" not in caplog.text and "dG9r" not in caplog.text


def test_missing_credentials_are_logged_too(client, caplog):
    caplog.set_level(logging.WARNING, logger="datasource.web")
    client.get("/status")
    assert [r.getMessage() for r in caplog.records if r.name == "datasource.web"] == [
        "auth failed: no credentials (scheme -) for GET /status from 127.0.0.1"]


def test_cors_headers_never_appear_without_configuration(db_path):
    app = create_app(Settings.from_env({}, db=db_path, collector="off", api_token=TOKEN))
    client = app.test_client()
    for method, path in routes(app):
        for headers in ({"Origin": "http://grafana.local"}, {"Origin": "http://grafana.local",
                                                               "Authorization": f"Bearer {TOKEN}",
                                                               "Access-Control-Request-Method": "POST"}):
            response = client.open(path, method=method, json={}, headers=headers)
            assert not [h for h in response.headers.keys() if h.lower().startswith("access-control-")], (method, path)
    # a preflight without configured CORS is no bypass: it needs credentials like any request
    assert client.options("/query", headers={"Origin": "http://grafana.local"}).status_code == 403


def test_cors_answers_listed_origins_only_even_on_errors(db_path):
    client = create_app(Settings.from_env({}, db=db_path, collector="off", api_token=TOKEN,
                                          cors_origins="http://grafana.local")).test_client()
    denied = client.post("/query", json={}, headers={"Origin": "http://grafana.local"})
    assert (denied.status_code, denied.headers["Access-Control-Allow-Origin"]) == (403, "http://grafana.local")
    assert denied.headers["Vary"] == "Origin"
    for origin in ("http://evil", "http://grafana.local.evil", "null", "http://GRAFANA.local"):
        preflight = client.options("/query", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403 and "Access-Control-Allow-Origin" not in preflight.headers, origin
