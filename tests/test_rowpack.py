"""Compact events rows (schema step 4, datasource/rowpack.py): what is stored, what comes back."""

from __future__ import annotations

import hashlib
import json
import zlib

import apsw
from hypothesis import given, settings, strategies as st

from datasource import rowpack, store
from datasource.db import MIGRATIONS, SCHEMA_VERSION, connect, migrate, open_database
from datasource.normalize import normalize
from datasource.payload import render_ts

TS_MS = 1_778_033_730_123  # 2026-05-06T02:15:30.123Z
HASH = hashlib.sha256(b"event").hexdigest()
SOURCE_HASH = hashlib.sha256(b"alice@example.com").hexdigest()


def payload(**extra) -> bytes:
    base = {"timestamp": "2026-05-06T10:15:30.123456789+08:00", "model": "gpt-5.4", "alias": "gpt-5.4(high)",
            "provider": "codex", "endpoint": "POST /v1/responses", "source": "alice@example.com",
            "api_key": "sk-caller-0001", "auth_index": "a1", "latency_ms": 900, "request_id": "r1",
            "tokens": {"input_tokens": 100, "output_tokens": 10}, "client_ip": "192.0.2.10"}
    base.update(extra)
    return json.dumps(base).encode()


def test_pack_leaves_out_what_the_row_rebuilds():
    row = normalize(payload(), now_ms=TS_MS).row
    assert (row["ts"], row["ts_ms"]) == ("2026-05-06T02:15:30.123456789Z", TS_MS)
    assert (row["method"], row["path"], row["billing_model"]) == ("POST", "/v1/responses", "gpt-5.4")
    packed = rowpack.pack(row)
    assert packed["event_hash"] == bytes.fromhex(row["event_hash"]) and len(packed["event_hash"]) == 32
    assert packed["source_hash"] == bytes.fromhex(SOURCE_HASH)
    # 123 ms are in ts_ms; the 456789 ns below the millisecond go to ts_sub_ns
    assert (packed["ts"], packed["ts_sub_ns"]) == ("", 456_789)
    assert (packed["method"], packed["path"], packed["billing_model"]) == ("", "", "")
    assert (row["cache_input_mode"], packed["cache_input_mode"]) == ("included_in_input", "i")
    assert packed["api_key_hash"] == row["api_key_hash"]  # read by queries: untouched
    assert rowpack.unpack(packed) == row


def test_values_that_break_the_rules_are_stored_as_they_are():
    row = {"event_hash": "not-hex", "source_hash": SOURCE_HASH.upper(), "ts_ms": TS_MS,
           "ts": "2026-05-06T02:15:30.123+00:00", "endpoint": "POST /v1/x", "method": "PUT", "path": "/v1/y",
           "resolved_model": "gpt-5.4-2026", "analytics_model": "gpt-5.4", "billing_model": "gpt-5.4"}
    packed = rowpack.pack(row)
    assert packed == row  # non-hex hashes, a ts that render_ts would not write, explicit method/path/billing
    assert "ts_sub_ns" not in packed
    assert rowpack.unpack(packed) == row


def test_ts_without_fraction_and_with_a_millisecond_fraction():
    for ts, ms, sub in (("2026-05-06T02:30:12Z", 1_778_034_612_000, 0),
                        ("2026-05-06T02:20:00.5Z", 1_778_034_000_500, 0),
                        ("2026-05-06T00:00:00.000000001Z", 1_778_025_600_000, 1)):
        packed = rowpack.pack({"ts": ts, "ts_ms": ms})
        assert (packed["ts"], packed["ts_sub_ns"]) == ("", sub)
        assert rowpack.unpack(packed)["ts"] == ts
    # a ts that disagrees with ts_ms is kept verbatim
    assert rowpack.pack({"ts": "2026-05-06T02:30:12Z", "ts_ms": 1}) == {"ts": "2026-05-06T02:30:12Z", "ts_ms": 1}


def _sub_by_rendering(ts: str, ts_ms: int) -> int | None:
    """The first implementation of _sub_ms_nanos: render the whole text again and compare."""
    if ts_ms < 0:
        return None
    dot = ts.rfind(".")
    sub = 0
    if dot > 0 and ts.endswith("Z"):
        digits = ts[dot + 1:-1]
        if digits.isdigit() and len(digits) <= 9:
            sub = int(digits.ljust(9, "0")[3:])
    return sub if rowpack._render(ts_ms, sub) == ts else None


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 253_402_300_799_999 - 1000), st.integers(0, 999_999),
       st.sampled_from(["", "drop-z", "+00:00", "trailing-0", "short", "space", "digit", "ms+1", "s+1"]))
def test_sub_ms_nanos_agrees_with_rendering_the_text_again(ts_ms: int, sub: int, change: str) -> None:
    ts = render_ts(ts_ms, f"{ts_ms % 1000:03d}{sub:06d}")
    ts = {"": ts, "drop-z": ts[:-1], "+00:00": ts[:-1] + "+00:00", "trailing-0": ts[:-1] + "0Z",
          "short": ts[:18] + "Z", "space": ts.replace("T", " "), "digit": ts[:-1] + "\u0663Z"}.get(change, ts)
    ms = ts_ms + {"ms+1": 1, "s+1": 1000}.get(change, 0)
    found = rowpack._sub_ms_nanos(ts, ms)
    if found is not None:
        assert rowpack._render(ms, found) == ts
    assert found == _sub_by_rendering(ts, ms)
    if change == "":
        assert found == sub


def test_insert_stores_the_packed_row_and_export_gives_the_full_one(tmp_path):
    conn = open_database(str(tmp_path / "m.db"))
    failed = normalize(payload(request_id="r2", failed=True,
                               fail={"status_code": 429, "body": "usage limit reached"}), now_ms=TS_MS)
    ok = normalize(payload(), now_ms=TS_MS)
    store.insert_batch(conn, [ok, failed], origin="test")
    stored = conn.execute("SELECT typeof(event_hash), length(event_hash), ts, ts_sub_ns, method, path, "
                          "billing_model FROM events ORDER BY id").fetchall()
    assert stored == [("blob", 32, "", 456_789, "", "", "")] * 2
    exported = list(store.iter_export_rows(conn, 0, 2**62, {}))
    for got, item in zip(exported, (ok, failed)):
        got.pop("id")
        assert got == item.row
        assert "ts_sub_ns" not in got
    raw = conn.execute("SELECT raw_json FROM event_private WHERE raw_json IS NOT NULL").get
    assert isinstance(raw, bytes)
    assert rowpack.private_text(raw) == failed.private["raw_json"]
    assert zlib.decompress(raw).decode() == failed.private["raw_json"]
    assert len(raw) < len(failed.private["raw_json"].encode())
    conn.close()


def test_rollups_read_no_column_that_packing_changes():
    """insert_batch hands the packed rows to rollup.apply (one dict per event, not two)."""
    from datasource import rollup

    assert not set(rollup.SOURCE_COLUMNS) & set(rowpack.PACKED_COLUMNS)
    row = normalize(payload(), now_ms=TS_MS).row
    packed = rowpack.pack(row)
    assert {k for k in row if packed.get(k) != row[k]} | (set(packed) - set(row)) <= set(rowpack.PACKED_COLUMNS)


def _schema3(path: str) -> apsw.Connection:
    conn = connect(path)
    with conn:
        for step in MIGRATIONS[:3]:
            conn.execute(step)
        conn.pragma("user_version", 3)
    return conn


def test_step_4_rewrites_rows_stored_before_it(tmp_path):
    path = str(tmp_path / "old.db")
    conn = _schema3(path)
    ok = normalize(payload(), now_ms=TS_MS)
    odd = dict(ok.row, event_hash="x" * 64, ts="2026-05-06T02:15:30.123+00:00", method="PUT",
               billing_model="custom")
    old_rows = [dict(ok.row, id=1, created_ms=TS_MS), dict(odd, id=2, created_ms=TS_MS)]
    with conn:
        for row in old_rows:  # as schema 3 stored them: 64-hex text hashes, full ts, method, path, billing
            cols = [c for c in row]
            conn.execute(f"INSERT INTO events({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         tuple(row.values()))
        conn.execute("INSERT INTO event_private(event_id, client_ip, raw_json) VALUES (1, '192.0.2.1', '{\"a\":1}')")
    assert migrate(conn) == SCHEMA_VERSION >= 4
    stored = conn.execute("SELECT typeof(event_hash), typeof(source_hash), ts, ts_sub_ns, method, path, "
                          "billing_model, cache_input_mode FROM events ORDER BY id").fetchall()
    assert stored == [("blob", "blob", "", 456_789, "", "", "", "i"),
                      ("text", "blob", "2026-05-06T02:15:30.123+00:00", None, "PUT", "", "custom", "i")]
    assert rowpack.private_text(conn.execute("SELECT raw_json FROM event_private").get) == '{"a":1}'
    assert conn.execute("SELECT client_ip FROM event_private").get == "192.0.2.1"
    exported = list(store.iter_export_rows(conn, 0, 2**62, {}))
    assert exported == old_rows
    conn.close()


def test_failed_step_4_leaves_schema_3(tmp_path, monkeypatch):
    path = str(tmp_path / "old.db")
    conn = _schema3(path)
    with conn:
        conn.execute("INSERT INTO events(event_hash, ts_ms, ts, created_ms) VALUES (?, ?, ?, ?)",
                     (HASH, TS_MS, "2026-05-06T02:15:30.123Z", TS_MS))

    def broken(ts, ts_ms):
        raise RuntimeError("boom")

    monkeypatch.setattr(rowpack, "migrate_ts_sub", broken)
    try:
        migrate(conn)
    except RuntimeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("migrate should fail")
    assert conn.pragma("user_version") == 3
    assert conn.execute("SELECT event_hash, ts FROM events").fetchall() == [(HASH, "2026-05-06T02:15:30.123Z")]
    assert "ts_sub_ns" not in [r[1] for r in conn.execute("PRAGMA table_info(events)")]
    conn.close()
