"""`cpa-monitor` command line: a click group whose commands live in cmd_* modules."""

from __future__ import annotations

import click

from datasource import __version__
from datasource import cmd_collect, cmd_demo, cmd_serve, cmd_store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cpa-monitor")
def cli() -> None:
    """CPA Monitor: collect CLIProxyAPI usage events and serve them to Grafana."""


for _module in (cmd_store, cmd_collect, cmd_serve, cmd_demo):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
