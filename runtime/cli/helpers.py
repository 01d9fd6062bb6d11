"""What every command, built-in or plugin, uses: consoles, running a coroutine, failing with
a message and an exit code, the servers and the log.

A plugin's commands (``webhooks``, ``projections``, a user's package) import these from
``runtime.cli``; none of them is private to the built-in commands.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from runtime.errors import AgentrtError, SettingsError
from runtime.log import migrations
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.ops.embedded import EmbeddedServices
from runtime.settings import Settings

if TYPE_CHECKING:
    from runtime.agents.agent import Agent

T = TypeVar("T")

#: Standard output (results) and standard error (progress, notes, errors).
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(exc: AgentrtError) -> NoReturn:
    """Print the error with its code and exit: 2 for bad settings, 1 otherwise."""
    err.print(f"[bold red]error[/] {escape(f'[{exc.code}]')} {escape(exc.message)}")
    raise typer.Exit(2 if isinstance(exc, SettingsError) else 1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; an agentrt error becomes a clear message and an exit code."""
    try:
        return asyncio.run(coro)
    except AgentrtError as exc:
        fail(exc)


def with_servers(settings: Settings, *, redis: bool = False, postgres: bool = True) -> Settings:
    """Fill in missing URLs by starting the embedded servers (they keep running)."""
    need_redis = redis and settings.redis_url is None
    need_pg = postgres and settings.database_url is None
    if not (need_redis or need_pg):
        return settings
    services = EmbeddedServices(settings.state_dir)
    try:
        urls = services.up(redis=need_redis, postgres=need_pg)
    except AgentrtError as exc:
        fail(exc)
    for key, url in urls.items():
        name = "redis" if key == "REDIS_URL" else "postgres"
        err.print(
            f"[dim]using embedded {name} at {url} "
            f"(state in {settings.state_dir}/; `agentrt services down` stops it)[/]"
        )
    return settings.with_urls(
        redis_url=urls.get("REDIS_URL"), database_url=urls.get("DATABASE_URL")
    )


async def open_log(settings: Settings) -> EventLog:
    """Apply pending migrations, then connect as the runtime's role."""
    report = await migrations.migrate(settings)
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")
    pool = await open_runtime_pool(settings)
    return EventLog(pool, schema=settings.db_schema)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the root command read (the environment's when run without it)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings.from_env()


def importable_cwd() -> None:
    """Make the current directory importable, as uvicorn and celery do, so ``--app mymod``
    finds a module of the project the command is run in."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_agents(target: str) -> list[Agent]:
    """The agents of ``--app`` (:func:`runtime.agents.loading.load_app`), the current
    directory importable; a bad app is a clear error and exit 1."""
    from runtime.agents.loading import load_app
    from runtime.errors import AppLoadError

    importable_cwd()
    try:
        return load_app(target)
    except AppLoadError as exc:
        fail(exc)
