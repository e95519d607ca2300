"""`cpa-monitor` command line: a click group whose commands live in cmd_* modules.

A command's module is imported only when that command runs (or help lists it). This matters
beyond start-up time: a normalize worker is a `spawn`ed process, and spawn runs the parent's
main script again in the child. For the `cpa-monitor` console script that is an import of this
module, so importing every command here would load Flask, gunicorn, redis and APSW into each
worker (~20 MB of its memory and ~0.2 s of its start) for nothing it uses.
"""

from __future__ import annotations

import importlib

import click

from datasource import __version__

# Command name -> the datasource module whose COMMANDS list holds it (help lists them sorted).
COMMAND_MODULES: dict[str, str] = {
    "migrate": "cmd_store",
    "ingest": "cmd_store",
    "export": "cmd_store",
    "prune": "cmd_store",
    "backup": "cmd_store",
    "compact": "cmd_store",
    "collect": "cmd_collect",
    "status": "cmd_collect",
    "serve": "cmd_serve",
    "demo": "cmd_demo",
}


def load_command(name: str) -> click.Command | None:
    """The command called `name`, importing its module; None for a name no module defines."""
    module_name = COMMAND_MODULES.get(name)
    if module_name is None:
        return None
    module = importlib.import_module(f"datasource.{module_name}")
    for command in module.COMMANDS:
        if command.name == name:
            return command
    raise LookupError(f"datasource.{module_name} defines no command {name!r}")


class LazyGroup(click.Group):
    """A group that imports a command's module when the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load_command(cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cpa-monitor")
def cli() -> None:
    """CPA Monitor: collect CLIProxyAPI usage events and serve them to Grafana."""
