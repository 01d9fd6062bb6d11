"""``agentrt services``: the embedded Redis and PostgreSQL."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from runtime.cli.helpers import err, fail, out
from runtime.errors import AgentrtError
from runtime.log.pool import redact
from runtime.ops.embedded import EmbeddedServices
from runtime.settings import Settings

services_app = typer.Typer(
    help="Start, stop and inspect the embedded Redis and PostgreSQL.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(services_app, name="services")


@services_app.command("up")
def services_up(ctx: typer.Context) -> None:
    """Start the embedded servers (if not running) and print the URLs to use."""
    settings: Settings = ctx.obj
    started = time.monotonic()
    try:
        urls = EmbeddedServices(settings.state_dir).up()
    except AgentrtError as exc:
        fail(exc)
    err.print(
        f"[green]embedded services up[/] in {time.monotonic() - started:.1f}s "
        f"(data in {settings.state_dir.resolve()})"
    )
    for key, url in urls.items():
        out.print(f"export {key}={url}")


@services_app.command("down")
def services_down(ctx: typer.Context) -> None:
    """Stop the embedded servers; their data stays in the state directory."""
    settings: Settings = ctx.obj
    try:
        stopped = EmbeddedServices(settings.state_dir).down()
    except AgentrtError as exc:
        fail(exc)
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services_app.command("status")
def services_status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """Show whether the embedded servers run, their URLs, versions and data."""
    settings: Settings = ctx.obj
    states = EmbeddedServices(settings.state_dir).status()
    if as_json:
        out.print_json(
            data=[
                {
                    "name": s.name,
                    "running": s.running,
                    "url": s.url,
                    "pid": s.pid,
                    "data_dir": str(s.data_dir),
                    "version": s.version,
                }
                for s in states
            ]
        )
        return
    for s in states:
        mark = "[green]running[/]" if s.running else "[red]stopped[/]"
        out.print(f"{s.name:9} {mark:20} {s.url or '-':45} {s.version}  data: {s.data_dir}")
    for name, url in (("REDIS_URL", settings.redis_url), ("DATABASE_URL", settings.database_url)):
        if url:
            out.print(
                f"[yellow]{name} is set ({redact(url)}): the runtime uses it, "
                f"not the embedded server[/]"
            )
