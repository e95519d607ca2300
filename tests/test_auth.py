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
