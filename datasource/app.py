"""Composition root: `create_app(settings)` wires config, database, aliases, collector and routes.

gunicorn loads `datasource.app:create_app()` in the worker (never with --preload), so every
thread and connection made here is made after the fork.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import logging
import os
import re
from typing import Any

from flask import Flask

from datasource.config import Settings, configure_logging
from datasource.db import Readers, ensure_schema
from datasource.web import AppState, register

logger = logging.getLogger(__name__)
_HASH = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")


class AliasError(ValueError):
    """The api_key_aliases setting cannot be read (the message never contains a key)."""


def _alias_entries(spec: str) -> list[tuple[str, str]]:
    """(where, line) pairs from a file path or an inline `a=b,c=d` list."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        return [(f"{os.path.basename(spec)}:{n}", line) for n, line in enumerate(lines, 1)]
    return [(f"entry {n}", part) for n, part in enumerate(spec.split(","), 1)]


def load_aliases(spec: str) -> dict[str, str]:
    """sha256 hex of a caller key -> alias; a raw key is hashed here and never kept."""
    aliases: dict[str, str] = {}
    for where, line in _alias_entries(spec.strip()) if spec.strip() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, alias = line.rpartition("=")
        key, alias = key.strip(), alias.strip()
        if not sep or not key or not alias:
            raise AliasError(f"api_key_aliases {where}: expected `key-or-sha256=alias`")
        match = _HASH.fullmatch(key)
        digest = match.group(1).lower() if match else hashlib.sha256(key.encode("utf-8")).hexdigest()
        aliases[digest] = alias
    return aliases


def _start_collector(settings: Settings) -> Any:
    if settings.collector != "on" or not settings.upstreams():
        return None
    try:
        module = importlib.import_module("datasource.collector")
    except ImportError:
        logger.warning("collector module not available; serving the API without a collector")
        return None
    service = module.CollectorService(settings)
    service.start()
    atexit.register(service.stop)
    return service


def create_app(settings: Settings | None = None) -> Flask:
    """The Flask app of the datasource API, with the collector started when configured."""
    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:
        configure_logging(settings.log_level)
    # created or migrated when needed; a current schema is only read, so the API starts on a read-only
    # or full disk and while the collector holds the write lock (docs/storage.md)
    ensure_schema(settings.db, busy_timeout_ms=settings.busy_timeout_ms)
    readers = Readers(settings.db, settings.busy_timeout_ms)
    app = Flask("datasource")
    state = AppState(settings, readers, load_aliases(settings.api_key_aliases))
    register(app, state)
    state.collector = _start_collector(settings)
    logger.info("datasource API ready (db %s, %d key aliases, collector %s)",
                settings.db, len(state.aliases), "on" if state.collector else "off")
    return app
