"""``agentrt cache``: the response cache of model steps (``Agent.cache``)."""

from __future__ import annotations

from typing import Annotated

import typer

from runtime.cli.helpers import load_agents, open_log, out, run, with_servers
from runtime.llm.cache import rebuild_index

cache_app = typer.Typer(help="The agents' response cache of model steps.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")


@cache_app.command("rebuild")
def cache_rebuild(
    ctx: typer.Context,
    app_target: Annotated[
        str, typer.Option("--app", help="Module with your agents (as for `agentrt worker`)")
    ],
) -> None:
    """Index every answer the log holds for the app's cached agents again.

    The index (table response_cache) is derived from the log: run this after it
    was lost or restored from an older backup, or when an agent turns its cache
    on and should be answered from its past calls. Existing entries are kept.
    """
    agents = load_agents(app_target)
    cached = [a.name for a in agents if a.cache is not None]
    if not cached:
        out.print("no agent of the app has a cache (Agent.cache)")
        return
    settings = with_servers(ctx.obj)

    async def go() -> int:
        lg = await open_log(settings)
        try:
            return await rebuild_index(lg, agents)
        finally:
            await lg.pool.close()

    n = run(go())
    out.print(f"indexed {n} recorded answers of {', '.join(cached)}")
