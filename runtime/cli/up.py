"""``agentrt up``: the whole system under one supervisor, on the embedded servers or yours.

It starts the servers (unless ``REDIS_URL``/``DATABASE_URL`` name them),
migrates, and runs each service as a child process of its own (see
:mod:`runtime.ops.supervisor`): workers and the relay for the app's agents
(the core's own), and whatever the installed packages add through the
``agentrt.services`` entry-point group (``webhooks`` adds the ingress,
``projections`` the query API and the projector). ``runtime`` imports
neither: a package names a module that has

- ``services(plan: UpPlan) -> list[Service]``: its children, with what to
  print about each (URLs, secrets), a URL that answers once it is ready and
  a page for ``up --open`` to open in the browser once it is;
- optionally ``default_app``: the module ``--app`` means when not given
  (the sample application);
- optionally ``async status(plan) -> dict[str, str]``: figures for the live
  status line;
- optionally ``async feed(plan, console) -> int`` (posts demo traffic; the
  number of runs it started) and ``async report(plan, console, since,
  expected) -> bool`` (waits for the ``expected`` runs started since
  ``since`` and prints them; False when one did not settle), for ``--demo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import asyncpg
import httpx
import structlog
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from runtime.cli.helpers import err, fail, settings_of
from runtime.errors import AgentrtError
from runtime.log import migrations
from runtime.ops import metrics
from runtime.ops.embedded import EmbeddedServices
from runtime.ops.supervisor import ChildSpec, ChildState, Supervisor
from runtime.settings import Settings

SERVICES_GROUP = "agentrt.services"

log = structlog.get_logger("agentrt.up")


@dataclasses.dataclass(frozen=True, slots=True)
class UpPlan:
    """What a service plugin is told: the settings (URLs filled in), the app, where to listen."""

    settings: Settings
    #: Module of the agents (``--app``).
    app: str
    host: str
    #: The first port; services take the next ones (ingress +0, API +1, metrics +2).
    port: int
    workers: int
    demo: bool

    def url(self, offset: int) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port + offset}"


@dataclasses.dataclass(frozen=True, slots=True)
class Service:
    """One child of ``agentrt up``: an ``agentrt`` subcommand and what to say about it."""

    name: str
    #: The ``agentrt`` arguments (``["serve", "--port", "8000"]``).
    args: Sequence[str]
    #: Answers 2xx once the service is ready (None: ready once started).
    health: str | None = None
    #: Lines printed under "where everything is".
    about: Sequence[str] = ()
    #: Extra environment of the child.
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: A page ``agentrt up --open`` opens in the browser once the service is ready.
    open_url: str | None = None


def plugins() -> list[tuple[str, ModuleType]]:
    """The modules of the ``agentrt.services`` group, by name; one that fails to load is
    reported and skipped."""
    found = []
    for ep in sorted(entry_points(group=SERVICES_GROUP), key=lambda e: e.name):
        try:
            found.append((ep.name, ep.load()))
        except Exception as exc:  # a plugin's import error is its own bug
            err.print(f"[yellow]warning:[/] services plugin {ep.name!r} failed to load: "
                      f"{escape(str(exc))}")  # fmt: skip
    return found


def core_services(plan: UpPlan) -> list[Service]:
    """The core's children: ``plan.workers`` workers (without a relay) and one relay."""
    workers = [
        Service(f"worker-{i}" if plan.workers > 1 else "worker",
                ["worker", "--app", plan.app, "--no-relay", "--drain-timeout", "5"])
        for i in range(1, plan.workers + 1)
    ]  # fmt: skip
    return [*workers, Service("relay", ["relay", "--app", plan.app])]


async def core_status(plan: UpPlan) -> dict[str, str]:
    """Activations committed (the inbox), for the status line."""
    conn = await asyncpg.connect(plan.settings.require_database_url())
    try:
        n = await conn.fetchval(f'SELECT count(*) FROM "{plan.settings.db_schema}".inbox')
    finally:
        await conn.close()
    return {"activations": f"{n:,}"}


def _child_env(settings: Settings, service: Service) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=settings.require_redis_url(),
        DATABASE_URL=settings.require_database_url(),
        AGENTRT_STATE_DIR=str(settings.state_dir),
        AGENTRT_DB_SCHEMA=settings.db_schema,
        PYTHONUNBUFFERED="1",
    )
    env.update(service.env)
    return env


async def _wait_ready(services: Sequence[Service], within: float, stop: asyncio.Event) -> list[str]:
    """Poll each service's health URL until it answers, or ``stop`` (Ctrl-C while starting
    is not kept waiting); the names still not ready."""
    waiting = {s.name: s.health for s in services if s.health}
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while waiting and time.monotonic() < deadline and not stop.is_set():
            for name, url in list(waiting.items()):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).is_success:
                        del waiting[name]
            if waiting:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
    return sorted(waiting)


class _Say:
    """What ``up`` tells its user: Rich text on the console, or with ``AGENTRT_LOG_JSON``
    one structured log line (JSON) per message, like every other line of agentrt."""

    def __init__(self, console: Console, *, json: bool) -> None:
        self.console = console
        self.json = json

    def __call__(self, text: str | Text, event: str, **fields: Any) -> None:
        if self.json:
            log.info(event, **fields)
        else:
            self.console.print(text)


class _StatusLine:
    """The live status line: every plugin's figures and the children's state."""

    def __init__(self, plan: UpPlan, mods: list[tuple[str, ModuleType]], sup: Supervisor) -> None:
        self.plan = plan
        self.mods = mods
        self.sup = sup
        self.started = time.monotonic()

    async def figures(self) -> dict[str, str]:
        figures: dict[str, str] = {}
        sources: list[Any] = [core_status]
        sources += [m.status for _, m in self.mods if hasattr(m, "status")]
        for source in sources:
            try:
                figures.update(await source(self.plan))
            except (OSError, asyncpg.PostgresError, AgentrtError, httpx.HTTPError) as exc:
                figures[getattr(source, "__module__", "?")] = f"unavailable ({type(exc).__name__})"
        return figures

    async def text(self) -> Text:
        figures = await self.figures()
        children = self.sup.children.values()
        up = sum(c.status == "running" for c in children)
        restarting = [c.spec.name for c in children if c.status == "restarting"]
        line = Text(f"up {int(time.monotonic() - self.started)}s  ", style="dim")
        line.append("  ".join(f"{k} {v}" for k, v in figures.items()))
        line.append(f"  children {up}/{len(children)} running", style="green" if up == len(children)
                    else "yellow")  # fmt: skip
        if restarting:
            line.append(f" (restarting: {', '.join(restarting)})", style="yellow")
        return line


def _on_exit(say: _Say, metrics_dir: Path) -> Any:
    def report(child: ChildState, tail: str) -> None:
        if child.last_pid is not None:  # its live gauges go; its counts stay in the sums
            metrics.mark_dead(child.last_pid, metrics_dir)
        say(f"[yellow]{child.spec.name} exited with {child.last_exit}; restarting[/] "
            f"(log {child.spec.log_path})", "up.child_exited", child=child.spec.name,
            code=child.last_exit, log=str(child.spec.log_path), tail=tail)  # fmt: skip
        if tail and not say.json:
            say(Text(tail, style="dim"), "up.child_log")

    return report


async def _up(
    plan: UpPlan,
    mods: list[tuple[str, ModuleType]],
    console: Console,
    say: _Say,
    *,
    exit_after_demo: bool,
    open_browser: bool = False,
) -> bool:
    services = core_services(plan)
    for _, mod in mods:
        services += mod.services(plan)
    logs = plan.settings.state_dir / "logs"
    # One metrics endpoint for every child (prometheus multiprocess mode): each records
    # into files here, the supervisor serves their sum.
    metrics_dir = plan.settings.state_dir / "metrics"
    shared = metrics.prepare_multiprocess(metrics_dir)
    specs = [
        ChildSpec(s.name, [sys.executable, "-m", "runtime", *s.args],
                  {**_child_env(plan.settings, s), **shared}, logs / f"{s.name}.log")
        for s in services
    ]  # fmt: skip
    sup = Supervisor(specs, stop_timeout=10.0, on_exit=_on_exit(say, metrics_dir))
    server = metrics.serve_metrics(plan.port + 2, metrics_dir, host=plan.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(sup.run(stop))
    ok = True
    try:
        late = await _wait_ready(services, within=60, stop=stop)
        if stop.is_set():
            return ok
        if late:
            say(f"[red]not ready after 60 s:[/] {', '.join(late)} (logs in {logs}/)",
                "up.not_ready", services=late, logs=str(logs))  # fmt: skip
        say(f"[bold]agentrt is up[/] (app {plan.app}; child logs in {logs}/; Ctrl-C stops "
            "everything)", "up.ready", app=plan.app, logs=str(logs),
            children=[s.name for s in services])  # fmt: skip
        for s in services:
            for line in s.about:
                say(f"  {escape(line)}", "up.service", service=s.name, about=line.strip())
        say(f"  metrics  {plan.url(2)}/metrics (every child's, summed)", "up.service",
            service="metrics", url=f"{plan.url(2)}/metrics")  # fmt: skip
        if open_browser:
            open_pages(services, late, say)
        status = _StatusLine(plan, mods, sup)
        if plan.demo:
            ok = await _demo(plan, mods, console) and not late
            if exit_after_demo:
                return ok
        if console.is_terminal and not say.json:
            with Live(await status.text(), console=console, refresh_per_second=2,
                      transient=True) as live:  # fmt: skip
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                    live.update(await status.text())
        else:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 15.0)
                if not stop.is_set():
                    if say.json:
                        running_now = sum(c.status == "running" for c in sup.children.values())
                        log.info("up.status", **(await status.figures()),
                                 children_running=running_now,
                                 children=len(sup.children))  # fmt: skip
                    else:
                        console.print(await status.text())
        return ok
    finally:
        say("stopping: every child gets SIGTERM (workers drain)...", "up.stopping")
        stop.set()
        await running
        server.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def open_pages(services: Sequence[Service], late: Sequence[str], say: _Say) -> list[str]:
    """Open the ready services' pages in the browser (``--open``); the URLs it opens.

    In a thread of its own: a browser run in the foreground does not return until it is
    closed, and ``up`` must go on supervising meanwhile."""
    urls = [s.open_url for s in services if s.open_url and s.name not in late]
    skipped = [s.name for s in services if s.open_url and s.name in late]
    if skipped:
        say(f"[yellow]not opening[/] the pages of {', '.join(skipped)}: not ready",
            "up.open_skipped", services=skipped)  # fmt: skip
    if not urls:
        return []

    def go() -> None:
        for url in urls:
            if not webbrowser.open(url):
                say(f"[yellow]no browser found[/]: open {escape(url)} yourself",
                    "up.open_failed", url=url)  # fmt: skip

    for url in urls:
        say(f"opening {escape(url)} in the browser", "up.open", url=url)
    threading.Thread(target=go, name="up-open", daemon=True).start()
    return urls


async def _demo(plan: UpPlan, mods: list[tuple[str, ModuleType]], console: Console) -> bool:
    since = datetime.now(UTC)
    started = 0
    for _, mod in mods:
        if hasattr(mod, "feed"):
            started += await mod.feed(plan, console)
    ok = True
    for _, mod in mods:
        if hasattr(mod, "report"):
            ok = await mod.report(plan, console, since, started) and ok
    return await _audit(plan, console) and ok


async def _audit(plan: UpPlan, console: Console) -> bool:
    """Seal the log and verify every hash chain (promise 6), as ``agentrt audit`` does."""
    from runtime.log.audit import seal, verify

    conn = await asyncpg.connect(plan.settings.require_database_url())
    try:
        sealed = await seal(conn, plan.settings.db_schema)
        report = await verify(conn, plan.settings.db_schema)
    finally:
        await conn.close()
    if sealed:
        console.print(f"sealed: seal {sealed.seal_id} over {sealed.event_count} events")
    verdict = "[green]ok[/]" if report.ok else f"[red]FAILED[/]: {escape(str(report.first))}"
    console.print(f"audit verify: {verdict} ({report.events} events, {report.streams} streams)")
    return bool(report.ok)


def free_base_port(host: str, count: int = 3) -> int:
    """A port with the ``count - 1`` after it free too (for ``--port 0``)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1])
        if base + count < 65536 and all(_port_free(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports on {host}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind: a port whose last connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _default_app(mods: list[tuple[str, ModuleType]]) -> str | None:
    for _, mod in mods:
        if isinstance(getattr(mod, "default_app", None), str):
            return str(mod.default_app)
    return None


def start_servers(settings: Settings, say: _Say) -> tuple[Settings, EmbeddedServices | None]:
    """Fill in missing URLs with the embedded servers; the services to stop at the end
    (None when every server was there already or configured)."""
    need_redis = settings.redis_url is None
    need_pg = settings.database_url is None
    if not (need_redis or need_pg):
        return settings, None
    services = EmbeddedServices(settings.state_dir)
    before = {s.name: s.running for s in services.status()}
    try:
        urls = services.up(redis=need_redis, postgres=need_pg)
    except AgentrtError as exc:
        fail(exc)
    for key, url in urls.items():
        name = "redis" if key == "REDIS_URL" else "postgres"
        say(f"[dim]embedded {name} at {url} (data in {settings.state_dir}/)[/]",
            "up.embedded", server=name, url=url, state_dir=str(settings.state_dir))  # fmt: skip
    settings = settings.with_urls(redis_url=urls.get("REDIS_URL"),
                                  database_url=urls.get("DATABASE_URL"))  # fmt: skip
    started_here = not all(before.values())
    return settings, services if started_here else None


def up(
    ctx: typer.Context,
    app_target: Annotated[
        str | None,
        typer.Option("--app", help="Module with your agents (default: the sample application)"),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface the HTTP services listen on")] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            help="First port: ingress on it, the API on the next, metrics after (0: free ones)"
        ),
    ] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
    demo: Annotated[
        bool, typer.Option("--demo", help="Also post a stream of sample webhooks; print the runs")
    ] = False,
    keep_servers: Annotated[
        bool,
        typer.Option("--keep-servers", help="Leave embedded servers this command started running"),
    ] = False,
    open_browser: Annotated[
        bool,
        typer.Option("--open", help="Open the run explorer in the browser once the API is up"),
    ] = False,
) -> None:
    """Run everything: servers, migrations, ingress, API, relay, projector, workers.

    One supervisor process; a crashed child is restarted, Ctrl-C stops them all.
    """
    run_up(ctx, app_target=app_target, host=host, port=port, workers=workers, demo=demo,
           keep_servers=keep_servers, exit_after_demo=False,
           open_browser=open_browser)  # fmt: skip


def run_up(
    ctx: typer.Context,
    *,
    app_target: str | None,
    host: str,
    port: int,
    workers: int,
    demo: bool,
    keep_servers: bool,
    exit_after_demo: bool,
    open_browser: bool = False,
) -> None:
    """``agentrt up`` (and ``agentrt demo``: ``--demo``, then exit)."""
    if workers < 1:
        raise typer.BadParameter("--workers must be at least 1")
    if not 0 <= port < 65533:
        raise typer.BadParameter("--port must leave room for the next two ports")
    if port == 0:
        port = free_base_port(host)
    busy = [p for p in range(port, port + 3) if not _port_free(host, p)]
    if busy:
        err.print(f"[red]error[/] port {busy[0]} on {host} is in use (another agentrt up?); "
                  "choose others with --port N (N, N+1 and N+2 are used) or --port 0")  # fmt: skip
        raise typer.Exit(2)
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=150)  # a log: whole lines
    mods = plugins()
    app = app_target or _default_app(mods)
    if app is None:
        err.print("[red]error[/] no --app given and no installed package offers a default app")
        raise typer.Exit(2)
    say = _Say(console, json=settings_of(ctx).log_json)
    settings, started = start_servers(settings_of(ctx), say)
    plan = UpPlan(settings, app, host, port, workers, demo)

    async def go() -> bool:
        report = await migrations.migrate(settings)
        for note in report.notes:
            err.print(f"[yellow]note:[/] {escape(note)}")
        return await _up(plan, mods, console, say, exit_after_demo=exit_after_demo,
                         open_browser=open_browser)  # fmt: skip

    try:
        ok = asyncio.run(go())
    except AgentrtError as exc:
        fail(exc)
    finally:
        if started is not None and not keep_servers:
            stopped = started.down()
            say(f"stopped the embedded {' and '.join(stopped) or 'servers'} (data kept in "
                f"{settings.state_dir}/)", "up.stopped", servers=stopped)  # fmt: skip
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
