"""The root `agentrt` app: global options, the built-in command groups, plugins."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from runtime.cli import agents, audit, cache, db, listing, log, services, up
from runtime.cli.helpers import err, fail
from runtime.errors import SettingsError
from runtime.ops.logconfig import configure_logging
from runtime.settings import Settings

PLUGIN_GROUP = "agentrt.commands"

app = typer.Typer(
    name="agentrt",
    help="An event-sourced runtime for production LLM agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for commands in (services, db, audit, log, agents, up, listing, cache):
    commands.register(app)

# -- settings and servers ------------------------------------------------------


@app.callback()
def _root(
    ctx: typer.Context,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where embedded servers keep their data "
            "(env AGENTRT_STATE_DIR; default ./.agentrt)"
        ),
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis to use instead of the embedded one (env REDIS_URL)")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL to migrate with instead of the embedded one (env DATABASE_URL)"
        ),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option(help="PostgreSQL schema of the log (env AGENTRT_DB_SCHEMA; default agentrt)"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error (env AGENTRT_LOG_LEVEL)")
    ] = None,
    log_json: Annotated[
        bool | None,
        typer.Option("--log-json/--log-console", help="Log lines as JSON (env AGENTRT_LOG_JSON)"),
    ] = None,
) -> None:
    try:
        settings = Settings.from_env(
            state_dir=state_dir,
            redis_url=redis_url,
            database_url=database_url,
            db_schema=schema,
            log_level=log_level,
            log_json=log_json,
        )
    except SettingsError as exc:
        fail(exc)
    configure_logging(settings.log_level, json=settings.log_json)
    ctx.obj = settings


# -- plugins -------------------------------------------------------------------


def load_plugins(root: typer.Typer, eps: list[EntryPoint] | None = None) -> list[str]:
    """Add the commands other packages declare in the ``agentrt.commands`` group.

    An entry point names either a ``typer.Typer`` (added as the sub-command
    ``<entry point name>``) or a function ``register(app: typer.Typer)`` that
    adds commands itself. One that fails to load is reported and skipped, so
    a broken plugin never takes the whole command down.
    """
    added: list[str] = []
    taken = {info.name for info in root.registered_groups} | {
        info.name or (info.callback.__name__ if info.callback else "")
        for info in root.registered_commands
    }
    for ep in eps if eps is not None else list(entry_points(group=PLUGIN_GROUP)):
        try:
            obj = ep.load()
        except Exception as exc:  # a plugin's import error is its own bug, not ours
            err.print(
                f"[yellow]warning:[/] plugin {ep.name!r} ({ep.value}) failed to load: "
                f"{escape(str(exc))}"
            )
            continue
        if isinstance(obj, typer.Typer):
            if ep.name in taken:
                err.print(
                    f"[yellow]warning:[/] plugin {ep.name!r} would shadow a built-in "
                    "command; skipped"
                )
                continue
            root.add_typer(obj, name=ep.name)
        elif callable(obj):
            obj(root)
        else:
            err.print(
                f"[yellow]warning:[/] plugin {ep.name!r} is neither a typer.Typer nor a "
                f"register(app) function ({type(obj).__name__}); skipped"
            )
            continue
        added.append(ep.name)
    return added


def main() -> None:
    load_plugins(app)
    app(prog_name="agentrt")
