"""Shared pieces of the collector tests: CPA-shaped events, polling, DB counts, a service factory."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from dataclasses import replace
from typing import Any, Callable

from datasource.collector import CollectorService, Timing
from datasource.config import Settings
from datasource.db import connect

KEY = "mgmt-secret"
BASE_S = int(time.time()) - 3600  # recent: the collector's retention prune must keep test events
FAST = Timing(backoff_initial_s=0.2, backoff_max_s=1.0, auth_backoff_s=2.0, keepalive_s=30.0,
              read_timeout_s=0.2, drain_interval_s=0.5, lock_retry_s=0.3, connect_timeout_s=3.0)


def event(i: int, auth_index: str = "9f2c4e1a7b3d5c60") -> bytes:
    """A CPA usage event (success, codex) that is unique per `i`."""
    return json.dumps({
        "timestamp": datetime.fromtimestamp(BASE_S + i / 100, timezone.utc).isoformat().replace("+00:00", "Z"),
        "latency_ms": 800 + i % 100, "ttft_ms": 120, "source": "alice@example.com", "auth_index": auth_index,
        "client_ip": "192.0.2.10", "x_forwarded_for": "", "user_agent": "codex_cli_rs/0.50.0",
        "tokens": {"input_tokens": 100, "output_tokens": 20, "reasoning_tokens": 0, "cached_tokens": 0,
                   "cache_read_tokens": 0, "cache_read_tokens_present": True, "cache_creation_tokens": 0,
                   "total_tokens": 120},
        "failed": False, "generate": True, "fail": {"status_code": 200, "body": ""}, "accounting_version": 2,
        "provider": "codex", "executor_type": "CodexExecutor", "model": "gpt-5.4", "alias": "gpt-5.4",
        "endpoint": "POST /v1/responses", "auth_type": "oauth", "api_key": "sk-client-demo-0001",
        "request_id": f"r{i:07d}", "reasoning_effort": "", "service_tier": "",
    }, separators=(",", ":")).encode()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def query(db: str, sql: str, params: tuple = ()) -> list[tuple]:
    conn = connect(db, readonly=True)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def scalar(db: str, sql: str, params: tuple = ()) -> Any:
    rows = query(db, sql, params)
    return rows[0][0] if rows else None


def event_count(db: str) -> int:
    try:
        return int(scalar(db, "SELECT count(*) FROM events"))
    except Exception:  # the file does not exist or is not migrated yet
        return 0


def request_ids(db: str) -> list[str]:
    return [r[0] for r in query(db, "SELECT request_id FROM events ORDER BY request_id")]


def status(db: str, instance: str = "default") -> dict[str, Any]:
    from datasource.store_status import read_status
    try:
        conn = connect(db, readonly=True)
    except Exception:  # the file does not exist yet
        return {}
    try:
        return next((r for r in read_status(conn) if r["instance"] == instance), {})
    except Exception:  # not migrated yet
        return {}
    finally:
        conn.close()


def settings_for(base: Settings, url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = dict(cpa_url=url, cpa_management_key=KEY, collector="on", batch_size=100,
                                  poll_interval_ms=100, auth_files_ttl_s=3600)
    values.update(changes)
    return replace(base, **values)


def service(settings: Settings, timing: Timing = FAST) -> CollectorService:
    svc = CollectorService(settings, timing=timing)
    svc.start()
    return svc


def store_events(db: str, first: int, count: int, *, optimize: bool = True) -> None:
    """Store event(first) .. event(first + count - 1) straight through insert_batch (no collector);
    optimize=False opens as the collector does (no PRAGMA optimize: statistics stay stale)."""
    from datasource import store
    from datasource.db import open_database
    from datasource.normalize import normalize
    conn = open_database(db, optimize=optimize)
    try:
        store.insert_batch(conn, [normalize(event(i), instance="default") for i in range(first, first + count)],
                           origin="test")
    finally:
        conn.close()
