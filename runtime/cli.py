"""The ``agentrt`` command: services, db, audit, log; plugins add the rest."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Coroutine
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.markup import escape

from runtime import audit as audit_mod
from runtime import migrations
from runtime.database import connect, open_runtime_pool, redact, runtime_url
from runtime.embedded import EmbeddedServices
from runtime.errors import AgentrtError, SettingsError
from runtime.events import START, LogPosition, RecordedEvent, UnknownEvent
from runtime.log import EventLog
from runtime.logconfig import configure_logging
from runtime.settings import Settings

T = TypeVar("T")
PLUGIN_GROUP = "agentrt.commands"

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="agentrt",
    help="An event-sourced runtime for production LLM agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
services_app = typer.Typer(
    help="Start, stop and inspect the embedded Redis and PostgreSQL.", no_args_is_help=True
)
db_app = typer.Typer(
    help="Schema migrations and the log's append-only guards.", no_args_is_help=True
)
audit_app = typer.Typer(
    help="Tamper evidence: seal stream heads, verify the hash chains.", no_args_is_help=True
)
log_app = typer.Typer(help="Read the event log.", no_args_is_help=True)
app.add_typer(services_app, name="services")
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(log_app, name="log")


# -- settings and servers ------------------------------------------------------


@app.callback()
def _root(
    ctx: typer.Context,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where embedded servers keep their data "
            "(env AGENTRT_STATE_DIR; default ./.agentrt)"
        ),
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis to use instead of the embedded one (env REDIS_URL)")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL to migrate with instead of the embedded one (env DATABASE_URL)"
        ),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option(help="PostgreSQL schema of the log (env AGENTRT_DB_SCHEMA; default agentrt)"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error (env AGENTRT_LOG_LEVEL)")
    ] = None,
    log_json: Annotated[
        bool | None,
        typer.Option("--log-json/--log-console", help="Log lines as JSON (env AGENTRT_LOG_JSON)"),
    ] = None,
) -> None:
    try:
        settings = Settings.from_env(
            state_dir=state_dir,
            redis_url=redis_url,
            database_url=database_url,
            db_schema=schema,
            log_level=log_level,
            log_json=log_json,
        )
    except SettingsError as exc:
        _fail(exc)
    configure_logging(settings.log_level, json=settings.log_json)
    ctx.obj = settings


def _fail(exc: AgentrtError) -> Any:
    err.print(f"[bold red]error[/] {escape(f'[{exc.code.value}]')} {escape(exc.message)}")
    raise typer.Exit(2 if isinstance(exc, SettingsError) else 1)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except AgentrtError as exc:
        return _fail(exc)  # type: ignore[no-any-return]


def _with_servers(settings: Settings, *, redis: bool = False, postgres: bool = True) -> Settings:
    """Fill in missing URLs by starting the embedded servers (they keep running)."""
    need_redis = redis and settings.redis_url is None
    need_pg = postgres and settings.database_url is None
    if not (need_redis or need_pg):
        return settings
    services = EmbeddedServices(settings.state_dir)
    try:
        urls = services.up(redis=need_redis, postgres=need_pg)
    except AgentrtError as exc:
        _fail(exc)
    for key, url in urls.items():
        name = "redis" if key == "REDIS_URL" else "postgres"
        err.print(
            f"[dim]using embedded {name} at {url} "
            f"(state in {settings.state_dir}/; `agentrt services down` stops it)[/]"
        )
    return settings.with_urls(
        redis_url=urls.get("REDIS_URL"), database_url=urls.get("DATABASE_URL")
    )


async def _open_log(settings: Settings) -> EventLog:
    """Apply pending migrations, then connect as the runtime's role."""
    report = await migrations.migrate(settings)
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")
    pool = await open_runtime_pool(settings)
    return EventLog(pool, schema=settings.db_schema)


# -- services ------------------------------------------------------------------


@services_app.command("up")
def services_up(ctx: typer.Context) -> None:
    """Start the embedded servers (if not running) and print the URLs to use."""
    settings: Settings = ctx.obj
    started = time.monotonic()
    try:
        urls = EmbeddedServices(settings.state_dir).up()
    except AgentrtError as exc:
        _fail(exc)
    err.print(
        f"[green]embedded services up[/] in {time.monotonic() - started:.1f}s "
        f"(data in {settings.state_dir.resolve()})"
    )
    for key, url in urls.items():
        out.print(f"export {key}={url}")


@services_app.command("down")
def services_down(ctx: typer.Context) -> None:
    """Stop the embedded servers; their data stays in the state directory."""
    settings: Settings = ctx.obj
    try:
        stopped = EmbeddedServices(settings.state_dir).down()
    except AgentrtError as exc:
        _fail(exc)
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services_app.command("status")
def services_status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """Show whether the embedded servers run, their URLs, versions and data."""
    settings: Settings = ctx.obj
    states = EmbeddedServices(settings.state_dir).status()
    if as_json:
        out.print_json(
            data=[
                {
                    "name": s.name,
                    "running": s.running,
                    "url": s.url,
                    "pid": s.pid,
                    "data_dir": str(s.data_dir),
                    "version": s.version,
                }
                for s in states
            ]
        )
        return
    for s in states:
        mark = "[green]running[/]" if s.running else "[red]stopped[/]"
        out.print(f"{s.name:9} {mark:20} {s.url or '-':45} {s.version}  data: {s.data_dir}")
    for name, url in (("REDIS_URL", settings.redis_url), ("DATABASE_URL", settings.database_url)):
        if url:
            out.print(
                f"[yellow]{name} is set ({redact(url)}): the runtime uses it, "
                f"not the embedded server[/]"
            )


# -- db ------------------------------------------------------------------------


@db_app.command("migrate")
def db_migrate(ctx: typer.Context) -> None:
    """Apply pending migrations; create the owner and runtime roles where allowed."""
    settings = _with_servers(ctx.obj)
    report = _run(migrations.migrate(settings))
    for label in report.applied:
        out.print(f"applied  {label}")
    if not report.applied:
        out.print(f"up to date ({len(report.already_applied)} migrations applied)")
    if report.roles_separated:
        out.print(
            f"roles: owner {settings.owner_role!r} (NOLOGIN), runtime {settings.app_role!r} "
            "(INSERT and SELECT on the log)"
        )
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")


@db_app.command("status")
def db_status(ctx: typer.Context) -> None:
    """Migrations applied and pending, and which append-only guards are in force."""
    settings = _with_servers(ctx.obj)
    runtime_role = None
    if settings.runtime_database_url is not None:
        from urllib.parse import urlsplit

        runtime_role = urlsplit(runtime_url(settings)).username
    st = _run(migrations.status(settings, runtime_role=runtime_role))
    out.print(f"server   PostgreSQL {st.server_version}, connected as {st.connect_role!r}")
    out.print(f"schema   {settings.db_schema!r} " + ("exists" if st.schema_exists else "MISSING"))
    for label in st.applied:
        flag = "  [red](changed since applied)[/]" if label in st.changed else ""
        out.print(f"applied  {label}{flag}")
    for label in st.pending:
        out.print(f"[yellow]pending  {label}[/]")
    for g in st.guards:
        mark = "[green]in force[/]" if g.in_force else "[red]NOT in force[/]"
        out.print(f"guard    {g.name:34} {mark}  {escape(g.detail)}")
    if st.pending or st.changed or not all(g.in_force for g in st.guards) or not st.guards:
        raise typer.Exit(1)


# -- audit ---------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """Recompute every hash chain and seal; name the first altered or missing event."""
    settings = _with_servers(ctx.obj)

    async def go() -> audit_mod.VerifyReport:
        conn = await connect(runtime_url_or_owner(settings))
        try:
            total = await conn.fetchval(f'SELECT count(*) FROM "{settings.db_schema}".events')
            with err.status(f"verifying {total} events") as status:

                def progress(n: int) -> None:
                    status.update(f"verifying events: {n}/{total}")

                return await audit_mod.verify(conn, settings.db_schema, on_progress=progress)
        finally:
            await conn.close()

    report = _run(go())
    if as_json:
        out.print_json(
            data={
                "ok": report.ok,
                "events": report.events,
                "streams": report.streams,
                "seals": report.seals,
                "problems": [str(p) for p in report.problems],
            }
        )
    elif report.ok:
        out.print(
            f"[green]ok[/]: {report.events} events in {report.streams} streams, "
            f"{report.seals} seals, every hash verified"
        )
    else:
        out.print(
            f"[red]FAILED[/]: {len(report.problems)} problem(s); first: {escape(str(report.first))}"
        )
        for p in report.problems[1:20]:
            out.print(f"  {escape(str(p))}")
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("seal")
def audit_seal(
    ctx: typer.Context,
    every: Annotated[
        float | None, typer.Option(help="Keep sealing every N seconds (otherwise seal once)")
    ] = None,
) -> None:
    """Record the heads of the streams changed since the last seal (detects stream removal)."""
    settings = _with_servers(ctx.obj)

    async def go() -> None:
        lg = await _open_log(settings)
        try:
            while True:
                async with lg.pool.acquire() as conn:
                    result = await audit_mod.seal(conn, settings.db_schema)
                if result is None:
                    out.print("nothing new to seal")
                else:
                    out.print(
                        f"seal {result.seal_id}: {result.head_count} stream heads, "
                        f"{result.event_count} events, digest {result.digest.hex()}"
                    )
                if every is None:
                    return
                await asyncio.sleep(every)
        finally:
            await lg.pool.close()

    _run(go())


def runtime_url_or_owner(settings: Settings) -> str:
    """Read-only work (verify) connects as the owner URL: it may run before roles exist."""
    return settings.require_database_url()


# -- log -----------------------------------------------------------------------


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
    run = f" run={e.run_id}" if e.run_id and e.stream_id != f"run-{e.run_id}" else ""
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
    settings = _with_servers(ctx.obj)
    try:
        start = LogPosition.parse(after) if after else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--after") from None

    async def go() -> None:
        lg = await _open_log(settings)
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
        _run(go())


async def _head(lg: EventLog) -> LogPosition:
    last = await lg.read_last(1)
    return last[-1].log_position if last else START


# -- demo (the quick start's main job, for now) ---------------------------------


# -- plugins -------------------------------------------------------------------


def load_plugins(root: typer.Typer, eps: list[EntryPoint] | None = None) -> list[str]:
    """Add the commands other packages declare in the ``agentrt.commands`` group.

    An entry point names either a ``typer.Typer`` (added as the sub-command
    ``<entry point name>``) or a function ``register(app: typer.Typer)`` that
    adds commands itself. One that fails to load is reported and skipped, so
    a broken plugin never takes the whole command down.
    """
    added: list[str] = []
    taken = {info.name for info in root.registered_groups} | {
        info.name or (info.callback.__name__ if info.callback else "")
        for info in root.registered_commands
    }
    for ep in eps if eps is not None else list(entry_points(group=PLUGIN_GROUP)):
        try:
            obj = ep.load()
        except Exception as exc:  # a plugin's import error is its own bug, not ours
            err.print(
                f"[yellow]warning:[/] plugin {ep.name!r} ({ep.value}) failed to load: "
                f"{escape(str(exc))}"
            )
            continue
        if isinstance(obj, typer.Typer):
            if ep.name in taken:
                err.print(
                    f"[yellow]warning:[/] plugin {ep.name!r} would shadow a built-in "
                    "command; skipped"
                )
                continue
            root.add_typer(obj, name=ep.name)
        elif callable(obj):
            obj(root)
        else:
            err.print(
                f"[yellow]warning:[/] plugin {ep.name!r} is neither a typer.Typer nor a "
                f"register(app) function ({type(obj).__name__}); skipped"
            )
            continue
        added.append(ep.name)
    return added


def main() -> None:
    load_plugins(app)
    app(prog_name="agentrt")


def _register_builtin() -> None:
    from runtime.cli_agents import register

    register(app)


_register_builtin()

__all__ = ["app", "load_plugins", "main"]
