"""Planted secrets: after ingest no secret is in any API-readable table, nor in `export` output."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from datasource.cli import cli
from datasource.db import connect

PLANTED = Path(__file__).parent / "fixtures" / "planted_secrets.jsonl"
PRIVATE_TABLES = {"event_private", "credential_error_private", "dead_letters"}

# Each string is planted exactly once in the fixture; every one is a secret or a client address.
SECRETS = {
    "caller api_key (success)": "sk-callerPLANTEDapikey0002xyz",
    "caller api_key (401)": "sk-callerPLANTEDapikey0012xyz",
    "source: raw upstream sk- key": "sk-upstreamPLANTEDsource0001abcdefgh",
    "source: email": "planted.source.PLANTED0011@mail-example.org",
    "source: email local part": "planted.source.PLANTED0011",
    "header Set-Cookie": "PLANTEDsetcookie0003",
    "header Authorization": "PLANTEDauthheader0004token",
    "header value with an sk- key": "sk-PLANTEDheaderkey0005abcdef",
    "header Cookie": "PLANTEDcookieheader0013",
    "failure header Set-Cookie": "PLANTEDsetcookie0014",
    "failure header Authorization": "PLANTEDauthheader0015token",
    "failure header value with an sk- key": "sk-PLANTEDheaderkey0016abcdef",
    "body Bearer token": "PLANTEDbearer0006tokenvalue",
    "body sk-ant key": "sk-ant-api03-PLANTEDanthropic0007key",
    "body sk-ant key tail": "PLANTEDanthropic0007key",
    "body email": "leaked.person.PLANTED0008@corp-example.net",
    "body email local part": "leaked.person.PLANTED0008",
    "body cookie": "PLANTEDcookie0009value",
    "body api_key field": "PLANTEDapikeyfield0010value",
    "client ip": "198.51.100.77",
    "x-forwarded-for": "203.0.113.99",
}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def leaks(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret in text]


def test_every_secret_is_actually_planted_in_the_input():
    raw = PLANTED.read_text()
    assert leaks(raw) == list(SECRETS)


def _table_dump(conn, table: str) -> str:
    """Every value of every row of a table as text (BLOBs decoded leniently)."""
    parts = []
    for row in conn.execute(f'SELECT * FROM "{table}"'):
        for value in row:
            parts.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    return "\n".join(parts)


def test_no_secret_in_any_readable_table_or_in_export(db_path):
    result = run("ingest", str(PLANTED), "--db", db_path)
    assert result.stdout == "inserted 2, duplicates 0, dead letters 0\n"
    conn = connect(db_path)
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    # events is a view over event_rows, whose labels are in event_strings (schema step 12): all three dumped
    assert {"events", "event_rows", "event_strings", "event_private", "event_ledger", "dead_letters",
            "accounts"} <= set(tables)
    found = {t: leaks(_table_dump(conn, t)) for t in tables if t not in PRIVATE_TABLES}
    assert found == {t: [] for t in tables if t not in PRIVATE_TABLES}
    assert conn.execute("SELECT count(*) FROM events").get == 2

    exported = run("export", "--db", db_path).stdout
    assert len(exported.splitlines()) == 2
    assert leaks(exported) == []
    for line in exported.splitlines():
        assert "client_ip" not in json.loads(line) and "fail_body" not in json.loads(line)

    body = conn.execute(
        "SELECT p.fail_body FROM event_private p JOIN events e ON e.id = p.event_id WHERE e.status_code = 401").get
    conn.close()
    assert "PLANTEDbearer0006tokenvalue" in body
    assert "sk-ant-api03-PLANTEDanthropic0007key" in body
    assert "leaked.person.PLANTED0008@corp-example.net" in body


def test_masked_identities_are_still_useful(db_path):
    run("ingest", str(PLANTED), "--db", db_path)
    conn = connect(db_path)
    rows = conn.execute("SELECT source, api_key_masked, length(api_key_hash), typeof(source_hash), "
                        "length(source_hash) FROM events ORDER BY ts_ms").fetchall()
    conn.close()
    # api_key_hash is 64 hex characters; source_hash is stored as its 32 raw bytes (datasource/rowpack.py)
    assert rows == [("m:sk-u...efgh", "sk******yz", 64, "blob", 32),
                    ("pla***@mail-example.org", "sk******yz", 64, "blob", 32)]


def test_dead_letters_keep_the_payload_for_diagnosis(tmp_path, db_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"api_key": "sk-deadPLANTED0099", "tokens": \n')
    assert run("ingest", str(source), "--db", db_path).stdout == "inserted 0, duplicates 0, dead letters 1\n"
    conn = connect(db_path)
    assert conn.execute("SELECT payload FROM dead_letters").get == b'{"api_key": "sk-deadPLANTED0099", "tokens": '
    conn.close()
