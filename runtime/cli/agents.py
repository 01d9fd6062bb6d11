"""``agentrt worker``, ``relay`` and ``dlq``: running agents and handling their dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runtime.agents.agent import Agent
from runtime.cli.helpers import err, load_agents, open_log, out, run, with_servers
from runtime.errors import RedriveRefused
from runtime.log.store import EventLog
from runtime.ops.process import settle_gc
from runtime.ops.tracing import configure_tracing
from runtime.settings import Settings
from runtime.streams.keys import connect_redis
from runtime.worker import dead_letters as dlq_mod
from runtime.worker.options import WorkerOptions
from runtime.worker.relay import Relay
from runtime.worker.worker import Worker

dlq_app = typer.Typer(help="Inspect and re-drive dead-lettered events.", no_args_is_help=True)

AppOption = Annotated[
    str,
    typer.Option(
        "--app",
        help="Module with your agents: `mypkg.agents` (its `agents` list or Agent classes) "
        "or `mypkg.agents:attr`",
    ),
]


FromStartOption = Annotated[
    bool,
    typer.Option(
        "--from-start",
        help="Subscriptions the relay has not seen yet get the log from its start, on their own "
        "streams (default: they start at the current position; AGENTRT_RELAY_BACKFILL)",
    ),
]


MetricsPortOption = Annotated[
    int,
    typer.Option(
        help="Serve Prometheus metrics (/metrics, /healthz) on this port (0: off); "
        "under a supervisor sharing PROMETHEUS_MULTIPROC_DIR, all its processes summed"
    ),
]


def _serve_metrics(port: int, component: str) -> None:
    """The process's metrics endpoint (a daemon thread, gone with the process)."""
    from runtime.ops import metrics

    metrics.process_started(component)
    if port:
        metrics.serve_metrics(port)


def _relay(
    lg: EventLog, redis: Any, agents: list[Agent], settings: Settings, *, from_start: bool
) -> Relay:
    """The deployment's relay: named by AGENTRT_RELAY_NAME, not by the app's routes."""
    return Relay(lg, redis, agents, name=settings.relay_name,
                 backfill=from_start or settings.relay_backfill,
                 poll_interval=settings.poll_interval)  # fmt: skip


def _stop_on_signals(stop: asyncio.Event, *, exit_within: float | None = None) -> None:
    """SIGTERM/SIGINT set ``stop``; a second one exits at once.

    With ``exit_within``, the process also exits that many seconds after the
    first signal if it has not by itself: a stop must never hang a deploy (a
    task that lost its cancellation, a server that stopped answering). Nothing
    is lost by it: what was not acknowledged stays pending and is reclaimed.
    """
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            err.print("second signal: exiting without waiting for in-flight work")
            os._exit(130)
        stop.set()
        if exit_within is not None:
            timer = threading.Timer(exit_within, _exit_now, args=(exit_within,))
            timer.daemon = True
            timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)


def _exit_now(seconds: float) -> None:
    sys.stderr.write(
        f"agentrt: still running {seconds:g} s after the stop signal; exiting now "
        "(unacknowledged entries stay pending and are reclaimed)\n"
    )
    sys.stderr.flush()
    os._exit(1)


@contextlib.asynccontextmanager
async def _opened(settings: Settings) -> AsyncIterator[tuple[EventLog, Any]]:
    lg = await open_log(settings)
    redis = await connect_redis(settings.require_redis_url())
    try:
        yield lg, redis
    finally:
        await redis.aclose()
        await lg.pool.close()


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        ctx: typer.Context,
        app_target: AppOption,
        concurrency: Annotated[int, typer.Option(help="Activations in flight at once")] = 16,
        batch: Annotated[int, typer.Option(help="Entries per XREADGROUP")] = 32,
        claim_idle: Annotated[
            float, typer.Option(help="Seconds before a dead consumer's entries are reclaimed")
        ] = 60.0,
        max_deliveries: Annotated[
            int, typer.Option(help="Deliveries before an entry is dead-lettered")
        ] = 5,
        partitions: Annotated[int, typer.Option(help="Ingress partitions (webhooks.toml)")] = 8,
        drain_timeout: Annotated[
            float, typer.Option(help="Seconds in-flight work may take after SIGTERM")
        ] = 30.0,
        relay: Annotated[
            bool, typer.Option("--relay/--no-relay", help="Also run the outbox relay here")
        ] = True,
        from_start: FromStartOption = False,
        metrics_port: MetricsPortOption = 0,
    ) -> None:
        """Run agents: consumer groups, durable steps, one transaction per activation."""
        agents = load_agents(app_target)
        settings = with_servers(ctx.obj, redis=True)
        try:
            options = WorkerOptions(
                handler_timeout=settings.handler_timeout,
                concurrency=concurrency,
                batch=batch,
                claim_idle=claim_idle,
                max_deliveries=max_deliveries,
                partitions=partitions,
                drain_timeout=drain_timeout,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        _serve_metrics(metrics_port, "worker")
        configure_tracing("agentrt-worker")

        async def go() -> None:
            from runtime.llm.calls import LLM
            from runtime.llm.client import model_client
            from runtime.streams.durability import ensure_durable_redis

            stop = asyncio.Event()
            # The drain, then the readers' last XREADGROUP, the relay and the
            # closing of the connections, with room to spare.
            _stop_on_signals(stop, exit_within=options.drain_timeout + options.block_ms / 1000 + 30)
            async with _opened(settings) as (lg, redis), model_client(settings) as mc:
                # Promise 1 rests on a Redis that fsyncs every write: warn, or refuse.
                await ensure_durable_redis(redis, settings, component="agentrt worker")
                llm = LLM(mc.client, settings, offline=mc.offline)
                w = Worker(
                    agents,
                    redis=redis,
                    log=lg,
                    llm=llm,
                    options=options,
                    breaker_threshold=settings.breaker_failure_threshold,
                    breaker_reset=settings.breaker_reset_timeout,
                    breaker_cache=settings.breaker_cache,
                )
                settle_gc()
                tasks = [asyncio.create_task(w.run(stop))]
                if relay:
                    r = _relay(lg, redis, agents, settings, from_start=from_start)
                    tasks.append(asyncio.create_task(r.serve(stop)))
                if not settings.log_json:  # JSON logs: every line JSON (worker.started says it)
                    err.print(
                        f"worker {w.consumer}: agents {', '.join(a.name for a in agents)}"
                        f"{' + relay' if relay else ''}; Ctrl-C or SIGTERM drains and stops"
                    )
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                stop.set()
                await asyncio.gather(*tasks)

        run(go())

    @app.command("relay")
    def relay_cmd(
        ctx: typer.Context,
        app_target: AppOption,
        from_start: FromStartOption = False,
        metrics_port: MetricsPortOption = 0,
    ) -> None:
        """Publish emitted events from the log to the streams of their subscribers.

        The relay's checkpoint belongs to AGENTRT_RELAY_NAME (`default`), not to
        the app's routes: an agent or subscription added later starts at the
        current position (or, with --from-start, gets the log it missed).
        """
        agents = load_agents(app_target)
        settings = with_servers(ctx.obj, redis=True)
        _serve_metrics(metrics_port, "relay")
        configure_tracing("agentrt-relay")

        async def go() -> None:
            stop = asyncio.Event()
            _stop_on_signals(stop)
            async with _opened(settings) as (lg, redis):
                await _relay(lg, redis, agents, settings, from_start=from_start).serve(stop)

        run(go())

    @dlq_app.command("list")
    def dlq_list(
        ctx: typer.Context,
        agent: Annotated[str | None, typer.Option(help="Only this agent's")] = None,
        count: Annotated[int, typer.Option(help="At most this many")] = 100,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    ) -> None:
        """Dead letters, oldest first."""
        settings = with_servers(ctx.obj, redis=True, postgres=False)

        async def go() -> list[dlq_mod.DeadLetter]:
            redis = await connect_redis(settings.require_redis_url())
            try:
                return await dlq_mod.list_dead_letters(redis, agent=agent, count=count)
            finally:
                await redis.aclose()

        letters = run(go())
        if as_json:
            import msgspec

            for x in letters:
                print(msgspec.json.encode(x).decode())
            return
        if not letters:
            out.print("no dead letters")
            return
        table = Table("id", "agent", "type", "event", "deliveries", "error")
        for column in table.columns[:4]:
            column.no_wrap = True
        for x in letters:
            table.add_row(x.id, x.agent, x.type or "?", x.event_id or "?", str(x.deliveries),
                          escape(f"{x.error_type}: {x.error}"[:120]))  # fmt: skip
        # Ids are wide: piped output gets room instead of 80 columns.
        wide = out if out.is_terminal else Console(highlight=False, width=200)
        wide.print(table)

    @dlq_app.command("show")
    def dlq_show(ctx: typer.Context, dead_letter_id: str) -> None:
        """One dead letter in full (JSON)."""
        import msgspec

        settings = with_servers(ctx.obj, redis=True, postgres=False)

        async def go() -> dlq_mod.DeadLetter:
            redis = await connect_redis(settings.require_redis_url())
            try:
                return await dlq_mod.get_dead_letter(redis, dead_letter_id)
            finally:
                await redis.aclose()

        letter = run(go())
        print(msgspec.json.format(msgspec.json.encode(letter), indent=2).decode())

    @dlq_app.command("redrive")
    def dlq_redrive(
        ctx: typer.Context,
        ids: Annotated[list[str] | None, typer.Argument(help="Dead-letter ids")] = None,
        all_: Annotated[bool, typer.Option("--all", help="Every dead letter")] = False,
        agent: Annotated[str | None, typer.Option(help="With --all: only this agent's")] = None,
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                help="Also redrive events their agent has handled since: the handler runs a "
                "second time (tools get the original idempotency keys)",
            ),
        ] = False,
    ) -> None:
        """Send dead letters back to their agents, as fresh activations.

        A dead letter whose event its agent has handled since is refused (the
        handler would run twice) unless --force.
        """
        if not ids and not all_:
            raise typer.BadParameter("give dead-letter ids, or --all")
        settings = with_servers(ctx.obj, redis=True)

        async def go() -> tuple[list[dlq_mod.RedrivePlan], list[RedriveRefused]]:
            async with _opened(settings) as (lg, redis):
                targets = list(ids or [])
                if all_:
                    letters = await dlq_mod.list_dead_letters(redis, agent=agent, count=10**6)
                    targets = [x.id for x in letters]
                done, refused = [], []
                for i in targets:
                    try:
                        done.append(await dlq_mod.redrive(redis, lg, i, force=force))
                    except RedriveRefused as exc:
                        refused.append(exc)
                return done, refused

        moved, refused = run(go())
        for plan in moved:
            note = " (forced: a second activation of a handled event)" if plan.forced else ""
            out.print(f"redrove {plan.dead_letter_id} -> {plan.entry_id}{note}")
        for exc in refused:
            err.print(f"[bold red]refused[/] {escape(f'[{exc.code}]')} {escape(exc.message)}")
        out.print(
            f"{len(moved)} dead letter(s) redriven"
            + (f", {len(refused)} refused" if refused else "")
        )
        if refused:
            raise typer.Exit(1)

    @app.command("approve")
    def approve(
        ctx: typer.Context,
        approval_id: Annotated[str | None, typer.Argument(help="The approval id")] = None,
        deny: Annotated[bool, typer.Option("--deny", help="Refuse instead")] = False,
        by: Annotated[str, typer.Option(help="Who decides (recorded)")] = "",
        comment: Annotated[str, typer.Option(help="Recorded with the decision")] = "",
    ) -> None:
        """Answer an approval request, after showing what it asks (no id: list the open ones,
        each with its subject, details, run, agent, deadline and default)."""
        import uuid
        from datetime import UTC, datetime

        from runtime.events.builtin import ApprovalRequested
        from runtime.log import approvals

        settings = with_servers(ctx.obj, redis=False)

        async def go() -> None:
            lg = await open_log(settings)
            now = datetime.now(UTC)
            try:
                if approval_id is None:
                    waiting = await approvals.pending_approvals(lg)
                    for aid, run_id, req in waiting:
                        for line in approvals.describe(aid, run_id, req, now=now):
                            out.print(escape(line))
                    if not waiting:
                        out.print("no approvals waiting")
                    return
                try:
                    target = uuid.UUID(approval_id)
                except ValueError:
                    raise typer.BadParameter(f"{approval_id!r} is not a UUID") from None
                asked = await approvals.request_of(lg, target)
                assert isinstance(asked.body, ApprovalRequested)
                for line in approvals.describe(target, asked.run_id, asked.body, now=now):
                    out.print(escape(line))
                await approvals.decide(lg, target, approved=not deny, by=by, comment=comment)
                out.print(f"{'denied' if deny else 'approved'} {target}")
            finally:
                await lg.pool.close()

        run(go())

    app.add_typer(dlq_app, name="dlq")
