"""The C-level pre-check that lets normalize skip its JSON walk, and the paths that use it."""

from __future__ import annotations

import io
import json

from datasource.cmd_store import decode_items
from datasource.exchange import classify
from datasource.model import Normalized, Rejected
from datasource.normalize import MAX_DEPTH, normalize, plain_json_text


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
