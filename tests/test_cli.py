"""The cpa-monitor group: every command is listed and runs, and importing the group stays light."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import click
from click.testing import CliRunner

import datasource
from datasource.cli import COMMAND_MODULES, cli, load_command


def defined_commands() -> dict[str, str]:
    """Command name -> module, read from every datasource.cmd_* module's COMMANDS list."""
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(datasource.__path__):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"datasource.{info.name}")
            for command in getattr(module, "COMMANDS", []):
                assert command.name not in found, f"{command.name} defined twice"
                found[command.name] = info.name
    return found


def test_the_table_names_every_defined_command_and_its_module():
    assert COMMAND_MODULES == defined_commands()
    assert len(COMMAND_MODULES) == 10


def test_help_lists_every_command_sorted_with_its_summary():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:\n", 1)[1].splitlines() if line.strip()]
    assert listed == ["backup", "collect", "compact", "demo", "export", "ingest", "migrate", "prune", "serve",
                      "status"]
    assert "Copy the live database to DEST" in result.output  # a summary read from the loaded command


def test_a_command_is_loaded_by_name_and_an_unknown_name_is_a_usage_error():
    command = load_command("status")
    assert isinstance(command, click.Command) and command.name == "status"
    assert load_command("nosuch") is None
    result = CliRunner().invoke(cli, ["nosuch"])
    assert result.exit_code == 2
    assert "No such command 'nosuch'" in result.output


def test_importing_the_group_loads_no_command_module():
    code = ("import sys, datasource.cli; print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith(('datasource.', 'flask', 'redis', 'apsw', 'gunicorn')))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["datasource.cli"]


def test_a_lazily_loaded_command_runs(tmp_path):
    db = tmp_path / "m.db"
    result = CliRunner().invoke(cli, ["migrate", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert db.exists()
