"""``agentrt runs export RUN_ID`` and ``agentrt runs import FILE``: ``register(runs_app)``
adds them to the ``runs`` group (projections/cli/runs.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated
from uuid import UUID

import typer

from projections.errors import ImportRefused
from projections.transfer import export_run, import_run, parse_export
from runtime.cli import err, open_log, out, run, settings_of, with_servers


def register(runs_app: typer.Typer) -> None:
    """Add ``export`` and ``import`` to the ``runs`` group (once)."""
    if any(c.callback is runs_export for c in runs_app.registered_commands):
        return
    runs_app.command("export")(runs_export)
    runs_app.command("import")(runs_import)


def _run_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a run id (a UUID)", param_hint="RUN_ID"
        ) from None


def runs_export(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to export (its id)")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default: stdout)")
    ] = None,
) -> None:
    """Export a run as JSON lines: every event with its hash chain, to import elsewhere."""
    rid = _run_id(run_id)
    settings = with_servers(settings_of(ctx))

    async def go() -> list[bytes]:
        log = await open_log(settings)
        try:
            return await export_run(log, rid)
        finally:
            await log.pool.close()

    lines = run(go())
    if output is None:
        sys.stdout.buffer.writelines(lines)
        sys.stdout.flush()
        return
    # Written only once the run was read whole: an unknown run leaves no file behind.
    output.write_bytes(b"".join(lines))
    err.print(f"exported run {rid}: {len(lines) - 1} events to {output}")


def runs_import(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(help="An export (from `agentrt runs export`); - for stdin")
    ],
) -> None:
    """Import an exported run, after verifying every event's hash and every stream's chain."""
    settings = with_servers(settings_of(ctx))

    async def go() -> None:
        if str(file) == "-":
            lines = sys.stdin.buffer.read().splitlines()
        else:
            try:
                lines = file.read_bytes().splitlines()
            except OSError as exc:
                raise ImportRefused(f"cannot read {file}: {exc.strerror or exc}") from None
        export = parse_export(lines)
        log = await open_log(settings)
        try:
            report = await import_run(log, export)
        finally:
            await log.pool.close()
        skipped = "".join(
            f"\n  skipped {n} event(s) of {s} (not the run's own stream)"
            for s, n in sorted(report.skipped.items())
        )
        if report.already_present:
            out.print(f"run {report.run_id} already present: nothing imported{skipped}")
            return
        out.print(
            f"imported run {report.run_id}: {report.imported} events in "
            f"{len(report.streams)} streams, hash chain verified{skipped}"
        )

    run(go())
