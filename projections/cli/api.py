"""``agentrt api``: the query API (JSON routes over the read models) on its own server."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from runtime.cli import err, load_agents, run, settings_of, with_servers
from runtime.log import migrations
from runtime.ops.logconfig import uvicorn_logging


def usage_note(url: str, path: Path | None) -> str:
    """Where the token is and how to use it (never the token itself: terminals get logged)."""
    if path is None:
        where = "token: AGENTRT_API_TOKEN"
        kept = "AGENTRT_API_TOKEN"
        header = "Authorization: Bearer $AGENTRT_API_TOKEN"
    else:
        where = f"token: kept in {path} (mode 0600, reused next time; AGENTRT_API_TOKEN overrides)"
        kept = f"kept in {path}"
        header = f"Authorization: Bearer $(cat {shlex.quote(str(path))})"
    return (
        f"query API on {url} (schema {url}/openapi.json, docs {url}/docs)\n{where}\n"
        f'  curl -H "{header}" {url}/runs\n'
        f"run explorer: {explorer_url(url)} (sign in with the API token: {kept})"
    )


def explorer_url(url: str) -> str:
    """The run explorer's address on the API at ``url``."""
    return f"{url}/ui/"


def api(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8001,
    app_target: Annotated[
        str | None,
        typer.Option(
            "--app",
            help="Module with your agents (`mypkg.agents`): /runs/{id}/state folds their "
            "state with their code; without it /state answers 422",
        ),
    ] = None,
) -> None:
    """Serve the query API: runs, events, timelines, time travel, audit, usage, dead letters.

    Every route needs a bearer token: settings.api_token (AGENTRT_API_TOKEN), else one made
    here and kept in <state_dir>/api-token. The read models are as fresh as
    `agentrt projector` keeps them.
    """
    import uvicorn

    from projections.api import create_api, ensure_token

    agents = load_agents(app_target) if app_target else []
    settings = with_servers(settings_of(ctx))
    token, path = ensure_token(settings)
    settings = dataclasses.replace(settings, api_token=token)

    async def prepare() -> None:
        report = await migrations.migrate(settings)
        for note in report.notes:
            err.print(f"[yellow]note:[/] {escape(note)}")

    run(prepare())
    shown = host if ":" not in host else f"[{host}]"
    err.print(escape(usage_note(f"http://{shown}:{port}", path)))
    uvicorn.run(
        create_api(settings, agents=agents),
        host=host,
        port=port,
        **uvicorn_logging(settings.log_level),
    )


def register(app: typer.Typer) -> None:
    """Add ``agentrt api`` to ``app``."""
    app.command("api")(api)
