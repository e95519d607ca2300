"""datasource/openapi.yaml stays true: same routes as Flask, examples and live answers validate."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from datasource.app import create_app

DOC = yaml.safe_load((Path(__file__).resolve().parent.parent / "datasource" / "openapi.yaml").read_text())
FIXTURES = Path(__file__).parent / "fixtures"
METHODS = {"get", "post", "put", "delete", "patch"}


def validate(instance, schema) -> None:
    """Validate against a schema whose $refs point into the document's components."""
    root = {**schema, "components": DOC["components"]}
    jsonschema.Draft202012Validator(root).validate(instance)


def node_ref(ref: str) -> list[str]:
    return ref.removeprefix("#/").split("/")


def deref(node: dict) -> dict:
    """Follow `$ref`s (requestBodies, responses) to the node they name."""
    while "$ref" in node:
        target = DOC
        for part in node_ref(node["$ref"]):
            target = target[part]
        node = target
    return node


def operations():
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def test_every_flask_route_is_documented_and_vice_versa(settings):
    app = create_app(settings)
    flask_routes = {(rule.rule, method.lower()) for rule in app.url_map.iter_rules()
                    if rule.endpoint != "static" for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, method, _ in operations()}
    assert flask_routes == documented


def test_every_ref_resolves_and_every_operation_documents_errors():
    text = json.dumps(DOC)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        node = DOC
        for part in node_ref(ref):
            node = node[part]
        assert isinstance(node, dict), ref
    for path, method, op in operations():
        assert "200" in op["responses"] and "default" in op["responses"], (path, method)


def examples():
    for path, method, op in operations():
        body = deref(op.get("requestBody", {}))
        for media in body.get("content", {}).values():
            yield f"{method} {path} request", media["example"], media["schema"]
        for status, response in op["responses"].items():
            for media in deref(response).get("content", {}).values():
                yield f"{method} {path} {status}", media["example"], media["schema"]


@pytest.mark.parametrize(("where", "example", "schema"), list(examples()), ids=lambda v: v if isinstance(v, str) else "")
def test_examples_validate(where, example, schema):
    validate(example, schema)


def test_bad_example_is_rejected():
    with pytest.raises(jsonschema.ValidationError):
        validate({"ok": False, "status": 400, "message": "x"}, DOC["components"]["schemas"]["Error"])


LIVE = [
    ("/metrics", "metrics_builder"), ("/metric-payload-options", "metric_payload_options"),
    ("/query", "query_panel"), ("/query", "query_legacy"), ("/query", "query_codemode_string"),
    ("/query", "query_annotation"), ("/variable", "variable"), ("/tag-keys", "tag_keys"),
    ("/tag-values", "tag_values"), ("/annotations", "simplejson_annotations"), ("/search", "search"),
]


@pytest.mark.parametrize(("path", "name"), LIVE)
def test_live_answers_to_grafana_bodies_match_the_document(settings, path, name):
    client = create_app(settings).test_client()
    body = json.loads((FIXTURES / f"grafana_{name}.json").read_text())
    op = DOC["paths"][path]["post"]
    validate(body, deref(op["requestBody"])["content"]["application/json"]["schema"])
    response = client.post(path, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    validate(response.get_json(), op["responses"]["200"]["content"]["application/json"]["schema"])


def test_live_errors_and_gets_match_the_document(settings):
    client = create_app(settings).test_client()
    error = deref(DOC["paths"]["/query"]["post"]["responses"]["default"])["content"]["application/json"]["schema"]
    for response in (client.post("/query", json={"range": {"from": 5, "to": 1}}), client.get("/nope"),
                     client.get("/query"), client.post("/variable", data="[" * 100)):
        validate(response.get_json(), error)
    for path in ("/", "/healthz", "/status"):
        schema = DOC["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        validate(client.get(path).get_json(), schema)
