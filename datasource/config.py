"""Configuration: one frozen Settings dataclass built from CPA_MONITOR_* variables.

Every field carries its environment name, default and one line of help in its
metadata; the CLI builds its flags from the same table and a test checks that
each one is documented in the README's configuration table.
"""

from __future__ import annotations

import dataclasses
import logging.config
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "CPA_MONITOR_"


def default_db_path() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return os.path.join(base, "cpa-monitor", "monitor.db")


def _opt(default: Any, help: str, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    db: str = _opt("", "SQLite database path (default: ~/.local/share/cpa-monitor/monitor.db)")
    cpa_url: str = _opt(
        "", "CPA base URL, e.g. http://127.0.0.1:8317; several as name=url,name=url (empty: no collector)"
    )
    cpa_management_key: str = _opt("", "CPA management key (used for AUTH and the management API)", True)
    cpa_management_key_file: str = _opt("", "file holding the CPA management key (wins over the variable)")
    collector: str = _opt("on", "run the collector inside `serve`: on | off")
    collector_mode: str = _opt("auto", "transport: auto | subscribe | http | resp")
    pop_side: str = _opt("right", "pop command for resp mode: right (RPOP) | left (LPOP)")
    batch_size: int = _opt(500, "events popped per request (resp/http); see commit_max for transactions")
    commit_max: int = _opt(
        4000, "largest transaction: under a backlog consecutive full pops are stored together, up to this many "
        "events (also `ingest`'s transaction size); a kill can lose what is held, see docs/collector.md"
    )
    normalize_workers: str = _opt(
        "auto", "collector: 1 = a worker process normalizes the next popped group while the collector thread "
        "stores the current one (two cores; up to two popped groups in memory); N > 1 splits each group across N; "
        "0: none; auto: one worker only while the collector is behind its queue (a group of full pops reaching "
        "commit_max), stopped after 60 s without one; none with a single usable CPU"
    )
    poll_interval_ms: int = _opt(500, "wait after an empty pop; must be shorter than CPA's queue retention")
    auth_files_ttl_s: int = _opt(30, "how long CPA's auth-file list is cached for account enrichment")
    retention_days: int = _opt(30, "raw events older than this are pruned daily (rollups are kept)")
    bind: str = _opt("127.0.0.1:8080", "host:port that `serve` listens on")
    malloc_arenas: int = _opt(2, "glibc malloc arenas of the `serve` worker (less memory under concurrent "
                                 "queries; 0: glibc's default; MALLOC_ARENA_MAX in the environment wins)")
    threads: int = _opt(8, "gunicorn threads (one worker process; see README)")
    api_token: str = _opt("", "bearer token required by the API (empty: no token)", True)
    basic_auth_user: str = _opt("", "basic-auth user accepted by the API (with the password)")
    basic_auth_password: str = _opt("", "basic-auth password accepted by the API", True)
    cors_origins: str = _opt("", "comma-separated origins allowed by CORS (empty: CORS off)")
    prices_file: str = _opt("", "model price table (our JSON or LiteLLM's price JSON); empty: built-in defaults")
    api_key_aliases: str = _opt("", "caller key aliases: file of `sha256-or-key=alias` lines, or inline a=b,c=d")
    mask_emails: bool = _opt(False, "mask account e-mail addresses in labels too (sources are always masked)")
    busy_timeout_ms: int = _opt(5000, "SQLite busy timeout for every connection")
    query_timeout_s: float = _opt(10.0, "longest a single API query may run before a 503")
    max_body_bytes: int = _opt(1_048_576, "largest request body the API accepts (413 above)")
    demo_rate: float = _opt(8.0, "events per second published by `cpa-monitor demo`")
    log_level: str = _opt("INFO", "logging level")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env:
                values[f.name] = _coerce(f, env[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if not settings.db:
            settings = dataclasses.replace(settings, db=default_db_path())
        return settings

    def management_key(self) -> str:
        if self.cpa_management_key_file:
            return Path(self.cpa_management_key_file).read_text(encoding="utf-8").strip()
        return self.cpa_management_key.strip()

    def upstreams(self) -> list[tuple[str, str]]:
        """[(instance name, base URL)] from cpa_url; a bare URL is named `default`."""
        out: list[tuple[str, str]] = []
        for part in (p.strip() for p in self.cpa_url.split(",")):
            if not part:
                continue
            name, sep, url = part.partition("=")
            if not sep or "://" in name:
                name, url = "default", part
            out.append((name.strip(), url.strip().rstrip("/")))
        return out

    def redacted(self) -> dict[str, Any]:
        """The settings with secrets replaced, safe to log or show."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and value else value
        return out


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    if kind == "bool":
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw


def configure_logging(level: str = "INFO") -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "root": {"level": level.upper(), "handlers": ["stderr"]},
        }
    )
