"""``agentrt fork`` (a past run, re-run live from a step with a change) and ``agentrt diff``."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer
from rich.markup import escape

if TYPE_CHECKING:
    # The model SDK comes with these: imported by the commands that need them, so every
    # other `agentrt` command starts without it.
    from projections.diff import RunDiff, Totals
    from projections.fork import ForkReport
from projections.cli.common import command_settings
from runtime.cli import err, fail, load_agents, open_log, out, run, with_servers
from runtime.errors import SettingsError
from runtime.settings import Settings

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object instead of the text")]


def _settings(ctx: typer.Context) -> Settings:
    return command_settings(ctx, quiet=True)


def _run_id(value: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"not a run id (a UUID): {value!r}", param_hint=name) from None


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=option) from None


def _prompt(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = _read(path, "--prompt-file").decode()
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{path} is not UTF-8 text", param_hint="--prompt-file") from None
    if not text.strip():
        raise typer.BadParameter(f"{path} is empty", param_hint="--prompt-file")
    return text


def _say(text: str) -> None:
    """A line of the report, never folded to the terminal's width (ids, diffs)."""
    out.print(text, soft_wrap=True)


def _usd(value: float) -> str:
    return f"${value:.6f}"


def _print_fork(report: ForkReport) -> None:
    _say(
        f"forked run [bold]{report.run_id}[/] from {report.parent_run_id} at step {report.at_step}"
    )
    changed = [f"{k}={v!r}" for k, v in report.change.items() if v not in (None, False)]
    _say(f"change: {', '.join(changed) if changed else 'none (the same settings, live)'}")
    for a in report.activations:

        def span(steps: list[int]) -> str:
            return ", ".join(map(str, steps)) or "-"

        parent = "new" if a.parent_activation_id is None else f"parent {a.parent_activation_id}"
        _say(
            f"  {escape(a.agent)} on {a.trigger_type} ({parent}): reused steps "
            f"{span(a.reused)}; live steps {span(a.live)}; {a.outcome}"
        )
        if a.error:
            _say(f"    [red]{escape(a.error)}[/]")
    _say(
        f"live: {report.model_calls} model call(s), {report.tool_calls} tool call(s), "
        f"{report.input_tokens} tokens in, {report.output_tokens} out, "
        f"{_usd(report.cost_usd)}"
    )


def _totals(label: str, t: Totals) -> str:
    return (
        f"{label}: {t.steps} steps ({t.model_calls} model, {t.tool_calls} tool), "
        f"{t.input_tokens} tokens in, {t.output_tokens} out, {_usd(t.cost_usd)}, "
        f"{t.duration_ms:.0f} ms"
    )


def _print_diff(d: RunDiff) -> None:
    _say(f"A {d.run_a}\nB {d.run_b}")
    first = d.first_difference
    _say("identical: no differences" if first is None else f"first difference: {first}")
    for a in d.activations:
        if a.same:
            _say(f"  = {escape(a.agent)} #{a.ordinal + 1} ({a.trigger_type_a}): same")
            continue
        if a.only_in is not None:
            _say(f"  ! {escape(a.agent)} #{a.ordinal + 1}: only in run {a.only_in.upper()}")
            continue
        _say(
            f"  ~ {escape(a.agent)} #{a.ordinal + 1} ({a.trigger_type_a} / "
            f"{a.trigger_type_b}): outcome {a.outcome_a} / {a.outcome_b}"
        )
        for s in a.steps:
            what = "request differs" if not s.same_request else "result differs"
            _say(
                f"    step {s.run_step_a or '-'} / {s.run_step_b or '-'} "
                f"({escape(s.call_a or '-')} / {escape(s.call_b or '-')}): {what}; "
                f"cost {_usd(s.cost_a)} / {_usd(s.cost_b)}"
            )
            for line in s.diff:
                _say(f"      {escape(line)}")
        for line in a.emitted:
            _say(f"    {escape(line)}")
    _say(_totals("A", d.totals_a))
    _say(_totals("B", d.totals_b))


def _json(data: Any) -> None:
    print(msgspec.json.encode(data).decode())


def register(app: typer.Typer) -> None:
    """Add ``fork`` and ``diff`` to ``app``."""

    @app.command("fork")
    def fork_command(
        ctx: typer.Context,
        run_id: Annotated[str, typer.Argument(help="The run to fork (its id)")],
        at: Annotated[int, typer.Option("--at", help="Run-level step (1-based) to run live from")],
        app_target: Annotated[
            str, typer.Option("--app", help="Module with your agents (as for `agentrt worker`)")
        ],
        model: Annotated[
            str | None, typer.Option(help="Model id for every model step from --at on")
        ] = None,
        tier: Annotated[
            str | None, typer.Option(help="Tier whose model every model step from --at on uses")
        ] = None,
        prompt_file: Annotated[
            Path | None, typer.Option(help="A system prompt for the model steps from --at on")
        ] = None,
        input_file: Annotated[
            Path | None, typer.Option(help="A JSON body replacing the run's trigger body")
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """A new run linked to RUN_ID: its recorded results before --at, live from there."""
        parent = _run_id(run_id, "RUN_ID")
        if model is not None and tier is not None:
            raise typer.BadParameter("give --model or --tier, not both", param_hint="--model")
        prompt = _prompt(prompt_file)
        raw_input = _read(input_file, "--input-file") if input_file is not None else None
        agents = load_agents(app_target)
        settings = with_servers(_settings(ctx), redis=True)
        if tier is not None:
            from runtime.llm.client import model_for

            try:
                model = model_for(settings, tier)
            except SettingsError as exc:
                fail(exc)

        async def go() -> ForkReport:
            from projections.fork import Change, decode_input, fork_live, plan_fork

            lg = await open_log(settings)
            try:
                # Every check before anything is written (or a model server started).
                plan = await plan_fork(lg, parent, at, agents)
                body = decode_input(plan.parent, raw_input) if raw_input is not None else None
                change = Change(model=model, tier=tier, prompt=prompt, body=body)
                return await fork_live(lg, plan, change, settings)
            finally:
                await lg.pool.close()

        report = run(go())
        if as_json:
            _json(report.to_json())
        else:
            _print_fork(report)
        if any(a.outcome == "dead_lettered" for a in report.activations):
            err.print("[yellow]note:[/] an activation of the fork failed (dead-lettered above)")
            raise typer.Exit(1)

    @app.command("diff")
    def diff_command(
        ctx: typer.Context,
        run_a: Annotated[str, typer.Argument(help="A run id")],
        run_b: Annotated[str, typer.Argument(help="Another run id (a fork of A, say)")],
        as_json: JsonOption = False,
    ) -> None:
        """Where two runs' steps, outputs and emitted events differ, and what each cost."""
        a, b = _run_id(run_a, "RUN_A"), _run_id(run_b, "RUN_B")
        settings = with_servers(_settings(ctx))

        async def go() -> RunDiff:
            from projections.diff import diff_runs

            lg = await open_log(settings)
            try:
                return await diff_runs(lg, a, b)
            finally:
                await lg.pool.close()

        d = run(go())
        if as_json:
            _json(d.to_json())
        else:
            _print_diff(d)
