"""Auth-file rows, the auth-files cache and credential error parsing (pure parts of accounts.py)."""

from __future__ import annotations

import pytest

from datasource.accounts import AccountDirectory, account_row, parse_credential_error, parse_time_ms
from datasource.upstream import ConfigRefused, check_poll_interval, retention_from_config


def test_oauth_entry_becomes_an_account_row():
    entry = {"id": "alice.json", "auth_index": "9f2c4e1a7b3d5c60", "name": "alice.json", "type": "codex",
             "email": "alice@example.com", "status": "active", "disabled": False, "unavailable": False,
             "projectId": "proj-1"}
    assert account_row(entry) == {
        "auth_index": "9f2c4e1a7b3d5c60", "name": "alice.json", "label": "alice.json",
        "account": "alice@example.com", "provider": "codex", "project_id": "proj-1", "status": "active",
        "status_message": None, "disabled": 0, "unavailable": 0}


def test_api_key_entry_never_uses_the_raw_key_as_account():
    entry = {"auth_index": "0123456789abcdef", "name": "openai-compat-1", "provider": "OpenRouter",
             "account": "sk-or-v1-0123456789abcdef0123456789abcdef", "label": "team key", "disabled": True}
    row = account_row(entry)
    assert (row["account"], row["label"], row["provider"]) == ("team key", "team key", "openrouter")
    assert (row["status"], row["disabled"]) == ("disabled", 1)


def test_masked_emails_on_request_and_entries_without_index_skipped():
    entry = {"auth_index": "a1", "email": "alice@example.com", "label": "alice@example.com"}
    row = account_row(entry, mask_emails=True)
    assert (row["account"], row["label"]) == ("ali***@example.com", "ali***@example.com")
    assert account_row({"name": "orphan.json"}) is None


def test_directory_caches_for_ttl_and_refresh_invalidates():
    clock = [1000.0]
    calls: list[int] = []

    def fetch():
        calls.append(1)
        return [{"auth_index": "a1", "name": "a.json"}]

    directory = AccountDirectory(fetch, 30, now=lambda: clock[0])
    assert directory.due()
    assert [r["name"] for r in directory.fetch()] == ["a.json"]
    clock[0] += 29.9
    assert not directory.due()
    directory.invalidate()
    assert directory.due()
    directory.fetch()
    clock[0] += 30
    assert directory.due() and len(calls) == 2


def test_directory_fetch_failure_keeps_going():
    def fetch():
        raise OSError("connection refused")

    directory = AccountDirectory(fetch, 30, now=lambda: 5.0)
    assert directory.fetch() is None
    assert directory.last_error == "connection refused"
    assert not directory.due()  # the next try waits a full TTL


def test_time_parsing_handles_go_nanoseconds_offsets_and_zero_time():
    assert parse_time_ms("2026-05-06T10:15:30.123456789+08:00") == 1778033730123
    assert parse_time_ms("2026-05-06T02:20:00.5Z") == 1778034000500
    assert parse_time_ms("0001-01-01T00:00:00Z") is None
    assert parse_time_ms(1778034000) == 1778034000000
    assert parse_time_ms("soon") is None


def test_credential_error_without_auth_status():
    raw = b'{"timestamp":"2026-05-06T02:30:12Z","provider":"claude","status_code":401,"body":"token revoked"}'
    row, body = parse_credential_error(raw, "eu", now_ms=5)
    assert (row["ts_ms"], row["instance"], row["provider"], row["status_code"]) == (1778034612000, "eu", "claude", 401)
    assert (row["auth_index"], row["account_key"], row["quota_exceeded"], row["next_retry_after_ms"]) == \
        (None, "-", None, None)
    assert (row["summary"], body, row["created_ms"]) == ("token revoked", "token revoked", 5)
    assert parse_credential_error(b"[1,2]", "eu", 5) is None
    assert parse_credential_error(b"nope", "eu", 5) is None


def test_retention_rules_and_poll_interval_check():
    assert retention_from_config({}) == 60
    assert retention_from_config({"redis-usage-queue-retention-seconds": 0}) == 60
    assert retention_from_config({"redis-usage-queue-retention-seconds": 7200}) == 3600
    assert retention_from_config({"redis-usage-queue-retention-seconds": 120}) == 120
    check_poll_interval(59_999, 60)
    with pytest.raises(ConfigRefused, match="poll interval 60000 ms is not shorter"):
        check_poll_interval(60_000, 60)
