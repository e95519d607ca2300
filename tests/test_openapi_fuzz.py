"""Requests generated from datasource/openapi.yaml (schemathesis) plus hand-made hostile bodies.

schemathesis builds valid and invalid requests for every operation of the published document and
sends them to the Flask app; its checks hold each answer to the document: never a 5xx, a status
the document lists, JSON whose shape matches the 200 schema or the one Error schema, invalid
bodies refused. `positive_data_acceptance` is left out: the document cannot express the semantic
rules (range.from before range.to, known target and option names, filter keys), which are
answered with the documented 400.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import schemathesis
import schemathesis.pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from datasource.app import create_app
from datasource.config import Settings

DOC = Path(__file__).resolve().parent.parent / "datasource" / "openapi.yaml"
TOKEN = "fuzz-Token-3e1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PUBLIC = {"/", "/healthz"}
POST_ROUTES = ["/metrics", "/search", "/metric-payload-options", "/query", "/variable", "/tag-keys",
               "/tag-values", "/annotations"]
ERROR_KEYS = {"ok", "status", "message", "error"}


def _app(tmp_path_factory, **overrides):
    db = str(tmp_path_factory.mktemp("fuzz") / "monitor.db")
    return create_app(Settings.from_env({}, db=db, collector="off", api_token=TOKEN, **overrides))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return _app(tmp_path_factory)


@pytest.fixture(scope="module")
def api_schema(app):
    loaded = schemathesis.openapi.from_path(str(DOC))
    loaded.app = app  # requests go to the WSGI app in-process
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_follow_the_document(app, case):
    excluded = [positive_data_acceptance]
    blank = isinstance(case.body, (bytes, str)) and not (
        case.body.decode("latin-1") if isinstance(case.body, bytes) else case.body).strip(" \t\n\r")
    if blank:  # JSON whitespace only: the document says an empty body means {}, so it is not refused
        excluded.append(negative_data_rejection)
    response = case.call_and_validate(headers=AUTH, excluded_checks=excluded)
    assert response.status_code < 500
    anonymous = case.call()
    if case.path in PUBLIC:
        assert anonymous.status_code == response.status_code
    else:  # without credentials every generated request is refused before it is read
        assert anonymous.status_code == 403
        assert anonymous.json()["error"]["code"] == "AUTH_REQUIRED"


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == ERROR_KEYS and body["ok"] is False and body["status"] == status
    assert body["error"]["message"] == body["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.mark.parametrize("path", POST_ROUTES)
def test_every_route_refuses_bodies_over_the_limit(tmp_path_factory, path):
    small = _app(tmp_path_factory, max_body_bytes=1000).test_client()
    body = json.dumps({"targets": [], "pad": "x" * 1000}).encode()
    assert_error(small.post(path, data=body, content_type="application/json", headers=AUTH), 413,
                 "REQUEST_ENTITY_TOO_LARGE")
    # the limit is checked before credentials are: an anonymous giant body is refused just as early
    assert small.post(path, data=body, content_type="application/json").status_code in (403, 413)


@pytest.mark.parametrize("path", POST_ROUTES)
def test_every_route_refuses_deep_invalid_and_non_utf8_json(client, path):
    assert_error(client.post(path, data="[" * 65 + "]" * 65, headers=AUTH), 400, "TOO_DEEP")
    assert_error(client.post(path, data='{"a":' * 65 + "1" + "}" * 65, headers=AUTH), 400, "TOO_DEEP")
    assert_error(client.post(path, data="[" * 200000, headers=AUTH), 400, "TOO_DEEP")
    assert_error(client.post(path, data=b'{"key": "\xff\xfe"}', headers=AUTH), 400, "INVALID_JSON")
    assert_error(client.post(path, data=b'{"key": "\xed\xa0\x80"}', headers=AUTH), 400, "INVALID_JSON")
    assert_error(client.post(path, data='{"a": NaN}', headers=AUTH), 400, "INVALID_JSON")
    assert_error(client.post(path, data='{"a": Infinity}', headers=AUTH), 400, "INVALID_JSON")
    assert_error(client.post(path, data='{"a": 1' + "0" * 5000 + "}", headers=AUTH), 400, "INVALID_JSON")
    assert_error(client.post(path, data="\x0c", headers=AUTH), 400, "INVALID_JSON")  # not JSON whitespace
    assert_error(client.post(path, data="null", headers=AUTH), 400, "BAD_REQUEST")
    assert_error(client.post(path, data="[]", headers=AUTH), 400, "BAD_REQUEST")
    assert_error(client.post(path, data='"{}"', headers=AUTH), 400, "BAD_REQUEST")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml", None])
def test_content_type_is_not_trusted_the_body_is_read_as_json(client, content_type):
    """curl -d sends form-encoded JSON: the body is parsed as JSON whatever the header says, and a
    form, XML or multipart body is a 400 JSON error, never a 5xx or a form parse."""
    headers = dict(AUTH, **({"Content-Type": content_type} if content_type else {}))
    ok = client.post("/query", data='{"targets": []}', headers=headers)
    assert (ok.status_code, ok.get_json()) == (200, [])
    for body in ("a=1&b=2", "<query/>", "--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n"):
        assert_error(client.post("/query", data=body, headers=headers), 400, "INVALID_JSON")


@pytest.mark.parametrize("path", POST_ROUTES)
def test_a_blank_body_is_read_as_an_empty_object(client, path):
    """The generated-request test stops expecting a refusal for JSON-whitespace bodies: this holds them
    to the documented rule instead (the same answer as `{}`)."""
    empty = client.post(path, json={}, headers=AUTH)
    for blank in (b"", b" ", b"\n", b" \t\r\n"):
        answer = client.post(path, data=blank, content_type="application/json", headers=AUTH)
        assert (answer.status_code, answer.get_json()) == (empty.status_code, empty.get_json()), (path, blank)


@pytest.mark.parametrize(("path", "body"), [
    ("/query", {"targets": [None]}), ("/query", {"targets": [[{"target": "summary"}]]}),
    ("/query", {"range": []}), ("/query", {"targets": [{"target": "summary", "payload": [1, 2]}]}),
    ("/query", {"filters": {"key": "model"}}), ("/query", {"filters": [["model", "=", "x"]]}),
    ("/variable", {"payload": []}), ("/variable", {"payload": {"target": "model"}, "range": [0, 1]}),
    ("/tag-values", {"key": "model", "timeRange": []}), ("/tag-values", {"key": ["model"]}),
    ("/annotations", {"annotation": []}), ("/annotations", {"annotation": {"query": "{\"kind\": [}"}}),
    ("/metric-payload-options", {"metric": "timeseries", "name": "split_by", "payload": [1]}),
    ("/metric-payload-options", {"metric": ["timeseries"], "name": "split_by"}),
])
def test_arrays_where_objects_belong_are_400(client, path, body):
    assert_error(client.post(path, json=body, headers=AUTH), 400)


numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40), st.integers(min_value=2**63 - 3, max_value=2**63 + 3),
    st.floats(allow_nan=False), st.sampled_from([1e308, -1e308, 5e-324, 2**53, 2**53 + 1, 253402300800000]),
)
numeric = numbers | numbers.map(str) | st.just("1" + "0" * 400)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(from_=numeric, to=numeric, interval=numeric, points=numeric, limit=numeric, latency=numeric,
       target=st.sampled_from(["summary", "timeseries", "requests", "breakdown", "accounts", "usage",
                               "annotations", "api_keys", "account_actions", "collector"]))
def test_huge_and_odd_numbers_anywhere_are_never_a_5xx(client, from_, to, interval, points, limit, latency, target):
    body = {"range": {"from": from_, "to": to}, "intervalMs": interval, "maxDataPoints": points,
            "targets": [{"refId": "A", "target": target, "payload": {"limit": limit, "min_latency_ms": latency}}],
            "filters": [{"key": "min_latency_ms", "operator": ">", "value": latency}]}
    response = client.post("/query", data=json.dumps(body), content_type="application/json", headers=AUTH)
    assert response.status_code in (200, 400), response.get_data(as_text=True)[:300]
    if response.status_code == 400:
        assert_error(response, 400)
    lookup = {"payload": {"target": "model"}, "range": {"from": from_, "to": to}}
    assert client.post("/variable", json=lookup, headers=AUTH).status_code in (200, 400)
    tags = {"key": "model", "timeRange": {"from": from_, "to": to}}
    assert client.post("/tag-values", json=tags, headers=AUTH).status_code in (200, 400)


# --- the same limits through gunicorn (real sockets, Content-Length and chunked bodies) -----------


def raw_http(port: int, payload: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


@pytest.mark.slow
def test_limits_hold_over_real_http_under_gunicorn(tmp_path):
    import subprocess

    from test_gunicorn_e2e import command, free_port, ROOT

    port = free_port()
    args = command() + ["serve", "--db", str(tmp_path / "m.db"), "--bind", f"127.0.0.1:{port}", "--api-token",
                        TOKEN, "--collector", "off", "--max-body-bytes", "4096", "--threads", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        head = (f"POST /query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\nConnection: close\r\n").encode()
        big = b'{"pad": "' + b"x" * 10000 + b'"}'
        status, body = raw_http(port, head + f"Content-Length: {len(big)}\r\n\r\n".encode() + big)
        assert (status, body["error"]["code"]) == (413, "REQUEST_ENTITY_TOO_LARGE")
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 1000]), big[i:i + 1000]) for i in range(0, len(big), 1000))
        status, body = raw_http(port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n")
        assert (status, body["error"]["code"]) == (413, "REQUEST_ENTITY_TOO_LARGE")
        deep = b"[" * 70 + b"]" * 70
        status, body = raw_http(port, head + f"Content-Length: {len(deep)}\r\n\r\n".encode() + deep)
        assert (status, body["error"]["code"]) == (400, "TOO_DEEP")
        for small in (b'{"targets": []}', b'{"targets": []}'.ljust(4096)):  # up to the limit exactly
            chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
            assert raw_http(port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk) == (200, [])
        over = b'{"targets": []}'.ljust(4097)  # werkzeug alone would cut this to a valid prefix
        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(over), over)
        status, body = raw_http(port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk)
        assert (status, body["error"]["code"]) == (413, "REQUEST_ENTITY_TOO_LARGE")
    finally:
        proc.terminate()
        proc.wait(20)
