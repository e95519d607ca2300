"""Compact storage of events rows (schema step 4): what the row holds vs what it means.

Normalize and the API see full rows. On the way into SQLite, `pack(row)` leaves out what the
row can rebuild, and `unpack(row)` (export, anything that reads these columns) puts it back:

| column | stored as | rebuilt from |
|---|---|---|
| `event_hash`, `source_hash` | 32-byte BLOB (was 64 hex characters) | `.hex()` |
| `ts` | `''` plus `ts_sub_ns` (nanoseconds below the millisecond) | `ts_ms`, `ts_sub_ns` |
| `billing_model` | `''` when it is `resolved_model`, else `analytics_model` (normalize's rule) | those columns |
| `method`, `path` | `''` when the `endpoint` text (`POST /v1/x`) gives them | `endpoint` |
| `cache_input_mode` | `i` / `s` for `included_in_input` / `separate_from_input` | the code |

A value that does not follow the rule (an imported export line with its own `ts` text, a
non-hex hash) is stored as it is, so unpack(pack(row)) == row for every row normalize or an
export line produces (an empty string in a packed text column means "rebuild it", and `i`/`s`
in `cache_input_mode` are codes; normalize never stores those values there). No query or filter reads these
columns (they read `ts_ms`, `endpoint`, `analytics_model`, ...). Private raw JSON is stored
zlib-compressed (`pack_private`); `private_text` reads it back.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from typing import Any, Mapping

from datasource.interned import ID_COLUMNS
from datasource.payload import render_ts, second_text

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENDPOINT = re.compile(r"^(GET|POST|PUT|PATCH|DELETE|OPTIONS|HEAD)\s+(\S+)")  # as payload.endpoint_parts
_HASH_COLUMNS = ("event_hash", "source_hash")
_CACHE_MODES = {"included_in_input": "i", "separate_from_input": "s"}
_CACHE_CODES = {v: k for k, v in _CACHE_MODES.items()}
COMPRESSED_PRIVATE = ("raw_json",)
# The events columns pack() may change; rollups read none of them (a test checks), so they can
# aggregate packed rows.
PACKED_COLUMNS = ("event_hash", "source_hash", "ts", "ts_sub_ns", "billing_model", "cache_input_mode",
                  "method", "path")


def _sub_ms_nanos(ts: str, ts_ms: int) -> int | None:
    """The nanoseconds below the millisecond that make render_ts rebuild `ts` exactly, else None.

    render_ts writes 'YYYY-MM-DDTHH:MM:SS', then '.' and the nine digits of the millisecond and
    the nanoseconds below it without trailing zeros (none at all when they are all zero), then
    'Z'. Each part is checked against `ts_ms` where it stands, which is cheaper than rendering the
    whole text again and comparing (tests/test_rowpack.py checks the two agree).
    """
    if ts_ms < 0 or len(ts) < 20 or ts[-1] != "Z":
        return None
    if len(ts) == 20:
        digits = ""
    elif ts[19] == "." and len(ts) <= 30 and ts[-2] != "0":
        digits = ts[20:-1]
        if not (digits.isascii() and digits.isdigit()):
            return None
    else:
        return None
    nanos = digits.ljust(9, "0")
    if int(nanos[:3]) != ts_ms % 1000 or ts[:19] != second_text(ts_ms // 1000):
        return None
    return int(nanos[3:])


def _render(ts_ms: int, sub: int) -> str:
    return render_ts(ts_ms, f"{ts_ms % 1000:03d}{sub:06d}")


def _endpoint_parts(endpoint: Any) -> tuple[str | None, str | None]:
    return _split_endpoint(endpoint) if isinstance(endpoint, str) else (None, None)


@lru_cache(maxsize=1024)
def _split_endpoint(endpoint: str) -> tuple[str | None, str | None]:
    match = _ENDPOINT.match(endpoint)
    return (match.group(1), match.group(2)) if match else (None, None)


def pack(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as the events table stores it (a new dict)."""
    out = dict(row)
    if ID_COLUMNS[0] in out:  # a SELECT * of the events view: its label ids go
        for name in ID_COLUMNS:
            out.pop(name, None)
    for name in _HASH_COLUMNS:
        value = out.get(name)
        if isinstance(value, str) and _HEX64.fullmatch(value):
            out[name] = bytes.fromhex(value)
    ts, ts_ms = out.get("ts"), out.get("ts_ms")
    if isinstance(ts, str) and ts and isinstance(ts_ms, int) and not isinstance(ts_ms, bool):
        sub = _sub_ms_nanos(ts, ts_ms)
        if sub is not None:
            out["ts"], out["ts_sub_ns"] = "", sub
    billing = out.get("billing_model")
    if billing and billing == (out.get("resolved_model") or out.get("analytics_model")):
        out["billing_model"] = ""
    mode = out.get("cache_input_mode")
    if mode in _CACHE_MODES:
        out["cache_input_mode"] = _CACHE_MODES[mode]
    method, path = _endpoint_parts(out.get("endpoint"))
    if method is not None:
        if out.get("method") == method:
            out["method"] = ""
        if out.get("path") == path:
            out["path"] = ""
    return out


def unpack(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored events row (all columns, as SELECT * gives them) back to its full values, without
    the view's `lid_` label ids (datasource/interned.py)."""
    out = dict(row)
    if ID_COLUMNS[0] in out:  # a SELECT * of the events view: its label ids go
        for name in ID_COLUMNS:
            out.pop(name, None)
    for name in _HASH_COLUMNS:
        value = out.get(name)
        if isinstance(value, (bytes, memoryview)):
            out[name] = bytes(value).hex()
    sub = out.pop("ts_sub_ns", None)
    if out.get("ts") == "" and isinstance(out.get("ts_ms"), int):
        out["ts"] = _render(out["ts_ms"], sub or 0)
    if "billing_model" in out and out["billing_model"] == "":
        out["billing_model"] = out.get("resolved_model") or out.get("analytics_model")
    mode = out.get("cache_input_mode")
    if mode in _CACHE_CODES:
        out["cache_input_mode"] = _CACHE_CODES[mode]
    method, path = _endpoint_parts(out.get("endpoint"))
    if method is not None:
        if out.get("method") == "":
            out["method"] = method
        if out.get("path") == "":
            out["path"] = path
    return out


def pack_private(row: Mapping[str, Any]) -> dict[str, Any]:
    """An event_private row with its raw JSON zlib-compressed (a BLOB; the other columns stay text)."""
    out = dict(row)
    for name in COMPRESSED_PRIVATE:
        value = out.get(name)
        if isinstance(value, str):
            out[name] = zlib.compress(value.encode("utf-8", "surrogatepass"), 6)
    return out


def private_text(value: Any) -> str | None:
    """A stored event_private value as text (compressed BLOBs are inflated)."""
    if isinstance(value, (bytes, memoryview)):
        return zlib.decompress(bytes(value)).decode("utf-8", "surrogatepass")
    return value


# --- SQL functions for schema step 4 (db._v4), rewriting rows stored before it -----------------


def migrate_ts_sub(ts: Any, ts_ms: Any) -> int | None:
    if isinstance(ts, str) and ts and isinstance(ts_ms, int):
        return _sub_ms_nanos(ts, ts_ms)
    return None


def migrate_endpoint_part(endpoint: Any, part: int) -> str | None:
    return _endpoint_parts(endpoint)[part - 1]


def migrate_compress(value: Any) -> Any:
    return zlib.compress(value.encode("utf-8", "surrogatepass"), 6) if isinstance(value, str) else value
