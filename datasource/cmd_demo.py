"""`cpa-monitor demo`: a CPA stand-in with realistic traffic, the real collector and the datasource."""

from __future__ import annotations

import logging
import os

import click

from datasource.cmd_common import settings_options
from datasource.cmd_serve import BindRefused, run_server
from datasource.config import Settings
from datasource.demo import DemoStack

logger = logging.getLogger(__name__)


@click.command("demo")
@click.option("--seed", type=int, default=None, help="traffic generator seed (default: random)")
@click.option("--backfill-minutes", type=int, default=30, show_default=True,
              help="minutes of history queued before the collector starts")
@settings_options
def demo(settings: Settings, seed: int | None, backfill_minutes: int) -> None:
    """Run a demo CPA (embedded Redis + FakeCPA) with the collector and datasource (Ctrl-C stops)."""
    stack = DemoStack(settings, seed=seed, backfill_s=max(backfill_minutes, 0) * 60)
    try:
        served = stack.start()
    except RuntimeError as exc:
        stack.stop()
        raise click.ClickException(str(exc)) from None
    click.echo(f"demo CPA (stand-in)   {served.cpa_url}  management key {served.cpa_management_key}")
    click.echo(f"queue (embedded Redis) 127.0.0.1:{stack.redis.port}")
    click.echo(f"Grafana datasource    http://{served.bind}  (from a Grafana container: "
               f"http://host.docker.internal:{served.bind.rsplit(':', 1)[-1]})")
    click.echo(f"data directory        {os.path.dirname(os.path.abspath(served.db))}  (database {served.db})")
    click.echo(f"publishing {served.demo_rate:g} requests/s; Ctrl-C stops everything")
    try:
        run_server(served)
    except BindRefused as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if stack.owned_here():
            stack.stop()
            logger.info("demo stopped")


COMMANDS: list[click.Command] = [demo]
