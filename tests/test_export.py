"""Export line format (pure) and the export -> ingest round trip through the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from datasource import exchange
from datasource.cli import cli
from datasource.db import connect
from datasource.model import Normalized, Rejected

EXAMPLES = Path(__file__).parent / "fixtures" / "cpa_examples.jsonl"
HASH = "9c788605e1c2526821991ed86b583373f23ad411b29052ebe9787b595be7bc60"
ROW = {"id": 17, "event_hash": HASH, "ts_ms": 1778025600000, "ts": "2026-05-06T00:00:00Z",
       "created_ms": 1778025600500, "model": "gpt-test", "input_tokens": 10, "est_cost_usd": 0.25,
       "fail_summary": None}


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def aggregates(db_path: str) -> tuple:
    conn = connect(db_path)
    try:
        return conn.execute(
            "SELECT count(*), sum(input_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cached_tokens), "
            "sum(total_tokens), round(sum(est_cost_usd), 9), sum(failed), group_concat(failure_type) FROM "
            "(SELECT * FROM events ORDER BY ts_ms)"
        ).fetchone()
    finally:
        conn.close()


def test_export_line_drops_the_local_id_and_carries_the_marker():
    line = exchange.to_export_line(ROW)
    assert line == ('{"cpa_monitor_export":1,"event_hash":"' + HASH + '","ts_ms":1778025600000,'
                    '"ts":"2026-05-06T00:00:00Z","created_ms":1778025600500,"model":"gpt-test",'
                    '"input_tokens":10,"est_cost_usd":0.25,"fail_summary":null}')


def test_export_line_reads_back_to_the_same_row_and_ledger_key():
    obj = json.loads(exchange.to_export_line(ROW))
    assert exchange.is_export(obj)
    item = exchange.from_export(obj)
    assert isinstance(item, Normalized)
    assert item.row == {k: v for k, v in ROW.items() if k != "id"}
    assert item.private == {}
    assert item.ledger_hash == bytes.fromhex("9c788605e1c2526821991ed86b583373")


@pytest.mark.parametrize("change, reason", [
    ({"cpa_monitor_export": 2}, "unsupported export version: 2"),
    ({"cpa_monitor_export": True}, "unsupported export version: True"),
    ({"event_hash": None}, "export line: event_hash missing or not str"),
    ({"event_hash": HASH.upper()}, "export line: event_hash is not 64 lowercase hex digits"),
    ({"ts_ms": "1778025600000"}, "export line: ts_ms missing or not int"),
    ({"ts_ms": True}, "export line: ts_ms missing or not int"),
    ({"created_ms": None}, "export line: created_ms missing or not int"),
    ({"model": ["a"]}, "export line: model is not a scalar"),
    ({"flag": False}, "export line: flag is not a scalar"),
    ({"x; DROP TABLE events": 1}, "export line: bad column name 'x; DROP TABLE events'"),
])
def test_bad_export_lines_are_rejected_with_the_reason(change, reason):
    obj = {**json.loads(exchange.to_export_line(ROW)), **change}
    assert exchange.from_export(obj, b"raw") == Rejected(reason, b"raw")


@pytest.mark.parametrize("text, expected", [
    ("2026-05-06T10:00:00.123Z", 1778061600123),
    ("2026-05-06T10:00:00+08:00", 1778032800000),
    ("2026-05-06", 1778025600000),
    ("1778061600", 1778061600000),
    ("1778061600123", 1778061600123),
    ("24h", 1_000_000_000_000 - 86_400_000),
    ("7d", 1_000_000_000_000 - 604_800_000),
    ("90m", 1_000_000_000_000 - 5_400_000),
    ("now", 1_000_000_000_000),
])
def test_time_forms(text, expected):
    assert exchange.parse_time_ms(text, now_ms=1_000_000_000_000) == expected


def test_bad_times_and_durations_raise():
    with pytest.raises(ValueError, match="not a time"):
        exchange.parse_time_ms("yesterday", now_ms=0)
    with pytest.raises(ValueError, match="not a duration"):
        exchange.parse_duration_ms("30 days")
    assert exchange.parse_duration_ms("30d") == 2_592_000_000
    assert exchange.parse_duration_ms("500ms") == 500


def test_reader_handles_blank_lines_crlf_and_a_missing_final_newline():
    data = b'\r\n  \n{"a":1}\r\n\n{"b":2}'
    records = list(exchange.read_records(io.BytesIO(data)))
    assert records == [exchange.Record(b'{"a":1}', {"a": 1}), exchange.Record(b'{"b":2}', {"b": 2})]


def test_reader_rejects_invalid_utf8_and_keeps_going():
    records = list(exchange.read_records(io.BytesIO(b'\xff\xfe{}\n{"a":1}\n')))
    assert records[0] == Rejected("not UTF-8: invalid start byte at byte 0", b"\xff\xfe{}")
    assert records[1] == exchange.Record(b'{"a":1}', {"a": 1})


def test_reader_reads_consecutive_arrays_and_stops_at_trailing_garbage():
    records = list(exchange.read_records(io.BytesIO(b'[{"a":1}]\n[{"b":2}, 3] tail')))
    assert records == [exchange.Record(b'{"a":1}', {"a": 1}), exchange.Record(b'{"b":2}', {"b": 2}),
                       Rejected("not a JSON object: number", b"3"),
                       Rejected("unexpected data after JSON array", b"tail")]


def test_reader_rejects_an_oversized_array_item_that_spans_chunks():
    big = {"x": "y" * 200_000}
    data = json.dumps([big, {"a": 1}]).encode()
    records = list(exchange.read_records(io.BytesIO(data), max_item_bytes=100_000))
    assert records == [Rejected("array item longer than 100000 bytes", data[1:65537])]


def test_export_round_trip_same_db_stores_nothing_and_empty_db_matches(tmp_path):
    first, second = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    assert run("ingest", str(EXAMPLES), "--db", first).stdout == "inserted 3, duplicates 0, dead letters 0\n"
    exported = run("export", "--db", first).stdout
    assert len(exported.splitlines()) == 3
    dump = tmp_path / "export.jsonl"
    dump.write_text(exported)
    same = run("ingest", str(dump), "--db", first)
    assert same.stdout == "inserted 0, duplicates 3, dead letters 0\n"
    fresh = run("ingest", str(dump), "--db", second)
    assert fresh.stdout == "inserted 3, duplicates 0, dead letters 0\n"
    assert aggregates(second) == aggregates(first)
    assert aggregates(first)[:3] == (3, 12000, 850)
    assert run("export", "--db", second).stdout == exported
    raw_again = run("ingest", str(EXAMPLES), "--db", second)
    assert raw_again.stdout == "inserted 0, duplicates 3, dead letters 0\n"


def test_export_time_window_and_filters(tmp_path, db_path):
    run("ingest", str(EXAMPLES), "--db", db_path)
    def ids(*args: str) -> list[str]:
        out = run("export", "--db", db_path, *args).stdout
        return [json.loads(line)["request_id"] for line in out.splitlines()]
    assert ids() == ["a1b2c3d4", "e5f6a7b8", "0c0ffee1"]
    assert ids("--from", "2026-05-06T02:20:00.5Z") == ["e5f6a7b8", "0c0ffee1"]
    assert ids("--to", "2026-05-06T02:20:00.5Z") == ["a1b2c3d4"]
    assert ids("--from", "1778034000500", "--to", "2026-05-06T02:30:12Z") == ["e5f6a7b8"]
    assert ids("--model", "gpt-5.4") == ["a1b2c3d4", "e5f6a7b8"]
    assert ids("--model", "gpt-5.4(high)") == ["a1b2c3d4"]
    assert ids("--account", "7aa0c3f19e2b4d88") == ["0c0ffee1"]
    assert ids("--api-key", "sk******02") == ["e5f6a7b8"]
    assert ids("--api-key", "faa210d78e64b975e87ea4585883b7f8c8d5b0c95719a5d70ba0c3a348bc5e24") == ["a1b2c3d4"]
    assert ids("--provider", "codex", "--instance", "default") == ["a1b2c3d4", "e5f6a7b8", "0c0ffee1"]
    assert ids("--instance", "other") == []
    out = tmp_path / "out.jsonl"
    run("export", "--db", db_path, "--model", "gpt-5.4-mini", "-o", str(out))
    assert [json.loads(line)["request_id"] for line in out.read_text().splitlines()] == ["0c0ffee1"]


def test_export_rejects_a_bad_time(db_path):
    result = run("export", "--from", "last tuesday", "--db", db_path)
    assert result.exit_code == 2
    assert "not a time" in result.stderr
