"""The export line format both ways, and the time/duration syntax of the store commands.

Pure: no files, sockets or clock; callers pass `now_ms`. An export line is one
JSON object: the marker key `cpa_monitor_export` (the format version, 1) plus
the sanitized events row (every column but the local `id`), `event_hash`
included, so re-importing a line claims the same dedup ledger entry.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, Iterator, Mapping

from datasource.model import Normalized, Rejected
from datasource.normalize import fast_decode, plain_json_text

EXPORT_MARKER = "cpa_monitor_export"
EXPORT_VERSION = 1

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COLUMN = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_REQUIRED = {"event_hash": str, "ts_ms": int, "ts": str, "created_ms": int}
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"(\d+)\s*(ms|s|m|h|d|w)")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def ledger_key(event_hash: str) -> bytes:
    """The dedup ledger key of an event: the first 16 bytes of its sha256 event hash."""
    return bytes.fromhex(event_hash)[:16]


def to_export_line(row: Mapping[str, Any]) -> str:
    """One JSON line (no newline) for an events row; `id` is local and left out."""
    out: dict[str, Any] = {EXPORT_MARKER: EXPORT_VERSION}
    out.update((k, v) for k, v in row.items() if k != "id")
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def is_export(obj: object) -> bool:
    return isinstance(obj, dict) and EXPORT_MARKER in obj


def from_export(obj: Mapping[str, Any], raw: bytes = b"") -> Normalized | Rejected:
    """An export line back to a Normalized event (no private part), or why it cannot be one."""
    if obj.get(EXPORT_MARKER) != EXPORT_VERSION or isinstance(obj.get(EXPORT_MARKER), bool):
        return Rejected(f"unsupported export version: {obj.get(EXPORT_MARKER)!r}", raw)
    for name, kind in _REQUIRED.items():
        value = obj.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return Rejected(f"export line: {name} missing or not {kind.__name__}", raw)
    if not _HEX64.fullmatch(obj["event_hash"]):
        return Rejected("export line: event_hash is not 64 lowercase hex digits", raw)
    row: dict[str, Any] = {}
    for key, value in obj.items():
        if key in (EXPORT_MARKER, "id"):
            continue
        if not _COLUMN.fullmatch(key):
            return Rejected(f"export line: bad column name {key[:64]!r}", raw)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
            return Rejected(f"export line: {key} is not a scalar", raw)
        row[key] = value
    return Normalized(row=row, private={}, ledger_hash=ledger_key(obj["event_hash"]))


def parse_duration_ms(text: str) -> int:
    """`30d`, `24h`, `90m`, `45s`, `500ms`, `2w` -> milliseconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"not a duration (use e.g. 30d, 24h, 90m): {text!r}")
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_time_ms(text: str, *, now_ms: int) -> int:
    """A point in time as UTC epoch ms.

    Accepts `now`, a relative age (`24h`, `7d`: that long before now), an epoch
    number (below 1e10 it counts as seconds, like CPA timestamps, else ms) or
    ISO-8601 (`2026-05-06`, `2026-05-06T10:00:00+08:00`; no offset means UTC).
    """
    value = text.strip()
    if value.lower() == "now":
        return now_ms
    if value.isdigit():
        number = int(value)
        return number * 1000 if number < 10_000_000_000 else number
    if _DURATION.fullmatch(value.lower()):
        return now_ms - parse_duration_ms(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a time (use ISO-8601, epoch ms or 24h/7d): {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return (parsed - _EPOCH) // timedelta(milliseconds=1)


# --- reading ingest input ------------------------------------------------------
# JSON Lines (raw CPA payloads or export lines), or JSON arrays as CPA's HTTP
# queue returns them: objects embedded raw, items CPA could not embed as JSON
# strings. Read in chunks, so a huge file is never held in memory.

MAX_ITEM_BYTES = 1_048_576
DEAD_LETTER_KEEP_BYTES = 65_536
_CHUNK = 65_536
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class Record:
    """One input item that decoded to a JSON object, with its raw bytes."""

    raw: bytes
    obj: dict[str, Any]
    plain: bool = field(default=False, compare=False)  # normalize.plain_json_text of obj's text


def read_records(stream: BinaryIO, *, max_item_bytes: int = MAX_ITEM_BYTES) -> Iterator[Record | Rejected]:
    """Records and rejects from a binary stream, in input order.

    A stream whose first non-blank byte is `[` holds JSON arrays; anything else
    is JSON Lines. Blank lines, nulls and blank strings are skipped.
    """
    head = stream.read(1)
    while head and head in _WHITESPACE:
        head = stream.read(1)
    if head == b"[":
        yield from _array_records(stream, head.decode(), max_item_bytes)
    elif head:
        yield from _line_records(stream, head, max_item_bytes)


def classify(raw: bytes, text: str | None = None) -> Record | Rejected | None:
    """One item: a Record for a JSON object, None for a blank item, else a reject with the reason."""
    if text is None:
        fast = fast_decode(raw)  # not when given the text: raw may then be its lossy encoding
        if fast is not None and isinstance(fast[0], dict):
            return Record(raw, fast[0], fast[1])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected(f"not UTF-8: {exc.reason} at byte {exc.start}", raw)
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        return Rejected(f"invalid JSON: {exc}", raw)
    if not isinstance(value, dict):
        return Rejected(f"not a JSON object: {_json_kind(value)}", raw)
    return Record(raw, value, plain_json_text(text))


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {list: "array", str: "string", bool: "boolean"}.get(type(value), "number")


def _line_records(stream: BinaryIO, head: bytes, limit: int) -> Iterator[Record | Rejected]:
    line = head + stream.readline(limit)
    while line:
        if len(line) > limit and not line.endswith(b"\n"):
            yield _oversize(line, stream, limit)
        else:
            item = classify(line.rstrip(b"\r\n"))
            if item is not None:
                yield item
        line = stream.readline(limit + 1)


def _oversize(prefix: bytes, stream: BinaryIO, limit: int) -> Rejected:
    """Skip the rest of an over-long line; keep its start for the dead letter."""
    size = len(prefix)
    chunk = prefix
    while chunk and not chunk.endswith(b"\n"):
        chunk = stream.readline(_CHUNK)
        size += len(chunk)
    size -= 1 if chunk.endswith(b"\n") else 0
    return Rejected(f"item longer than {limit} bytes ({size} bytes)", prefix[:DEAD_LETTER_KEEP_BYTES])


def _array_records(stream: BinaryIO, buf: str, limit: int) -> Iterator[Record | Rejected]:
    decoder = json.JSONDecoder()
    reader = _TextChunks(stream)
    pos, depth_open = 1, True  # just past the top-level '['
    while True:
        if pos > _CHUNK:
            buf, pos = buf[pos:], 0
        buf, pos = reader.skip_space(buf, pos)
        if pos >= len(buf):
            if depth_open:
                yield Rejected("truncated JSON array", b"")
            return
        char = buf[pos]
        if not depth_open:
            if char != "[":
                yield Rejected("unexpected data after JSON array", _keep(buf[pos:]))
                return
            depth_open, pos = True, pos + 1
            continue
        if char in ",]":
            depth_open = char == ","
            pos += 1
            continue
        buf, pos, outcome, fatal = reader.decode_value(decoder, buf, pos, limit)
        if outcome is not None:
            yield outcome
        if fatal:
            return


def _keep(text: str) -> bytes:
    return text.encode("utf-8", "replace")[:DEAD_LETTER_KEEP_BYTES]


class _TextChunks:
    """UTF-8 text from a binary stream in chunks, for the array reader."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.eof = False

    def more(self) -> str:
        data = self.stream.read(_CHUNK)
        if not data:
            self.eof = True
        return self.decoder.decode(data, final=not data)

    def skip_space(self, buf: str, pos: int) -> tuple[str, int]:
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or self.eof:
                return buf, pos
            buf, pos = buf[pos:] + self.more(), 0

    def decode_value(
        self, decoder: json.JSONDecoder, buf: str, pos: int, limit: int
    ) -> tuple[str, int, Record | Rejected | None, bool]:
        """Decode one array element at pos, reading more input while it is incomplete.

        The flag is true when the rest of the array cannot be read.
        """
        while True:
            error: ValueError | None = None
            try:
                value, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or self.eof:
                    break
            except ValueError as exc:
                error = exc
            if error is not None and self.eof:
                return buf, len(buf), Rejected(f"invalid JSON array: {error}", _keep(buf[pos:])), True
            if len(buf) - pos > limit:
                return buf, len(buf), Rejected(f"array item longer than {limit} bytes", _keep(buf[pos:])), True
            buf = buf + self.more()
        raw = buf[pos:end].encode("utf-8", "replace")
        if len(raw) > limit:
            reason = f"item longer than {limit} bytes ({len(raw)} bytes)"
            return buf, end, Rejected(reason, raw[:DEAD_LETTER_KEEP_BYTES]), False
        if isinstance(value, dict):
            return buf, end, Record(raw, value), False
        if isinstance(value, str):
            return buf, end, classify(value.encode("utf-8", "replace"), value), False
        if value is None:
            return buf, end, None, False
        return buf, end, Rejected(f"not a JSON object: {_json_kind(value)}", raw), False
