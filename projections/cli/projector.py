"""``agentrt projector`` and ``agentrt projections status|rebuild``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import msgspec
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from projections.cli.common import command_settings
from projections.engine import Progress as RebuildProgress
from projections.engine import ProjectionStatus, Projector
from projections.registry import registered
from runtime.cli import err, importable_cwd, open_log, out, run, with_servers
from runtime.ops import metrics
from runtime.settings import Settings

projections_app = typer.Typer(
    help="The read models: where each stands, and rebuilding one.", no_args_is_help=True
)

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        help="Module with your agents (their state is folded) and a `projections` list "
        "(env AGENTRT_APP)",
        envvar="AGENTRT_APP",
    ),
]


def _settings(ctx: typer.Context, *, quiet: bool = False) -> Settings:
    return with_servers(command_settings(ctx, quiet=quiet))


@asynccontextmanager
async def opened(settings: Settings, app: str | None) -> AsyncIterator[Projector]:
    """A projector over the migrated log, with the built-in projections and the app's."""
    importable_cwd()  # --app names a module of the project, as for `agentrt worker`
    projections = registered(app, settings=settings)
    log = await open_log(settings)
    try:
        yield Projector(log, projections, settings)
    finally:
        await log.pool.close()


def _age(seconds: float) -> str:
    if seconds < 1:
        return "0 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def register(app: typer.Typer) -> None:
    @app.command("projector")
    def projector_cmd(
        ctx: typer.Context,
        app_module: AppOption = None,
        metrics_port: Annotated[
            int,
            typer.Option(
                help="Serve Prometheus metrics (/metrics, /healthz) on this port (0: off)"
            ),
        ] = 0,
    ) -> None:
        """Fold the log into the read models, live: catch up from each checkpoint, then follow.

        Projections that are new, or whose version changed, are rebuilt beside the
        live ones (AGENTRT_PROJECTION_VERSION_CHANGE=flag only reports them).
        SIGINT/SIGTERM stop it between pages; nothing is ever folded twice.
        """
        settings = _settings(ctx)
        metrics.process_started("projector")
        if metrics_port:
            metrics.serve_metrics(metrics_port)

        async def go() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            async with opened(settings, app_module) as projector:
                names = ", ".join(projector.projections)
                err.print(f"[dim]projector: {names}[/]")
                await projector.run(stop)

        run(go())

    @projections_app.command("status")
    def status_cmd(
        ctx: typer.Context,
        app_module: AppOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False,
    ) -> None:
        """Each projection's version, checkpoint and lag (events and seconds behind the log)."""
        settings = _settings(ctx, quiet=True)

        async def go() -> list[ProjectionStatus]:
            async with opened(settings, app_module) as projector:
                return list(await projector.status())

        rows = run(go())
        if as_json:
            out.print(msgspec.json.encode(rows).decode(), soft_wrap=True)
            return
        table = Table("projection", "version", "state", "position", "events", "lag", "behind")
        colours = {"live": "green", "rebuilding": "yellow", "stale": "red", "new": "yellow"}
        for s in rows:
            state = s.state
            if s.state == "stale":
                state = f"stale (built by v{s.built_version})"
            elif s.state == "rebuilding" and s.rebuild_total:
                state = f"rebuilding {100 * (s.rebuild_done or 0) // s.rebuild_total}%"
            table.add_row(
                s.name,
                s.version,
                f"[{colours.get(s.state, 'white')}]{state}[/]",
                s.position or "-",
                str(s.events_applied),
                str(s.lag_events),
                _age(s.lag_seconds),
            )
        out.print(table)

    @projections_app.command("rebuild")
    def rebuild_cmd(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="The projection (see `projections status`)")],
        app_module: AppOption = None,
    ) -> None:
        """Rebuild NAME from the start into shadow tables and swap them in when caught up.

        The live tables keep serving queries meanwhile; the swap is one transaction.
        """
        settings = _settings(ctx, quiet=True)

        async def go() -> int:
            async with opened(settings, app_module) as projector:
                with Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("events"),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                    console=err,
                    transient=False,
                ) as bar:
                    task = bar.add_task(f"{name}: folding", total=None)

                    def update(p: RebuildProgress) -> None:
                        bar.update(task, completed=p.done, total=p.total,
                                   description=f"{name}: {p.phase}")  # fmt: skip

                    return await projector.rebuild(name, progress=update)

        folded = run(go())
        out.print(f"rebuilt {name}: {folded} events folded, swapped in")

    app.add_typer(projections_app, name="projections")
