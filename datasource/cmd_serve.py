"""`cpa-monitor serve`: the datasource API under gunicorn (one worker process, gthread).

One worker, because the in-process collector must run exactly once per database; threads
give concurrency. The app is created in the worker after the fork (never --preload).
Before that, the worker caps glibc's malloc arenas (`CPA_MONITOR_MALLOC_ARENAS`, see
`limit_malloc_arenas`).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import sys
from typing import Any

import click
from gunicorn.app.base import BaseApplication

from datasource.cmd_common import settings_options
from datasource.config import Settings

logger = logging.getLogger(__name__)


M_ARENA_MAX = -8  # glibc's mallopt parameter behind MALLOC_ARENA_MAX


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for this process, as MALLOC_ARENA_MAX would; True when applied.

    glibc gives threads up to 8 arenas per core, and memory freed in one arena is not reused
    by another: with 8 gthreads answering 30 d refreshes back to back on the 10 M file the
    worker grew to 470 MB, 334 MB with 2 arenas, the median refresh round 3.3 -> 3.5 s
    (benchmarks/bench_memory.py). Left alone when `arenas` <= 0, when MALLOC_ARENA_MAX is in
    the environment (the operator's choice wins), and off glibc (musl has no mallopt).
    """
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


class BindRefused(ValueError):
    """A non-loopback bind was asked for without any API credentials."""


def _host(bind: str) -> str:
    if bind.startswith("unix:"):
        return "unix"
    host = bind.rsplit(":", 1)[0] if bind.count(":") == 1 or bind.startswith("[") else bind
    return host.strip("[]") or "0.0.0.0"


def is_loopback(bind: str) -> bool:
    host = _host(bind)
    if host in ("unix", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to expose the API beyond this host without a token or basic auth."""
    has_auth = bool(settings.api_token or (settings.basic_auth_user and settings.basic_auth_password))
    if not is_loopback(settings.bind) and not has_auth:
        raise BindRefused(
            f"refusing to listen on {settings.bind} without credentials: set CPA_MONITOR_API_TOKEN "
            "(or CPA_MONITOR_BASIC_AUTH_USER and CPA_MONITOR_BASIC_AUTH_PASSWORD), "
            "or bind to 127.0.0.1"
        )


class MonitorApplication(BaseApplication):
    """gunicorn through its Python API; the app factory runs in the worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [self.settings.bind],
            "workers": 1,
            "worker_class": "gthread",
            "threads": max(1, self.settings.threads),
            "preload_app": False,
            "timeout": max(30, int(self.settings.query_timeout_s * 3)),
            "graceful_timeout": 10,
            "loglevel": self.settings.log_level.lower(),
            "proc_name": "cpa-monitor",
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from datasource.app import create_app

        if limit_malloc_arenas(self.settings.malloc_arenas):  # in the worker, before its threads start
            logger.debug("malloc arenas capped at %d", self.settings.malloc_arenas)
        return create_app(self.settings)


def run_server(settings: Settings) -> None:
    """Serve until stopped; raises BindRefused for an unsafe bind."""
    check_bind(settings)
    logger.info("serving on http://%s (1 worker, %d threads)", settings.bind, settings.threads)
    MonitorApplication(settings).run()


@click.command("serve")
@settings_options
def serve(settings: Settings) -> None:
    """Serve the Grafana datasource API (and the collector, unless --collector off)."""
    try:
        run_server(settings)
    except BindRefused as exc:
        raise click.ClickException(str(exc)) from None


COMMANDS: list[click.Command] = [serve]
