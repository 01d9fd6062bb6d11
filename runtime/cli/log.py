"""``agentrt log``: read the event log."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, Any

import msgspec
import typer

from runtime.cli.helpers import open_log, out, run, with_servers
from runtime.events.ids import run_stream
from runtime.events.model import START, LogPosition, RecordedEvent, UnknownEvent
from runtime.log.store import EventLog

log_app = typer.Typer(help="Read the event log.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(log_app, name="log")


def _body(e: RecordedEvent) -> Any:
    """The body as plain data; a type this process does not know prints as stored."""
    if isinstance(e.body, UnknownEvent):
        return msgspec.json.decode(e.body.data)
    return msgspec.to_builtins(e.body)


def _event_json(e: RecordedEvent) -> dict[str, Any]:
    return {
        "position": e.position,
        "tx": e.tx,
        "event_id": str(e.event_id),
        "type": e.event_type,
        "schema_version": e.schema_version,
        "stream_id": e.stream_id,
        "stream_version": e.stream_version,
        "run_id": None if e.run_id is None else str(e.run_id),
        "causation_id": None if e.causation_id is None else str(e.causation_id),
        "producer": e.producer,
        "recorded_at": e.recorded_at.isoformat(),
        "trace": e.trace,
        "prev_hash": e.prev_hash.hex(),
        "hash": e.hash.hex(),
        "body": _body(e),
    }


def print_event(e: RecordedEvent, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(msgspec.json.encode(_event_json(e)).decode() + "\n")
        sys.stdout.flush()
        return
    body = _body(e)
    if isinstance(body, dict):
        body.pop("type", None)
    run = f" run={e.run_id}" if e.run_id and e.stream_id != run_stream(e.run_id) else ""
    out.print(
        f"[dim]{e.recorded_at:%Y-%m-%d %H:%M:%S.%f}[/] [cyan]#{e.position}[/] "
        f"[bold]{e.event_type}[/] v{e.schema_version} {e.stream_id}@{e.stream_version}{run}"
        f"{' by ' + e.producer if e.producer else ''}\n    {msgspec.json.encode(body).decode()}",
        soft_wrap=True,
    )


@log_app.command("tail")
def log_tail(
    ctx: typer.Context,
    last: Annotated[int, typer.Option("--last", "-n", help="Start with the last N events")] = 10,
    after: Annotated[
        str | None,
        typer.Option(help="Start after this log position (TX:POSITION, as --json prints)"),
    ] = None,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Start at the beginning")
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", "-f", help="Keep printing new events")
    ] = True,
    limit: Annotated[int | None, typer.Option(help="Stop after printing N events")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
) -> None:
    """Print events as they are appended (Ctrl-C to stop)."""
    settings = with_servers(ctx.obj)
    try:
        start = LogPosition.parse(after) if after else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--after") from None

    async def go() -> None:
        lg = await open_log(settings)
        printed = 0

        def show(e: RecordedEvent) -> bool:
            nonlocal printed
            print_event(e, as_json=as_json)
            printed += 1
            return limit is not None and printed >= limit

        try:
            position = start or START
            if start is None and not from_start:
                backlog = await lg.read_last(last)
                for e in backlog:
                    if show(e):
                        return
                    position = e.log_position
                if not backlog:
                    position = await _head(lg)
            if not follow:
                while batch := await lg.read_all(position, 1000):
                    for e in batch:
                        if show(e):
                            return
                        position = e.log_position
                return
            async for e in lg.subscribe(position, poll_interval=settings.poll_interval):
                if show(e):
                    return
        finally:
            await lg.pool.close()

    with contextlib.suppress(KeyboardInterrupt):
        run(go())


async def _head(lg: EventLog) -> LogPosition:
    last = await lg.read_last(1)
    return last[-1].log_position if last else START
