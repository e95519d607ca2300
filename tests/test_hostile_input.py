"""Hostile CPA payloads through the real ingest path (normalize -> store.insert_batch -> SQLite).

tests/test_normalize.py checks normalize() alone; here every generated item goes through an
Ingestor on a real database file, so a value SQLite cannot bind (a huge int, a lone surrogate,
an infinity) would show as an exception or a lost batch. For every item exactly one thing
happens: an event row (or a duplicate of one already stored), a dead letter, or a control
message; never an exception, and no planted secret in any table the API reads.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from datasource.db import open_database
from datasource.ingest import Ingestor
from datasource.model import Control
from datasource.normalize import normalize

PRIVATE_TABLES = {"event_private", "credential_error_private", "dead_letters"}
SECRETS = {
    "caller key": "sk-callerHOSTILE0001key",
    "upstream key": "sk-upstreamHOSTILE0002abcdefgh",
    "bearer": "HOSTILEbearer0003token",
    "cookie": "HOSTILEcookie0004value",
    "email": "hostile.person.HOSTILE0005@corp-example.net",
    "anthropic": "sk-ant-api03-HOSTILE0006key",
    "header token": "HOSTILEheader0007token",
}
SECRET_MARK = re.compile(r"HOSTILE\d{4}")

# --- strategies -------------------------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(codec=None, categories=["Cc", "Cf", "Zl", "Zp", "Cs", "Co"]), max_size=20),
    st.sampled_from(["\x00", "\ud800", "\udfff lone", "a\ud83d", "\u202e\u200b", "\r\n\t", "%s%n{0}", "' OR 1=1 --",
                     "x" * 5000, "\U0010ffff", "null", "NaN", "-0", "1e400", "9" * 400]),
)
hostile_number = st.one_of(
    st.integers(), st.integers(min_value=2**63 - 2, max_value=2**63 + 2), st.integers(min_value=-(2**200),
                                                                                     max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, -1, 2**64, -(2**63) - 1, 1e308, 5e-324]),
)
scalar = st.none() | st.booleans() | hostile_number | hostile_text
json_value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(hostile_text, c, max_size=3),
                          max_leaves=12)


def deep(value, depth: int):
    for i in range(depth):
        value = [value] if i % 2 else {"d": value}
    return value


def secret_body(style: int) -> str:
    parts = [f"Authorization: Bearer {SECRETS['bearer']}", f"key {SECRETS['anthropic']}",
             f"for {SECRETS['email']}", f"cookie: session={SECRETS['cookie']}"]
    if style == 0:
        return json.dumps({"error": {"message": " and ".join(parts), "api_key": SECRETS["caller key"]}})
    if style == 1:
        return " | ".join(parts)
    return "<html>" + "\x00\x1b[31m".join(parts) + "</html>"


@st.composite
def payloads(draw) -> dict:
    """A CPA usage event: known fields with hostile values, planted secrets where secrets go."""
    obj: dict = {}
    known = {
        "timestamp": st.one_of(hostile_text, hostile_number, st.just("2026-11-28T10:00:00.123456789+08:00")),
        "latency_ms": scalar, "ttft_ms": scalar, "model": scalar, "alias": scalar, "provider": scalar,
        "executor_type": scalar, "endpoint": scalar, "auth_type": scalar, "user_agent": scalar,
        "request_id": scalar, "auth_index": scalar, "client_ip": scalar, "x_forwarded_for": scalar,
        "failed": scalar, "generate": scalar, "service_tier": scalar, "reasoning_effort": scalar,
        "tokens": st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "reasoning_tokens",
                                                   "cached_tokens", "cache_read_tokens", "total_tokens",
                                                   "cache_creation_tokens", "cache_read_tokens_present"]),
                                  scalar, max_size=8) | json_value,
        "token_breakdown": json_value, "usage": json_value, "accounting_version": scalar,
    }
    for name in draw(st.lists(st.sampled_from(sorted(known)), unique=True, max_size=len(known))):
        obj[name] = draw(known[name])
    obj["api_key"] = draw(st.sampled_from([SECRETS["caller key"], f" {SECRETS['caller key']}\x00",
                                           [SECRETS["caller key"]], {"k": SECRETS["caller key"]}]))
    obj["source"] = draw(st.sampled_from([SECRETS["upstream key"], SECRETS["email"], f"\ud800{SECRETS['email']}",
                                          [SECRETS["upstream key"]], f"Bearer {SECRETS['bearer']}"]))
    status = draw(st.one_of(st.sampled_from([200, 400, 401, 403, 429, 500, 529]), scalar))
    obj["fail"] = draw(st.sampled_from([
        {"status_code": status, "body": secret_body(draw(st.integers(0, 2)))},
        {"status_code": status, "body": json.loads(secret_body(0))},
        secret_body(1),
    ]))
    obj["response_headers"] = {
        "Authorization": [f"Bearer {SECRETS['header token']}"], "Set-Cookie": [f"sid={SECRETS['cookie']}"],
        draw(hostile_text): draw(st.one_of(st.lists(hostile_text, max_size=2), scalar)),
    }
    if draw(st.booleans()):
        obj[draw(hostile_text)] = draw(st.one_of(json_value, st.integers(30, 80).map(lambda d: deep(1, d))))
    return obj


@st.composite
def raw_items(draw) -> bytes:
    """The payload's bytes, sometimes mangled the way a broken producer would."""
    text = json.dumps(draw(payloads()), ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8 bytes
    mangle = draw(st.sampled_from(["none", "none", "invalid-utf8", "huge-number", "inf", "truncate", "nan"]))
    cut = draw(st.integers(1, len(raw)))
    if mangle == "invalid-utf8":
        raw = raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                                b"\xc0\xaf"])) + raw[cut:]
    elif mangle == "huge-number":
        raw = raw[:-1] + b', "latency_ms": ' + b"9" * draw(st.integers(19, 4000)) + b"}"
    elif mangle == "inf":
        raw = raw[:-1] + b', "tokens": {"input_tokens": 1e400, "output_tokens": -1e400}, "ttft_ms": 1e-400}'
    elif mangle == "truncate":
        raw = raw[:cut]
    elif mangle == "nan":
        raw = raw[:-1] + b', "latency_ms": NaN}'
    return raw


# --- the store side ---------------------------------------------------------------------------


def public_dump(conn) -> str:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    parts = []
    for table in tables:
        if table in PRIVATE_TABLES:
            continue
        for row in conn.execute(f'SELECT * FROM "{table}"'):
            parts.extend(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row)
    return "\n".join(parts)


def counts(conn) -> tuple[int, int, int]:
    return (conn.execute("SELECT count(*) FROM events").fetchall()[0][0],
            conn.execute("SELECT count(*) FROM event_ledger").fetchall()[0][0],
            conn.execute("SELECT count(*) FROM dead_letters").fetchall()[0][0])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    conn = open_database(str(tmp_path_factory.mktemp("hostile") / "monitor.db"))
    yield conn, Ingestor(conn, "default")
    conn.close()


def ingest_one(store, raw: bytes) -> str:
    """Ingest one item; returns which one thing happened to it, checking the counts agree."""
    conn, ingestor = store
    before = counts(conn)
    result = ingestor.usage([raw])
    after = counts(conn)
    if not raw.strip():  # an empty queue item is no message: skipped, as blank JSONL lines are
        assert after == before and (result.inserted, result.dead_letters) == (0, 0)
        return "blank"
    if isinstance(normalize(raw), Control):
        assert after == before and (result.inserted, result.dead_letters) == (0, 0)
        return "control"
    outcomes = result.inserted + result.duplicates + result.dead_letters
    assert outcomes == 1, (result, raw[:200])
    assert after == (before[0] + result.inserted, before[1] + result.inserted, before[2] + result.dead_letters)
    if result.dead_letters:
        stored = conn.execute("SELECT payload FROM dead_letters ORDER BY id DESC LIMIT 1").fetchall()[0][0]
        assert bytes(stored) == raw  # the dead letter keeps the exact bytes for diagnosis
        return "dead letter"
    return "event" if result.inserted else "duplicate"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw_items())
def test_every_hostile_item_is_one_event_or_one_dead_letter_and_no_secret_is_stored(store, raw):
    outcome = ingest_one(store, raw)
    assert outcome in ("event", "duplicate", "dead letter")
    conn, _ = store
    if outcome == "event":
        row = conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT 1").fetchall()[0]
        text = " ".join(str(v) for v in row)
        assert not SECRET_MARK.search(text), text
        for value in row:
            assert not (isinstance(value, float) and not math.isfinite(value)), row
            if isinstance(value, str):
                value.encode("utf-8")  # no lone surrogate reached SQLite


def test_nothing_secret_in_any_public_table_after_the_run(store):
    conn, ingestor = store
    for raw in (json.dumps({"api_key": SECRETS["caller key"], "source": SECRETS["upstream key"],
                            "fail": {"status_code": 401, "body": secret_body(0)}}).encode(),
                b'{"api_key": "' + SECRETS["caller key"].encode() + b'", "model": "\xff"}'):
        ingest_one(store, raw)
    found = sorted(set(SECRET_MARK.findall(public_dump(conn))))
    assert found == []
    assert counts(conn)[0] >= 1 and counts(conn)[2] >= 1  # both kinds of outcome were exercised


@pytest.mark.parametrize(("raw", "outcome"), [
    (b'{"support_refresh":true}', "control"),
    (b" \n", "blank"),
    (b'{"refresh":true}', "control"),
    (b'{"latency_ms": ' + b"9" * 30 + b', "request_id": "huge-int"}', "event"),
    (b'{"latency_ms": 1e400, "tokens": {"input_tokens": 1e400}, "request_id": "inf"}', "event"),
    (b'{"model": "\\ud800", "request_id": "escaped-lone-surrogate"}', "event"),
    (b'{"model": "\xed\xa0\x80", "request_id": "raw-surrogate-bytes"}', "dead letter"),
    (b'{"model": "caf\xe9"}', "dead letter"),
    (b'{"latency_ms": NaN}', "dead letter"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "dead letter"),
    (b"[" * 50000 + b"]" * 50000, "dead letter"),
    (b'{"model": "x\x01y"}', "dead letter"),
    (b"\x00\x00\x00", "dead letter"),
])
def test_hand_picked_hostile_items(tmp_path, raw, outcome):
    conn = open_database(str(tmp_path / "m.db"))
    try:
        assert ingest_one((conn, Ingestor(conn, "default")), raw) == outcome
        if outcome == "event":
            row = dict(zip([d[0] for d in conn.execute("SELECT * FROM events").getdescription()],
                           conn.execute("SELECT * FROM events").fetchall()[0]))
            assert row["latency_ms"] in (0, None) and row["input_tokens"] == 0  # out-of-range numbers count 0
            assert row["model"] in ("\ufffd", "-") and row["request_id"] == json.loads(raw)["request_id"]
    finally:
        conn.close()


def test_one_hostile_item_does_not_cost_its_batch(tmp_path):
    """A batch mixing good events and every hostile shape: all good ones stored, the rest dead-lettered."""
    conn = open_database(str(tmp_path / "m.db"))
    try:
        good = [json.dumps({"request_id": f"good-{i}", "model": "gpt-5.4", "latency_ms": 100 + i,
                            "timestamp": "2026-11-28T10:00:00Z"}).encode() for i in range(5)]
        hostile = [b'{"latency_ms": ' + b"9" * 400 + b"}", b'{"model": "\xff"}', b"[1,2]", b'{"a": NaN}',
                   b'{"model": "\\udfff", "request_id": "lone"}', b'{"x":' * 64 + b"0" + b"}" * 64]
        batch = [good[0], hostile[0], good[1], hostile[1], good[2], hostile[2], hostile[3], good[3], hostile[4],
                 hostile[5], good[4]]
        result = Ingestor(conn, "default").usage(batch)
        # the 400-digit latency and the escaped lone surrogate are still events; the rest dead letters
        assert (result.inserted, result.duplicates, result.dead_letters) == (7, 0, 4)
        assert counts(conn) == (7, 7, 4)
        ids = [r[0] for r in conn.execute("SELECT request_id FROM events ORDER BY id")]
        assert ids == ["good-0", None, "good-1", "good-2", "good-3", "lone", "good-4"]
    finally:
        conn.close()
