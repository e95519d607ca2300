"""Shared CLI plumbing: every Settings field as a flag, env variables as defaults."""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Any, Callable

import click

from datasource.config import ENV_PREFIX, Settings, configure_logging

_CLICK_TYPES = {"int": int, "float": float, "str": str}


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one `--flag` per Settings field; the command receives `settings`.

    A flag given on the command line wins over its CPA_MONITOR_* variable,
    which wins over the default.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {f.name: kwargs.pop(f.name, None) for f in fields(Settings)}
        settings = Settings.from_env(**overrides)
        configure_logging(settings.log_level)
        return func(*args, settings=settings, **kwargs)

    for f in reversed(fields(Settings)):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}]"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            wrapper = click.option(flag + "/--no-" + f.name.replace("_", "-"), f.name,
                                   default=None, help=help_text)(wrapper)
        else:
            wrapper = click.option(flag, f.name, type=_CLICK_TYPES.get(kind, str),
                                   default=None, help=help_text)(wrapper)
    return wrapper
