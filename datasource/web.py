"""Flask Blueprint: the Grafana JSON datasource routes, auth, CORS and the one error shape.

Each handler parses (protocol), queries (query) and serializes (protocol). Shared state
(settings, per-thread readers, key aliases) lives in `app.extensions["cpa_monitor"]`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from datasource import __version__, protocol, query
from datasource.config import Settings
from datasource.db import Readers
from datasource.model import BadRequest, TargetSpec, Unavailable

logger = logging.getLogger(__name__)
bp = Blueprint("datasource", __name__)
PUBLIC_PATHS = frozenset({"/", "/healthz"})
CORS_HEADERS = "accept, authorization, content-type"


@dataclass
class AppState:
    settings: Settings
    readers: Readers
    aliases: dict[str, str] = field(default_factory=dict)
    collector: Any = None


def state() -> AppState:
    return current_app.extensions["cpa_monitor"]


def _json(value: Any, status: int = 200) -> Response:
    body = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body, status=status, mimetype="application/json")


def _body() -> Any:
    """The request body as JSON; over max_body_bytes is a 413, chunked bodies included (werkzeug
    cuts a chunked body at MAX_CONTENT_LENGTH without an error, which would parse a prefix)."""
    limit = state().settings.max_body_bytes
    if request.content_length is None and request.environ.get("wsgi.input_terminated"):
        raw = request.environ["wsgi.input"].read(limit + 1)
        if len(raw) > limit:
            raise RequestEntityTooLarge()
        return protocol.decode_json(raw)
    return protocol.decode_json(request.get_data(cache=False))


def _conn() -> Any:
    return state().readers.get()


def _run(spec: TargetSpec) -> list:
    st = state()
    return query.execute(_conn(), spec, aliases=st.aliases, mask_emails=st.settings.mask_emails,
                         timeout_s=st.settings.query_timeout_s)


def _collector_rows() -> list[dict[str, Any]]:
    spec = protocol.parse_query({"targets": [{"refId": "S", "target": "collector"}]})[0].spec
    return protocol.frame_rows(_run(spec))


# --- routes --------------------------------------------------------------------


@bp.get("/")
def root() -> Response:
    return _json({"ok": True, "service": "cpa-monitor", "version": __version__})


@bp.get("/healthz")
def healthz() -> Response:
    return _json(protocol.health_response(__version__, _collector_rows()))


@bp.get("/status")
def status() -> Response:
    return _json(protocol.status_response(_collector_rows()))


@bp.post("/metrics")
def metrics() -> Response:
    protocol.parse_object(_body())
    return _json(protocol.metrics_response(query.metrics()))


@bp.post("/search")
def search() -> Response:
    protocol.parse_object(_body())
    return _json(protocol.search_response(query.metrics()))


@bp.post("/metric-payload-options")
def metric_payload_options() -> Response:
    req = protocol.parse_payload_options(_body())
    return _json(protocol.options_response(query.payload_options(req.metric, req.name, req.payload)))


@bp.post("/query")
def query_route() -> Response:
    out: list[dict[str, Any]] = []
    for target in protocol.parse_query(_body()):
        out.extend(protocol.frames_response(target.ref_id, _run(target.spec)))
    return _json(out)


@bp.post("/variable")
def variable() -> Response:
    req, st = protocol.parse_variable(_body()), state()
    pairs = query.variable_values(_conn(), req.name, req.from_ms, req.to_ms, req.clauses, aliases=st.aliases,
                                  mask_emails=st.settings.mask_emails, timeout_s=st.settings.query_timeout_s)
    return _json(protocol.variable_response(pairs))


@bp.post("/tag-keys")
def tag_keys() -> Response:
    protocol.parse_object(_body())
    return _json(protocol.tag_keys_response(query.tag_keys()))


@bp.post("/tag-values")
def tag_values() -> Response:
    req, st = protocol.parse_tag_values(_body()), state()
    values = query.tag_values(_conn(), req.name, req.from_ms, req.to_ms, req.clauses,
                              mask_emails=st.settings.mask_emails, timeout_s=st.settings.query_timeout_s)
    return _json(protocol.tag_values_response(values))


@bp.post("/annotations")
def annotations() -> Response:
    req = protocol.parse_annotations(_body())
    return _json(protocol.annotations_response(req.annotation, _run(req.spec)))


# --- auth and CORS -------------------------------------------------------------


def _credentials_ok(header: str, settings: Settings) -> bool:
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and settings.api_token:
        return hmac.compare_digest(value.encode(), settings.api_token.encode())
    if scheme.lower() == "basic" and settings.basic_auth_user and settings.basic_auth_password:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user_ok = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
        password_ok = hmac.compare_digest(password.encode(), settings.basic_auth_password.encode())
        return user_ok and password_ok
    return False


def _scheme_for_log(header: str) -> str:
    """The scheme of an Authorization header, for the log: only a known name, since a header
    without a space (a bare token) or a made-up scheme is text the client chose."""
    scheme = header.partition(" ")[0].lower()
    if not header:
        return "-"
    return {"bearer": "Bearer", "basic": "Basic"}.get(scheme, "other")


def auth_required(settings: Settings) -> bool:
    return bool(settings.api_token or (settings.basic_auth_user and settings.basic_auth_password))


@bp.before_app_request
def _guard() -> Response | None:
    settings = state().settings
    if request.method == "OPTIONS" and _allowed_origin(settings):
        return _preflight()
    if request.path in PUBLIC_PATHS or not auth_required(settings):
        return None
    header = request.headers.get("Authorization", "")
    if header and _credentials_ok(header, settings):
        return None
    reason = "no credentials" if not header else "wrong credentials"
    scheme = _scheme_for_log(header)
    logger.warning("auth failed: %s (scheme %s) for %s %s from %s",
                   reason, scheme, request.method, request.path, request.remote_addr)
    code = "AUTH_REQUIRED" if not header else "AUTH_FAILED"
    message = ("authentication required: send Authorization: Bearer <token> or basic auth"
               if not header else "credentials rejected")
    return _json(protocol.error_body(403, code, message), 403)


def _allowed_origin(settings: Settings) -> str | None:
    origin = request.headers.get("Origin")
    allowed = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if not origin or not allowed:
        return None
    return origin if origin in allowed or "*" in allowed else None


def _preflight() -> Response:
    response = Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
    response.headers["Access-Control-Max-Age"] = "600"
    return response


@bp.after_app_request
def _cors(response: Response) -> Response:
    origin = _allowed_origin(state().settings)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    response.headers["Cache-Control"] = "no-store"
    return response


# --- errors --------------------------------------------------------------------


def _error(status: int, code: str, message: str) -> Response:
    return _json(protocol.error_body(status, code, message), status)


@bp.app_errorhandler(protocol.ProtocolError)
def _protocol_error(exc: protocol.ProtocolError) -> Response:
    return _error(400, exc.code, str(exc))


@bp.app_errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> Response:
    return _error(400, "BAD_REQUEST", str(exc))


@bp.app_errorhandler(Unavailable)
def _unavailable(exc: Unavailable) -> Response:
    logger.warning("query unavailable: %s", exc)
    return _error(503, "UNAVAILABLE", str(exc) or "the store cannot answer now")


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = (exc.name or "error").upper().replace(" ", "_")
    response = _error(status, code, exc.description or exc.name)
    if status == 405 and exc.get_response().headers.get("Allow"):
        response.headers["Allow"] = exc.get_response().headers["Allow"]
    return response


@bp.app_errorhandler(Exception)
def _internal_error(exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.path)
    return _error(500, "INTERNAL", "internal error; see the server log")


def register(app: Flask, app_state: AppState) -> None:
    """Attach the blueprint and the shared state to an app."""
    app.extensions["cpa_monitor"] = app_state
    app.config["MAX_CONTENT_LENGTH"] = app_state.settings.max_body_bytes
    app.register_blueprint(bp)

