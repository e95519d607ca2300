"""The C-level pre-check that lets normalize skip its JSON walk, and the paths that use it."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings, strategies as st

from datasource.cmd_store import decode_items
from datasource.exchange import classify
from datasource.model import Normalized, Rejected
from datasource.normalize import MAX_DEPTH, fast_decode, normalize, normalize_obj, plain_json_text


def test_plain_json_text_vouches_only_for_what_it_can_see():
    assert plain_json_text('{"a": "caf\\u00e9", "b": ["x", {"c": 1}]}')  # a BMP escape is fine
    assert plain_json_text('{"a": "café"}')
    assert not plain_json_text('{"a": "\\ud800"}')  # a surrogate escape: full walk
    assert not plain_json_text('{"a": "\\uDFFF"}')
    assert not plain_json_text('{"a": "\ud800"}')  # a lone surrogate in the text itself
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    assert plain_json_text('{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}")  # 33 brackets
    assert not plain_json_text('{"a": ' + deep + "}")
    assert not plain_json_text('{"a": "' + "{" * 40 + '"}')  # brackets in strings only cost the walk


def test_surrogates_and_depth_still_handled_on_both_paths():
    escaped = b'{"timestamp": 1777593600, "model": "m\\ud800x", "request_id": "r1"}'
    event = normalize(escaped, now_ms=0)
    assert isinstance(event, Normalized) and event.row["model"] == "m\ufffdx"
    too_deep = b'{"a": ' + b"[" * (MAX_DEPTH + 2) + b"]" * (MAX_DEPTH + 2) + b"}"
    rejected = normalize(too_deep, now_ms=0)
    assert isinstance(rejected, Rejected) and "nested deeper than 32" in rejected.reason


def test_ingest_array_item_embedded_as_a_string_with_a_lone_surrogate():
    # CPA embeds an item it could not marshal as a JSON string; decoding the array turns the
    # escape into a real lone surrogate inside the item's text
    inner = '{"timestamp": 1777593600, "model": "m\ud800x", "request_id": "r2"}'  # a real lone surrogate
    stream = io.BytesIO(json.dumps([inner]).encode())  # [ "{\"timestamp\": ..., \"m\\ud800x\" ...}" ]
    items = list(decode_items(stream, now_ms=0))
    assert len(items) == 1 and isinstance(items[0], Normalized)
    assert items[0].row["model"] == "m\ufffdx"
    record = classify(b'{"a": 1}')
    assert record.plain and record.obj == {"a": 1}


def test_headers_without_sections_keep_every_typed_field():
    from datasource.headers import parse_headers

    raw = {"Content-Type": ["text/event-stream"], "Server": ["cloudflare"], "X-Request-Id": ["req_1"],
           "X-Codex-Plan-Type": ["plus"], "X-Codex-Primary-Used-Percent": ["66"],
           "X-Codex-Primary-Window-Minutes": ["300"], "X-Codex-Primary-Reset-After-Seconds": ["60"]}
    full = parse_headers(raw, 1_000_000)
    lean = parse_headers(raw, 1_000_000, sections=False)
    assert full.meta["routing"] == {"server": "cloudflare"} and "routing" not in lean.meta
    assert full.meta["response"] == {"content-type": "text/event-stream"} and "response" not in lean.meta
    assert lean.meta["quota"] == full.meta["quota"] and lean.meta["trace"] == {"x-request-id": "req_1"}
    assert (lean.quota_plan, lean.quota_used_pct, lean.quota_recover_at_ms, lean.quota_window) == \
        ("plus", 66.0, 1_060_000, "five_hour")
    assert (lean.trace_id, lean.content_type) == ("req_1", "text/event-stream")
    assert {f: getattr(lean, f) for f in lean.__slots__ if f != "meta"} == \
        {f: getattr(full, f) for f in full.__slots__ if f != "meta"}


# --- orjson's fast decode: the same values as the json module, or the json path ---------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


def _same(a: object, b: object) -> bool:
    """Equal, with the same types all the way down (1 == 1.0 would hide an int turned float)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("raw", [
    b'{"a": 123456789012345678901234567890}',  # past 64 bits: orjson would give a float
    b'{"a": -9223372036854775809}',
    b'{"a": "1234567890123456789"}',  # 19 digits in a string: the json path, same value
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1e400}',
    b'\xef\xbb\xbf{"a": 1}',  # a BOM
    b'{"a": "\\ud800"}', b'{"a": "\\udc00"}', b'{"a": "\xed\xa0\x80"}',  # lone surrogates
    b'{"a": "\xff"}', b'{"a": 1} x', b'', b' ',
])
def test_fast_decode_leaves_to_the_json_path_what_it_would_decode_differently(raw: bytes) -> None:
    assert fast_decode(raw) is None


def test_fast_decode_values_and_depth_verdict() -> None:
    assert fast_decode(b'{"a": 1, "a": 2, "b": [1.5, -0.0, 999999999999999999, null, true]}') == \
        ({"a": 2, "b": [1.5, -0.0, 999999999999999999, None, True]}, True)
    value, plain = fast_decode(b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}")  # 33 brackets
    assert plain
    value, plain = fast_decode(b'{"a": "' + b"{" * 40 + b'"}')
    assert value == {"a": "{" * 40} and not plain  # brackets in strings only cost the walk


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fast_decode_gives_the_json_modules_value_or_none(value: object) -> None:
    raw = json.dumps(value, ensure_ascii=bool(hash(repr(value)) & 1)).encode("utf-8", "surrogatepass")
    fast = fast_decode(raw)
    if fast is not None:
        assert _same(fast[0], json.loads(raw))
    elif not any(c.isdigit() for c in raw.decode("utf-8", "replace")):
        # without a run of digits only a lone surrogate sends a value to the json path
        assert "\\ud" in raw.decode("utf-8", "replace").lower() or b"\xed" in raw


def _slow(raw: bytes) -> Normalized | Rejected:
    text = raw.decode("utf-8")
    return normalize_obj(json.loads(text), raw, now_ms=0, _plain=plain_json_text(text))


def test_an_integer_past_64_bits_keeps_its_digits() -> None:
    raw = b'{"timestamp": 1777593600, "request_id": 123456789012345678901234567890, "model": "m"}'
    event = normalize(raw, now_ms=0)
    assert isinstance(event, Normalized) and event.row["request_id"] == "123456789012345678901234567890"
    assert event == _slow(raw)
    record = classify(raw)
    assert record.obj["request_id"] == 123456789012345678901234567890 and record.plain


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["timestamp", "tokens", "usage", "fail", "failed", "response_headers",
                                        "model", "source", "api_key", "latency_ms", "request_id", "auth_index"]),
                       json_values, max_size=8))
def test_both_paths_normalize_alike(obj: dict) -> None:
    raw = json.dumps(obj).encode("utf-8", "surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert normalize(raw, now_ms=0) == _slow(raw)
    fast = classify(raw)
    assert fast == classify(raw, raw.decode("utf-8"))
    # plain_json_text sends every surrogate escape to the walk; orjson has refused the lone ones
    assert fast.plain >= plain_json_text(raw.decode("utf-8"))
