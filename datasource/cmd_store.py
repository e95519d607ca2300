"""Store commands: migrate, ingest, export, prune, backup."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from itertools import islice
from typing import IO, BinaryIO, Iterator

import click

from datasource import exchange, store
from datasource.cmd_common import settings_options
from datasource.config import Settings
from datasource.db import SchemaError, connect, migrate, open_database
from datasource.lock import CollectorLock
from datasource.model import Control, InsertResult, Normalized, Rejected
from datasource.normalize import normalize_obj
from datasource.pricing import Pricer

logger = logging.getLogger(__name__)

NO_END_MS = 2**62


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _open(settings: Settings) -> store.Connection:
    try:
        return open_database(settings.db, busy_timeout_ms=settings.busy_timeout_ms)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from exc


def decode_items(
    stream: BinaryIO, *, instance: str = "default", pricer: Pricer | None = None, now_ms: int | None = None
) -> Iterator[Normalized | Rejected]:
    """Events and rejects from ingest input: raw CPA payloads or export lines; control items dropped."""
    for record in exchange.read_records(stream):
        if isinstance(record, Rejected):
            yield record
        elif exchange.is_export(record.obj):
            yield exchange.from_export(record.obj, record.raw)
        else:
            item = normalize_obj(record.obj, record.raw, instance=instance, pricer=pricer, now_ms=now_ms,
                                 _plain=record.plain)
            if not isinstance(item, Control):
                yield item


def ingest_stream(
    conn: store.Connection,
    stream: BinaryIO,
    *,
    origin: str,
    instance: str = "default",
    batch_size: int = 500,
    pricer: Pricer | None = None,
    now_ms: int | None = None,
) -> InsertResult:
    """Store everything in `stream`, one transaction per `batch_size` items; counts only (no ids)."""
    total = InsertResult()
    store.raise_gc_threshold()
    items = decode_items(stream, instance=instance, pricer=pricer, now_ms=now_ms)
    while batch := list(islice(items, max(batch_size, 1))):
        result = store.insert_batch(conn, batch, origin=origin, instance=instance, now_ms=now_ms)
        total.inserted += result.inserted
        total.duplicates += result.duplicates
        total.dead_letters += result.dead_letters
    return total


def write_export(
    conn: store.Connection, out: IO[str], from_ms: int, to_ms: int, filters: dict[str, str | None]
) -> int:
    """Stream export lines to `out`; returns the number written."""
    written = 0
    for row in store.iter_export_rows(conn, from_ms, to_ms, filters):
        out.write(exchange.to_export_line(row) + "\n")
        written += 1
    return written


def _time_option(value: str | None, default: int, now_ms: int, flag: str) -> int:
    if value is None:
        return default
    try:
        return exchange.parse_time_ms(value, now_ms=now_ms)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from exc


@click.command("migrate")
@settings_options
def migrate_command(settings: Settings) -> None:
    """Create the database or bring its schema up to date."""
    try:
        version = migrate(connect(settings.db, busy_timeout_ms=settings.busy_timeout_ms))
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{settings.db}: schema version {version}")


@click.command("ingest")
@click.argument("source", type=click.File("rb"))
@click.option("--instance", default="default", show_default=True, help="CPA instance name stored on the events")
@settings_options
def ingest_command(source: BinaryIO, instance: str, settings: Settings) -> None:
    """Load JSON Lines or a JSON array of CPA payloads, or export lines, from FILE (- for stdin)."""
    conn = _open(settings)
    origin = f"ingest:{getattr(source, 'name', '-')}"
    pricer = Pricer.from_file(settings.prices_file) if settings.prices_file else Pricer.default()
    result = ingest_stream(conn, source, origin=origin, instance=instance, batch_size=settings.commit_max,
                           pricer=pricer)
    click.echo(f"inserted {result.inserted}, duplicates {result.duplicates}, dead letters {result.dead_letters}")


@click.command("export")
@click.option("--from", "from_", help="start, inclusive: ISO-8601, epoch ms or an age (24h, 7d); default: all")
@click.option("--to", "to", help="end, exclusive: same forms; default: no end")
@click.option("--instance", help="only this CPA instance")
@click.option("--provider", help="only this provider")
@click.option("--model", help="analytics, requested or resolved model")
@click.option("--account", help="account key, account label or auth index")
@click.option("--api-key", "api_key", help="caller key sha256 hash or masked form")
@click.option("--output", "-o", type=click.File("w", encoding="utf-8"), default="-", help="file (default stdout)")
@settings_options
def export_command(from_: str | None, to: str | None, output: IO[str], settings: Settings, **filters: str | None) -> None:
    """Stream sanitized events as JSON Lines (no raw bodies, full keys or client IPs)."""
    now_ms = _now_ms()
    from_ms = _time_option(from_, 0, now_ms, "--from")
    to_ms = _time_option(to, NO_END_MS, now_ms, "--to")
    written = write_export(_open(settings), output, from_ms, to_ms, filters)
    logger.info("exported %d events", written)


@click.command("prune")
@click.option("--older-than", "older_than", help="age like 30d or 12h; default: the retention setting in days")
@settings_options
def prune_command(older_than: str | None, settings: Settings) -> None:
    """Delete raw events older than the retention (the dedup ledger is kept)."""
    try:
        age_ms = exchange.parse_duration_ms(older_than or f"{settings.retention_days}d")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from exc
    cutoff = _now_ms() - age_ms
    deleted = store.prune(_open(settings), cutoff)
    click.echo(f"pruned {deleted} events older than {_iso(cutoff)}")


@click.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False, writable=True))
@settings_options
def backup_command(dest: str, settings: Settings) -> None:
    """Copy the live database to DEST with SQLite's online backup."""
    try:  # read-only: no migration write to queue behind a busy collector (a backup only reads)
        source = connect(settings.db, readonly=True, busy_timeout_ms=settings.busy_timeout_ms)
        store.backup(source, dest, busy_timeout_ms=settings.busy_timeout_ms)
    except (ValueError, store.StoreError) as exc:
        raise click.ClickException(f"backup failed: {exc}") from exc
    click.echo(f"backed up {settings.db} to {dest}")


@click.command("compact")
@settings_options
def compact_command(settings: Settings) -> None:
    """Return the database's free pages to the filesystem (VACUUM); stop the collector first."""
    lock = CollectorLock(settings.db)
    if not lock.try_acquire():
        holder = lock.holder()
        raise click.ClickException(
            f"a collector is running on {settings.db} ({holder.describe() if holder else 'holder unknown'}); "
            "stop it first: compact rewrites the whole file and would hold the store for that long")
    try:
        conn = _open(settings)
        before = os.path.getsize(settings.db)
        try:
            free = store.compact(conn)
        except store.StoreError as exc:
            raise click.ClickException(f"compact failed, the database is unchanged: {exc}") from exc
        finally:
            conn.close()
    finally:
        lock.release()
    after = os.path.getsize(settings.db)
    click.echo(f"compacted {settings.db}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
               f"({free / 1e6:.1f} MB of free pages)")


COMMANDS: list[click.Command] = [migrate_command, ingest_command, export_command, prune_command, backup_command,
                                 compact_command]
