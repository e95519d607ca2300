"""CLI commands (filled in by the collect work)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
