"""``agentrt runs``: the runs table, one run's timeline, export and import.

``export`` and ``import`` come from ``projections.cli.transfer``.
Both views read the read models (:class:`projections.queries.ReadModels`) after one
catch-up of the projections they read, so what the terminal shows is never behind the log.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated, TypeVar
from uuid import UUID

import msgspec
import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from projections.cli.common import command_settings
from projections.queries import STATUSES, MachineRow, Page, ReadModels, RunRow, TimelineEntry
from runtime.cli import err, importable_cwd, open_log, out, run, with_servers
from runtime.settings import Settings

T = TypeVar("T")

runs_app = typer.Typer(help="Inspect, export and import runs.")

#: How each status is coloured.
STATUS_STYLE = {
    "running": "cyan",
    "waiting_for_approval": "yellow",
    "completed": "green",
    "failed": "bold red",
    "dead_lettered": "red",
    "budget_exceeded": "magenta",
}

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        help="Module with your agents (as for `agentrt projector`): the runs read model "
        "then knows who has yet to handle an event (env AGENTRT_APP)",
        envvar="AGENTRT_APP",
    ),
]
CatchUpOption = Annotated[
    bool,
    typer.Option(
        "--catch-up/--no-catch-up",
        help="First fold the log's new events into the read models (one pass to the head)",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON instead of a table")]


def register(app: typer.Typer) -> None:
    """Add ``agentrt runs ...`` to ``app``."""
    from projections.cli import transfer

    transfer.register(runs_app)

    app.add_typer(runs_app, name="runs")


def _settings(ctx: typer.Context) -> Settings:
    return with_servers(command_settings(ctx, quiet=True))


async def read(
    settings: Settings,
    query: Callable[[ReadModels], Awaitable[T]],
    *,
    catch_up: Sequence[str] = (),
    app: str | None = None,
) -> T:
    """``query`` over the read models, after one catch-up of the projections named in
    ``catch_up`` (only those: a catch-up here never rebuilds the others, e.g. the agent
    state that ``agentrt projector --app`` folds with the app's code)."""
    from projections.builtin import builtin_projections
    from projections.engine import Projector
    from projections.registry import load_app_projections

    log = await open_log(settings)
    try:
        if catch_up:
            importable_cwd()
            agents = load_app_projections(app)[0] if app else []
            chosen = [p for p in builtin_projections(agents, settings) if p.name in catch_up]
            folded = await Projector(log, chosen, settings).catch_up()
            if folded:
                err.print(f"[dim]caught up: {folded} new events folded[/]")
        return await query(ReadModels(log.pool, settings))
    finally:
        await log.pool.close()


# -- formatting ------------------------------------------------------------------------


def duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.1f} min"


def cost(usd: float | None) -> str:
    return "-" if usd is None else f"${usd:.4f}"


def tokens(inp: int | None, outp: int | None) -> str:
    if inp is None and outp is None:
        return "-"
    return f"{inp or 0}→{outp or 0}"


def when(at: datetime | None, *, short: bool = False) -> str:
    if at is None:
        return "-"
    return at.astimezone().strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S")


def status(s: str) -> str:
    return f"[{STATUS_STYLE.get(s, 'white')}]{escape(s)}[/]"


def runs_table(rows: Sequence[RunRow]) -> Table:
    # No box: a run id is 36 characters and must never be cut (it is what users copy).
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1))
    forks = any(r.parent_run_id is not None for r in rows)
    machines = any(r.states for r in rows)
    table.add_column("run", no_wrap=True, min_width=36)
    table.add_column("started", no_wrap=True)
    table.add_column("status", no_wrap=True)
    if machines:  # only when a run has a state machine
        table.add_column("state", overflow="fold")
    table.add_column("trigger", overflow="fold", min_width=14)
    table.add_column("agents", overflow="fold", min_width=10)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("cost", justify="right", no_wrap=True, min_width=7)
    table.add_column("llm/tool", justify="right", no_wrap=True)
    if forks:  # only when a row has one: the table stays readable at 120 columns
        table.add_column("parent @step", no_wrap=True)
    for r in rows:
        trigger = r.trigger_type or r.source or "-"
        cells = [
            str(r.run_id),
            when(r.started_at, short=True),
            status(r.status),
            *([escape(machine_states(r.states))] if machines else []),
            escape(trigger),
            escape(", ".join(r.agents)) or "-",
            duration(r.duration_ms),
            tokens(r.input_tokens, r.output_tokens),
            cost(r.cost_usd),
            f"{r.llm_calls}/{r.tool_calls}",
        ]
        if forks:
            parent = "-"
            if r.parent_run_id is not None:
                step = f" @{r.fork_step}" if r.fork_step is not None else ""
                parent = f"{r.parent_run_id}{step}"
            cells.append(parent)
        table.add_row(*cells)
    return table


def machine_states(states: dict[str, str]) -> str:
    """A run's state machines: the state alone for one, ``agent:state`` for several."""
    if not states:
        return "-"
    if len(states) == 1:
        return next(iter(states.values()))
    return ", ".join(f"{a}:{s}" for a, s in sorted(states.items()))


def machine_lines(machines: Sequence[MachineRow]) -> list[str]:
    """One line per state machine of a run (markup)."""
    lines = []
    for m in machines:
        facts = [f"{m.transitions} transition{'' if m.transitions == 1 else 's'}"]
        if m.previous is not None:
            facts.insert(0, f"from {escape(m.previous)}")
        if m.refused:
            facts.append(f"[red]{m.refused} refused[/] (last {escape(m.last_refused or '')})")
        lines.append(f"state     {escape(m.agent)}: [bold]{escape(m.state)}[/]  "
                     f"({', '.join(facts)})")  # fmt: skip
    return lines


def summary(r: RunRow) -> list[str]:
    """The run's facts, one per line (markup)."""
    lines = [
        f"[bold]run[/] {r.run_id}  {status(r.status)}",
        f"trigger   {escape(r.trigger_type or '-')} from {escape(r.source or '-')}",
        f"started   {when(r.started_at)}   finished {when(r.finished_at)}   "
        f"duration {duration(r.duration_ms)}",
        f"agents    {escape(', '.join(r.agents)) or '-'}   activations {r.activations}   "
        f"events {r.events}",
        f"calls     {r.llm_calls} llm, {r.tool_calls} tool, {r.retries} retries",
        f"tokens    {tokens(r.input_tokens, r.output_tokens)}   cost {cost(r.cost_usd)}",
    ]
    for model, u in sorted(r.usage.items()):
        lines.append(
            f"  {escape(model)}: {u.calls} calls, {tokens(u.input_tokens, u.output_tokens)}, "
            f"{cost(u.cost_usd)}"
        )
    if r.parent_run_id is not None:
        lines.append(f"forked    from {r.parent_run_id} at step {r.fork_step}")
    if r.error:
        lines.append(f"[red]error[/]     {escape(r.error_type or '')}: {escape(r.error)}")
    return lines


def entry_label(e: TimelineEntry) -> str:
    """One timeline entry: a step with its kind, name, duration, tokens and cost; an
    activation's completion with its duration; any other event with its summary."""
    where = f"[dim]#{e.position}[/] "
    if e.event_type == "step.recorded":
        name = " ".join(x for x in (e.kind, e.name) if x)
        if e.model and e.model != e.name:
            name += f" ({e.model})"
        facts = [duration(e.duration_ms)]
        if e.input_tokens is not None or e.output_tokens is not None:
            facts += [f"{tokens(e.input_tokens, e.output_tokens)} tokens", cost(e.cost_usd)]
        return (
            f"{where}[bold]step {e.step}[/] {escape(name)} [dim]{escape(e.agent or '')}[/]  "
            + "  ".join(facts)
        )
    text = e.summary.removeprefix(e.event_type).strip()
    if e.event_type == "activation.completed":
        return f"{where}[green]activation.completed[/]  {escape(text)}"
    style = "bold yellow" if e.depth == 0 else "bold cyan"
    return f"{where}[{style}]{escape(e.event_type)}[/]  {escape(text)}"


def timeline_tree(entries: Sequence[TimelineEntry]) -> Tree:
    """The run's events as a tree by causation: each event under the one that caused it
    (a trigger, then its activations' steps and emitted events, their activations...)."""
    root = Tree(f"[bold]timeline[/] [dim]({len(entries)} events)[/]")
    nodes: dict[UUID, Tree] = {}
    for e in entries:  # depth-first: a parent always comes before its children
        parent = nodes.get(e.parent) if e.parent is not None else None
        nodes[e.event_id] = (parent or root).add(entry_label(e))
    return root


# -- commands ---------------------------------------------------------------------------


@runs_app.callback(invoke_without_command=True)
def runs_list(
    ctx: typer.Context,
    status_: Annotated[
        str | None,
        typer.Option("--status", help=f"Only runs in this status ({', '.join(STATUSES)})"),
    ] = None,
    agent: Annotated[str | None, typer.Option(help="Only runs this agent took part in")] = None,
    source: Annotated[str | None, typer.Option(help="Only runs from this source")] = None,
    since: Annotated[
        datetime | None,
        typer.Option(help="Started at or after (ISO date or time; local time zone if none)"),
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(help="Started before (ISO date or time)")
    ] = None,
    limit: Annotated[int, typer.Option(help="Runs per page", min=1, max=1000)] = 20,
    cursor: Annotated[
        str | None, typer.Option(help="The cursor a previous page printed: the page after it")
    ] = None,
    json_: JsonOption = False,
    catch_up: CatchUpOption = True,
    app: AppOption = None,
) -> None:
    """List runs, newest first: status, trigger, agents, duration, tokens, cost, calls.

    The read models are first brought up to date with the log (one catch-up pass of the
    runs projection), so the table is never stale; --no-catch-up shows them as the
    projector left them. `agentrt runs show RUN_ID` shows one run's timeline.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(ctx)
    aware = [x.astimezone() if x is not None and x.tzinfo is None else x for x in (since, until)]

    async def query(models: ReadModels) -> Page[RunRow]:
        return await models.runs(
            status=status_,
            agent=agent,
            source=source,
            since=aware[0],
            until=aware[1],
            limit=limit,
            cursor=cursor,
        )

    page = run(read(settings, query, catch_up=("runs", "machines") if catch_up else (), app=app))
    if json_:
        sys.stdout.buffer.write(msgspec.json.encode(page) + b"\n")
        sys.stdout.flush()
        return
    if not page.items:
        out.print("no runs" + (" match these filters" if cursor is None else " after this cursor"))
    else:
        out.print(runs_table(page.items))
    if page.next_cursor is not None:
        err.print(f"more: --cursor {page.next_cursor} (with the same filters)")


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run (its id: the trigger event's id)")],
    json_: JsonOption = False,
    catch_up: CatchUpOption = True,
    app: AppOption = None,
) -> None:
    """One run: its summary, then its timeline as a tree by causation.

    Each event hangs under the event that caused it (a trigger, then its activations'
    steps with kind, name, duration, tokens and cost, and the events they emitted, then
    those events' activations...).
    """
    try:
        rid = UUID(run_id)
    except ValueError:
        raise typer.BadParameter(
            f"{run_id!r} is not a run id (a UUID)", param_hint="RUN_ID"
        ) from None
    settings = _settings(ctx)

    async def query(
        models: ReadModels,
    ) -> tuple[RunRow, list[TimelineEntry], list[MachineRow]]:
        return await models.run(rid), await models.timeline(rid), await models.machines(rid)

    views = ("runs", "timeline", "machines") if catch_up else ()
    row, entries, machines = run(read(settings, query, catch_up=views, app=app))
    if json_:
        doc = {"run": row, "timeline": entries, "machines": machines}
        sys.stdout.buffer.write(msgspec.json.encode(doc) + b"\n")
        sys.stdout.flush()
        return
    for line in [*summary(row), *machine_lines(machines)]:
        out.print(line)
    out.print()
    out.print(timeline_tree(entries))
