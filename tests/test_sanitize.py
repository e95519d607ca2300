"""Sanitization rules of reference 3.4 and 3.6, each with a planted secret."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from datasource import sanitize

from datasource.sanitize import (api_key_hash, clean_text, fail_summary, mask_api_key, mask_source,
                                 redact_payload, redact_text)


@pytest.mark.parametrize("text, expected", [
    # 1. authorization values, with or without a scheme
    ("Authorization: Bearer SECRETAUTH1", "Authorization: Bearer [redacted]"),
    ('{"authorization":"Basic U0VDUkVUQVVUSDI="}', '{"authorization":"Basic [redacted]"}'),
    ("authorization=SECRETAUTH3&x=1", "authorization=[redacted]&x=1"),
    # 2. bare bearer tokens of 8+ characters
    ("got bearer SECRETBEARER4.x-y", "got Bearer [redacted]"),
    ("bearer short", "bearer short"),
    # 3. OAuth token fields
    ('{"access_token": "SECRETAT5"}', '{"access_token": "[redacted]"}'),
    ("refresh_token=SECRETRT6 id_token:SECRETID7", "refresh_token=[redacted] id_token:[redacted]"),
    # 4. API-key fields
    ('{"api_key":"SECRETKEY8"}', '{"api_key":"[redacted]"}'),
    ("x-api-key: SECRETKEY9", "x-api-key: [redacted]"),
    ("apikey=SECRETKEY10", "apikey=[redacted]"),
    ("api key: SECRETKEY11", "api key: [redacted]"),
    ("api-key=SECRETKEY12", "api-key=[redacted]"),
    # 5. token shapes
    ("key sk-proj-SECRET13abc here", "key [redacted] here"),
    ("key sk-ant-api03-SECRET14 here", "key [redacted] here"),
    ("Incorrect API key provided: sk-SECRET15.", "Incorrect API key provided: [redacted]."),
    ("sess-SECRET16abc", "[redacted]"),
    ("ghp_SECRET17abc", "[redacted]"),
    ("github_pat_SECRET18_abcdefghijkl", "[redacted]"),
    ("AIzaSECRET19abcd", "[redacted]"),
    ("hf_SECRET20abc pk_SECRET21abc rk_SECRET22abc", "[redacted] [redacted] [redacted]"),
    ("sk-abc", "sk-abc"),  # too short to be a key
    # 6. JSON cookie values (string or array)
    ('{"cookie":"sid=SECRET23"}', '{"cookie":"[redacted]"}'),
    ('{"Set-Cookie":["sid=SECRET24; Path=/"]}', '{"Set-Cookie":"[redacted]"}'),
    # 7. header-style cookies
    ("Cookie: sid=SECRET25; other=1\nnext line", "Cookie: [redacted]\nnext line"),
    ("set-cookie: SECRET26", "set-cookie: [redacted]"),
    # 8. e-mails
    ("user alice.secret27@example.com failed", "user a***@example.com failed"),
])
def test_redaction_passes(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert "SECRET" not in redact_text(text)


def test_ordinary_diagnostics_are_kept() -> None:
    text = '{"status":"401","detail":"upstream denied","retry_after":30,"model":"gpt-5.4"}'
    assert redact_text(text) == text


def test_fail_summary_trims_and_caps_at_4096_bytes() -> None:
    assert fail_summary("  boom \n") == "boom"
    assert fail_summary("") is None and fail_summary(None) is None
    long = "é" * 3000  # 6000 bytes; the cut must not split a character
    summary = fail_summary(long)
    assert summary == "é" * 2048 + "..."
    assert len(summary.encode()) == 4099


def test_clean_text_rules() -> None:
    assert clean_text("  a\u200bb\u202ec\t\td\x00e  ", 100) == "a b c d e"
    assert clean_text("\u2028\n", 10) is None
    assert clean_text("abcdefghij", 8) == "abcde..."
    assert clean_text("ab€", 4) == "a..."  # limit-3 bytes = 1, then '...'


def test_api_key_hash_and_mask() -> None:
    assert api_key_hash(" sk-client-demo-0001 ") == \
        "faa210d78e64b975e87ea4585883b7f8c8d5b0c95719a5d70ba0c3a348bc5e24"
    assert api_key_hash("") is None and api_key_hash(None) is None
    assert mask_api_key("sk-client-demo-0001") == "sk******01"
    assert mask_api_key("abcd") == "ab******cd"
    assert mask_api_key("xyz") == "x********z"
    assert mask_api_key("q") == "q********q"
    assert mask_api_key("  ") is None


@pytest.mark.parametrize("source, masked", [
    ("alice@example.com", "ali***@example.com"),
    ("al@example.com", "al***@example.com"),
    ("sk-upstreamSECRET28", "m:sk-u...ET28"),
    ("AIzaSECRET29", "m:AIza...ET29"),
    ("sk-1234", "m:****"),
    ("x" * 40, "m:xxxx...xxxx"),
    ("my-project-1", "my-project-1"),
    ("has space " + "y" * 40, "has space " + "y" * 40),
    ("path/" + "z" * 40, "path/" + "z" * 40),
    ("", None),
])
def test_mask_source(source: str, masked: str | None) -> None:
    assert mask_source(source) == masked


def test_redact_payload_raw_json_rules() -> None:
    payload = {
        "api_key": "sk-client-SECRET30", "Authorization": "Bearer SECRET31", "my_client_secret": "SECRET32",
        "token": "SECRET33", "tokens": {"input_tokens": 3}, "source": "sk-upstream-SECRET34abcdef",
        "email": "dave@example.com",
        "fail": {"status_code": 401, "body": "bad key sk-SECRET35xyz"},
        "client_ip": "10.0.0.1\n", "user_agent": "ua\u0000x",
        "response_headers": {"Set-Cookie": ["SECRET36"], "X-Request-Id": ["req_1"]},
        "list": [{"access-token": "SECRET37"}],
    }
    out = redact_payload(payload)
    text = json.dumps(out)
    assert "SECRET" not in text
    assert out["tokens"] == {"input_tokens": 3}
    assert out["source"] == "m:sk-u...cdef" and out["email"] == "dav***@example.com"
    assert out["fail"] == {"status_code": 401, "body": "bad key [redacted]"}
    assert out["client_ip"] == "10.0.0.1" and out["user_agent"] == "ua x"
    assert out["response_headers"] == {"Set-Cookie": "[redacted]", "X-Request-Id": ["req_1"]}
    assert out["list"] == [{"access-token": "[redacted]"}]


_MARKER_TEXT = st.text(alphabet=st.sampled_from(list("aAuUtThHkKeEyYsSbBrRoOcCiIzZpPgG_-@ =:\"'") +
                                                ["\u212a", "\u017f", "\u0130", "\u00e9"]), max_size=40)


@settings(max_examples=500, deadline=None)
@given(_MARKER_TEXT)
def test_secret_prefilter_lets_through_all_that_ignorecase_finds(text: str) -> None:
    old = bool(sanitize._MAYBE_SECRET.search(text))
    new = bool(sanitize._MAYBE_SECRET_LOWER.search(text.lower())) if text.isascii() else old
    assert new == old
    # the whole redaction is what the IGNORECASE pre-check gave
    expected = text
    if old:
        for pattern, replacement in sanitize._PASSES:
            expected = pattern.sub(replacement, expected)
    assert sanitize.redact_text(text) == expected


def test_secret_prefilter_on_mixed_case_ascii() -> None:
    assert sanitize.redact_text("AUTHORIZATION: Bearer abcdefgh12345678") == "AUTHORIZATION: Bearer [redacted]"
    assert sanitize.redact_text("Api-Key=SeCrEt99") == "Api-Key=[redacted]"
    assert sanitize.redact_text("plain text, nothing here") == "plain text, nothing here"
