"""``agentrt replay``: re-run past runs with the agents' current code, report any divergence.

``agentrt replay RUN_ID --app MODULE`` replays one run; ``agentrt replay --since
DATE [--until DATE] [--agent A] --app MODULE`` replays every run started in the
range (for a CI job: exit 1 on any divergence). ``--app`` may come from
``AGENTRT_APP``. Nothing is called and nothing is written.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runtime.agents.agent import Agent

if TYPE_CHECKING:
    # Replay brings the model layer (and its SDK): imported when a replay runs.
    from projections.replay import ActivationReplay, RunReplay
from projections.cli.common import command_settings
from runtime.cli import err, load_agents, open_log, out, run, with_servers
from runtime.log.queries import LogQueries
from runtime.settings import Settings

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class ReplaySummary(msgspec.Struct, frozen=True, kw_only=True):
    """The last line of ``replay --since --json``: what a CI job checks."""

    runs: int
    activations: int
    #: Activations replayed identical / divergent.
    identical: int
    divergent: int
    divergent_runs: list[uuid.UUID]


def parse_when(value: str, *, end: bool = False, now: datetime | None = None) -> datetime:
    """A point in time: ISO 8601 (naive means UTC), a date, or an age like ``7d`` / ``12h``.

    A bare date as an ``--until`` (``end``) means the end of that day.
    """
    text = value.strip()
    if m := _RELATIVE.match(text):
        ago = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        return (now or datetime.now(UTC)) - ago
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date: use 2024-05-01, 2024-05-01T12:00:00+00:00 or an age "
            "like 7d, 12h, 30m"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _settings(ctx: typer.Context) -> Settings:
    return command_settings(ctx, quiet=True)


# -- printing ---------------------------------------------------------------------------


def _diff_lines(diff: str) -> list[str]:
    lines = []
    for line in diff.splitlines():
        style = "red" if line.startswith("-") else "green" if line.startswith("+") else "dim"
        if line.startswith("@@"):
            style = "cyan"
        lines.append(f"      [{style}]{escape(line)}[/]")
    return lines


def _activation_lines(a: ActivationReplay) -> list[str]:
    steps = f"{a.steps} step{'s' if a.steps != 1 else ''}"
    head = f"  {escape(a.agent):<16} {escape(a.trigger_type):<28} {steps:<9}"
    d = a.divergence
    if d is None:
        note = f" [dim]({escape(a.note)})[/]" if a.note else ""
        return [f"{head} [green]identical[/]{note}"]
    return [f"{head} [bold red]DIVERGED {d.where}[/]: {escape(d.message)}", *_diff_lines(d.diff)]


def print_run(report: RunReplay) -> None:
    verdict = "[green]identical[/]" if report.identical else "[bold red]divergent[/]"
    count = len(report.activations)
    if count == 0:
        verdict += " (the log holds no activation of it to replay)"
    out.print(f"run {report.run_id}: {count} activations, {verdict}")
    for a in report.activations:
        for line in _activation_lines(a):
            out.print(line, soft_wrap=True, emoji=False)


def _json(report: RunReplay) -> bytes:
    return msgspec.json.encode(
        {"run_id": report.run_id, "identical": report.identical, "activations": report.activations}
    )


def _line(data: bytes) -> None:
    """One JSON line on stdout, byte for byte (no markup, emoji or wrapping)."""
    sys.stdout.write(data.decode() + "\n")
    sys.stdout.flush()


def summarize(reports: Sequence[RunReplay]) -> ReplaySummary:
    acts = [a for r in reports for a in r.activations]
    same = sum(1 for a in acts if a.identical)
    return ReplaySummary(
        runs=len(reports),
        activations=len(acts),
        identical=same,
        divergent=len(acts) - same,
        divergent_runs=[r.run_id for r in reports if not r.identical],
    )


# -- the command -------------------------------------------------------------------------


async def _one(settings: Settings, agents: list[Agent], run_id: uuid.UUID, app: str,
               as_json: bool) -> bool:  # fmt: skip
    from projections.replay import replay_run

    lg = await open_log(settings)
    try:
        report = await replay_run(lg, agents, run_id, settings=settings, app=app)
    finally:
        await lg.pool.close()
    if as_json:
        _line(_json(report))
    else:
        print_run(report)
    return report.identical


async def _many(
    settings: Settings,
    agents: list[Agent],
    since: datetime,
    until: datetime | None,
    agent: str | None,
    app: str,
    as_json: bool,
) -> bool:
    from projections.replay import replay_run

    lg = await open_log(settings)
    reports: list[RunReplay] = []
    try:
        run_ids = await LogQueries(lg).runs_between(since, until, agent)
        columns: list[Any] = [TextColumn("replay"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("runs"), TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task("replay", total=len(run_ids))
            for run_id in run_ids:
                report = await replay_run(lg, agents, run_id, settings=settings, app=app)
                reports.append(report)
                if as_json:
                    _line(_json(report))
                elif not report.identical:
                    print_run(report)
                progress.advance(task)
    finally:
        await lg.pool.close()
    summary = summarize(reports)
    if as_json:
        _line(msgspec.json.encode(summary))
    else:
        window = f"since {since.isoformat()}" + (f" until {until.isoformat()}" if until else "")
        who = f" with agent {agent!r}" if agent else ""
        out.print(
            f"{summary.runs} runs {window}{who}: {summary.activations} activations, "
            f"[green]{summary.identical} identical[/], "
            f"[{'bold red' if summary.divergent else 'green'}]{summary.divergent} divergent[/]"
        )
        for run_id in summary.divergent_runs:
            out.print(f"  [red]divergent[/] run {run_id}")
    return summary.divergent == 0


def register(app: typer.Typer) -> None:
    """Add ``agentrt replay``."""

    @app.command("replay")
    def replay(
        ctx: typer.Context,
        app_target: Annotated[
            str,
            typer.Option(
                "--app",
                envvar="AGENTRT_APP",
                help="Module with your agents' current code, as for `agentrt worker` "
                "(`mypkg.agents` or `mypkg.agents:attr`; AGENTRT_APP)",
                show_default=False,
            ),
        ],
        run_id: Annotated[
            str | None,
            typer.Argument(help="The run to replay (or use --since)", show_default=False),
        ] = None,
        since: Annotated[
            str | None,
            typer.Option(help="Replay every run started since: 2024-05-01, an ISO time, or 7d"),
        ] = None,
        until: Annotated[
            str | None, typer.Option(help="... and before this (a bare date: to its end)")
        ] = None,
        agent: Annotated[
            str | None, typer.Option("--agent", help="Only runs in which this agent ran")
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="One JSON line per run (and a summary line)")
        ] = False,
    ) -> None:
        """Re-run past runs with the agents' current code and compare with the record.

        Exit 0 if every activation is identical, 1 on any divergence (or error).
        Nothing is called (no model, no tool) and nothing is written.
        """
        if (run_id is None) == (since is None):
            raise typer.BadParameter("give either RUN_ID or --since DATE (not both)")
        if run_id is not None and (until is not None or agent is not None):
            raise typer.BadParameter("--until and --agent go with --since, not with RUN_ID")
        target_run = None
        if run_id is not None:
            try:
                target_run = uuid.UUID(run_id)
            except ValueError:
                raise typer.BadParameter(f"{run_id!r} is not a run id (a UUID)") from None
        start = parse_when(since) if since is not None else None
        end = parse_when(until, end=True) if until is not None else None
        agents = load_agents(app_target)
        settings = with_servers(_settings(ctx), redis=False)
        label = f"--app {app_target}"
        if target_run is not None:
            ok = run(_one(settings, agents, target_run, label, as_json))
        else:
            assert start is not None
            ok = run(_many(settings, agents, start, end, agent, label, as_json))
        if not ok:
            raise typer.Exit(1)
