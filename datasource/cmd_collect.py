"""`cpa-monitor collect` (the collector alone, in the foreground) and `cpa-monitor status`."""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime
from typing import Any

import click

from datasource.cmd_common import settings_options
from datasource.collector import CollectorService, validate
from datasource.config import Settings
from datasource.db import connect, open_database
from datasource.lock import is_locked, lock_path, read_holder
from datasource.sources import HttpManagement, SourceError
from datasource.store import StoreError
from datasource.store_status import read_status
from datasource.upstream import ConfigRefused, check_poll_interval, retention_from_config

logger = logging.getLogger(__name__)


def preflight(settings: Settings) -> None:
    """Refuse at start-up what cannot work; CPA's config is read once per upstream when allowed."""
    validate(settings)
    for name, url in settings.upstreams():
        try:
            config = HttpManagement(url, settings.management_key(), timeout_s=5.0).config()
        except SourceError as exc:
            logger.info("%s: CPA config not readable at start-up (%s)", name, exc)
            continue
        check_poll_interval(settings.poll_interval_ms, retention_from_config(config))


@click.command("collect")
@settings_options
def collect(settings: Settings) -> None:
    """Run the collector alone in the foreground (until SIGTERM or Ctrl-C)."""
    try:
        preflight(settings)
    except (ValueError, ConfigRefused) as exc:
        raise click.ClickException(str(exc)) from exc
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    service = CollectorService(settings)
    service.start()
    logger.info("collector started for %s", ", ".join(f"{n}={u}" for n, u in settings.upstreams()))
    while not done.wait(1.0):
        pass
    logger.info("stopping: finishing the current batch")
    service.stop(timeout=30.0)


def _when(ms: Any) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _publishing(value: Any) -> str:
    return "unknown" if value is None else ("on" if value else "OFF")


def format_status(rows: list[dict[str, Any]], now_ms: int) -> list[str]:
    """The status table as text lines (one block per upstream)."""
    if not rows:
        return ["no collector has reported yet"]
    lines = []
    for row in rows:
        lag = "-" if not row["last_consumed_ms"] else f"{(now_ms - row['last_consumed_ms']) / 1000:.0f} s"
        lines += [
            f"{row['instance']}  {row['url'] or '-'}",
            f"  state {row['state']}  transport {row['transport'] or '-'}  mode {row['mode'] or '-'}",
            f"  last consumed {_when(row['last_consumed_ms'])} (lag {lag})  last inserted {_when(row['last_inserted_ms'])}",
            f"  inserted {row['inserted']}  duplicates {row['duplicates']}  dead letters {row['dead_letters']}",
            f"  usage publishing {_publishing(row['usage_publishing'])}  queue retention "
            f"{row['queue_retention_s'] or '-'} s",
        ]
        if row["last_error"]:
            lines.append(f"  last error [{row['last_error_stage']}] {_when(row['last_error_ms'])}: {row['last_error']}")
        lines += [f"  warning: {w}" for w in row["warnings"]]
    return lines


@click.command("status")
@settings_options
def status(settings: Settings) -> None:
    """Print the collector status of every upstream recorded in the database."""
    try:
        conn = open_database(settings.db, busy_timeout_ms=settings.busy_timeout_ms)
    except StoreError:  # a full disk or read-only file refuses the migration check: read as it is
        conn = connect(settings.db, readonly=True, busy_timeout_ms=settings.busy_timeout_ms)
    try:
        rows = read_status(conn)
    finally:
        conn.close()
    for line in format_status(rows, int(time.time() * 1000)):
        click.echo(line)
    path = lock_path(settings.db)
    holder = read_holder(path)
    if is_locked(path):
        click.echo(f"collector lock {path}: held by {holder.describe() if holder else 'an unknown process'}")
    else:
        click.echo(f"collector lock {path}: free (no collector running on this database)")


COMMANDS: list[click.Command] = [
    collect,
    status,
]
