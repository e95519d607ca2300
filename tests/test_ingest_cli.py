"""`cpa-monitor migrate / ingest / prune / backup` end to end on real SQLite files."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from datasource.cli import cli
from datasource.cmd_store import ingest_stream
from datasource.db import SCHEMA_VERSION, connect, open_database

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = FIXTURES / "cpa_examples.jsonl"


def run(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def payload(n: int, ts: str = "2026-05-06T00:00:00Z", **extra) -> dict:
    return {"timestamp": ts, "request_id": f"r{n:04d}", "endpoint": "POST /v1/chat/completions",
            "model": "gpt-test", "provider": "openai", "auth_index": "a1", "source": "",
            "api_key": "", "tokens": {"input_tokens": n, "output_tokens": 1}, "failed": False,
            "fail": {"status_code": 200, "body": ""}, **extra}


def scalar(db_path: str, sql: str):
    conn = connect(db_path)
    try:
        return conn.execute(sql).get
    finally:
        conn.close()


def test_migrate_creates_the_database(db_path):
    result = run("migrate", "--db", db_path)
    assert result.exit_code == 0
    assert result.stdout == f"{db_path}: schema version {SCHEMA_VERSION}\n"
    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION


def test_migrate_refuses_a_newer_database(db_path):
    conn = connect(db_path)
    conn.pragma("user_version", SCHEMA_VERSION + 1)
    conn.close()
    result = run("migrate", "--db", db_path)
    assert result.exit_code == 1
    assert "newer than this CPA Monitor understands" in result.stderr


def test_ingesting_the_same_file_twice_stores_nothing_the_second_time(db_path):
    first = run("ingest", str(EXAMPLES), "--db", db_path)
    assert (first.exit_code, first.stdout) == (0, "inserted 3, duplicates 0, dead letters 0\n")
    second = run("ingest", str(EXAMPLES), "--db", db_path)
    assert (second.exit_code, second.stdout) == (0, "inserted 0, duplicates 3, dead letters 0\n")
    assert scalar(db_path, "SELECT count(*) FROM events") == 3
    assert scalar(db_path, "SELECT sum(input_tokens) FROM events") == 12000
    assert scalar(db_path, "SELECT group_concat(failure_type, ',') FROM (SELECT failure_type FROM events ORDER BY ts_ms)") \
        == "none,quota,auth"


def test_malformed_lines_become_dead_letters_and_valid_lines_around_them_are_stored(tmp_path, db_path):
    lines = [
        json.dumps(payload(1)),
        "this is not json",
        json.dumps(payload(2)),
        "[1, 2, 3]",
        '"just a string"',
        "42",
        json.dumps(payload(3)),
        json.dumps(payload(4))[:40],  # truncated
        '{"big": "' + "x" * (10 * 1024 * 1024) + '"}',  # a 10 MB line
        json.dumps(payload(5)),
        '{"support_refresh":true}',  # control: neither stored nor a dead letter
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = run("ingest", str(source), "--db", db_path)
    assert (result.exit_code, result.stdout) == (0, "inserted 4, duplicates 0, dead letters 6\n")
    conn = connect(db_path)
    stored = [r[0] for r in conn.execute("SELECT request_id FROM events ORDER BY id")]
    reasons = [r[0] for r in conn.execute("SELECT reason FROM dead_letters ORDER BY id")]
    payloads = [r[0] for r in conn.execute("SELECT payload FROM dead_letters ORDER BY id")]
    origins = {r[0] for r in conn.execute("SELECT origin FROM dead_letters")}
    conn.close()
    assert stored == ["r0001", "r0002", "r0003", "r0005"]
    assert origins == {f"ingest:{source}"}
    assert reasons[0].startswith("invalid JSON: Expecting value")
    assert reasons[1:4] == ["not a JSON object: array", "not a JSON object: string", "not a JSON object: number"]
    assert reasons[4].startswith("invalid JSON: Unterminated string")
    assert reasons[5] == f"item longer than 1048576 bytes ({10 * 1024 * 1024 + 11} bytes)"
    assert payloads[:4] == [b"this is not json", b"[1, 2, 3]", b'"just a string"', b"42"]
    assert len(payloads[5]) == 65536 and payloads[5].startswith(b'{"big": "xxx')


def test_http_queue_array_with_embedded_objects_and_string_items(tmp_path, db_path):
    items = [payload(1), json.dumps(payload(2)), None, "", "not json", 7, payload(3), {"refresh": True}]
    source = tmp_path / "queue.json"
    source.write_text(json.dumps(items, indent=1))
    result = run("ingest", str(source), "--db", db_path)
    assert (result.exit_code, result.stdout) == (0, "inserted 3, duplicates 0, dead letters 2\n")
    assert scalar(db_path, "SELECT sum(input_tokens) FROM events") == 6
    assert scalar(db_path, "SELECT group_concat(reason, '|') FROM dead_letters") == (
        "invalid JSON: Expecting value: line 1 column 1 (char 0)|not a JSON object: number")


def test_a_broken_json_array_keeps_the_items_before_the_break(tmp_path, db_path):
    source = tmp_path / "broken.json"
    source.write_text("[" + json.dumps(payload(1)) + ", " + json.dumps(payload(2))[:30])
    result = run("ingest", str(source), "--db", db_path)
    assert (result.exit_code, result.stdout) == (0, "inserted 1, duplicates 0, dead letters 1\n")
    assert scalar(db_path, "SELECT reason FROM dead_letters").startswith("invalid JSON array: ")


def test_ingest_reads_stdin_and_tags_the_instance(db_path):
    data = "\n".join(json.dumps(payload(n)) for n in range(1, 4)) + "\n"
    result = run("ingest", "-", "--instance", "east", "--db", db_path, input=data)
    assert (result.exit_code, result.stdout) == (0, "inserted 3, duplicates 0, dead letters 0\n")
    assert scalar(db_path, "SELECT group_concat(DISTINCT instance) FROM events") == "east"


def test_ingest_commits_once_per_batch(conn):
    data = "".join(json.dumps(payload(n)) + "\n" for n in range(1, 1201)).encode()
    commits: list[int] = []
    conn.set_commit_hook(lambda: commits.append(1) or False)
    result = ingest_stream(conn, io.BytesIO(data), origin="test", batch_size=500)
    conn.set_commit_hook(None)
    assert (result.inserted, result.duplicates, result.dead_letters) == (1200, 0, 0)
    assert result.inserted_ids == []
    assert len(commits) == 3


def test_ingest_of_a_missing_file_fails_with_usage_error(db_path, tmp_path):
    result = run("ingest", str(tmp_path / "nope.jsonl"), "--db", db_path)
    assert result.exit_code == 2
    assert "No such file or directory" in result.stderr


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def test_prune_uses_the_retention_setting_and_keeps_the_ledger(tmp_path, db_path):
    now_ms = int(time.time() * 1000)
    day = 86_400_000
    ages = {1: 40, 2: 31, 3: 29, 4: 1}
    source = tmp_path / "aged.jsonl"
    source.write_text("".join(json.dumps(payload(n, ts=_iso(now_ms - age * day))) + "\n" for n, age in ages.items()))
    assert run("ingest", str(source), "--db", db_path).stdout == "inserted 4, duplicates 0, dead letters 0\n"
    result = run("prune", "--db", db_path)
    assert result.exit_code == 0
    assert result.stdout.startswith("pruned 2 events older than ")
    assert scalar(db_path, "SELECT group_concat(request_id) FROM (SELECT request_id FROM events ORDER BY id)") \
        == "r0003,r0004"
    assert run("prune", "--older-than", "2d", "--db", db_path).stdout.startswith("pruned 1 events")
    again = run("ingest", str(source), "--db", db_path)
    assert again.stdout == "inserted 0, duplicates 4, dead letters 0\n"
    assert run("prune", "--retention-days", "0", "--db", db_path).stdout.startswith("pruned 1 events")


def test_prune_rejects_a_bad_age(db_path):
    result = run("prune", "--older-than", "soon", "--db", db_path)
    assert result.exit_code == 2
    assert "not a duration" in result.stderr


def test_backup_command_copies_everything(tmp_path, db_path):
    run("ingest", str(EXAMPLES), "--db", db_path)
    dest = tmp_path / "backup" / "copy.db"
    dest.parent.mkdir()
    result = run("backup", str(dest), "--db", db_path)
    assert (result.exit_code, result.stdout) == (0, f"backed up {db_path} to {dest}\n")
    copy = open_database(str(dest))
    assert copy.execute("SELECT count(*), sum(input_tokens) FROM events").fetchone() == (3, 12000)
    assert copy.execute("SELECT count(*) FROM event_ledger").get == 3
    copy.close()
    again = run("ingest", str(EXAMPLES), "--db", str(dest))
    assert again.stdout == "inserted 0, duplicates 3, dead letters 0\n"


def test_backup_onto_the_database_itself_fails_cleanly(db_path):
    run("migrate", "--db", db_path)
    result = run("backup", db_path, "--db", db_path)
    assert result.exit_code == 1
    assert "backup failed: backup destination is the database itself" in result.stderr
