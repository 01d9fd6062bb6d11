"""``agentrt serve`` and ``agentrt webhooks sign|send``, added through the plugin group."""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from runtime.cli import configure_logging, err, out, run, settings_of, with_servers
from runtime.ops.logconfig import uvicorn_logging
from runtime.settings import Settings
from webhooks import auth
from webhooks.config import ResolvedSource, load
from webhooks.errors import ConfigError

webhooks_app = typer.Typer(help="Sign and send sample webhooks.", no_args_is_help=True)

_CONTENT_TYPES = {
    ".json": "application/json",
    ".eml": "message/rfc822",
    ".form": "application/x-www-form-urlencoded",
}


def _source(settings: Settings, name: str, config: Path | None) -> ResolvedSource:
    if config is None:
        from webhooks.up import made_config

        config = settings.webhooks_config
        if not config.exists() and made_config(settings).exists():
            config = made_config(settings)  # the one `agentrt up` made
            err.print(f"[dim]sources from {config}[/]", soft_wrap=True)
    try:
        _, sources = load(config)
    except ConfigError as exc:
        err.print(f"[red]error[/] {exc}")
        raise typer.Exit(2) from None
    if name not in sources:
        err.print(f"[red]error[/] no source {name!r} in the config (have: {', '.join(sources)})")
        raise typer.Exit(2)
    return sources[name]


def content_type_for(path: Path) -> str:
    """A sample's content type: ``FILE.content-type`` beside it, else by extension."""
    beside = path.with_name(path.name + ".content-type")
    if beside.exists():
        return beside.read_text().strip()
    return _CONTENT_TYPES.get(path.suffix, "application/json")


def signed_headers(source: ResolvedSource, body: bytes, content_type: str) -> dict[str, str]:
    headers = {"content-type": content_type}
    cfg = source.config
    if cfg.auth == "standard":
        msg_id = f"msg_{uuid.uuid4().hex}"
        stamp = int(time.time())
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(stamp)
        headers["webhook-signature"] = " ".join(
            auth.sign(key, msg_id, stamp, body) for key in source.keys[:1]
        )
    elif cfg.auth == "basic":
        token = base64.b64encode(f"{source.username}:{source.password}".encode()).decode()
        headers["authorization"] = f"Basic {token}"
    return headers


@webhooks_app.command("sign")
def sign_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    source: Annotated[str, typer.Option("--source", "-s", help="Configured source name")],
    config: Annotated[Path | None, typer.Option(help="Sources file")] = None,
) -> None:
    """Print the headers a sender must add to post FILE to SOURCE (for curl)."""
    src = _source(settings_of(ctx), source, config)
    body = file.read_bytes()
    for name, value in signed_headers(src, body, content_type_for(file)).items():
        out.print(f"{name}: {value}")
    if src.config.auth == "mailgun":
        err.print("[yellow]note:[/] Mailgun signs timestamp+token inside the form body itself")


@webhooks_app.command("send")
def send_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    source: Annotated[str, typer.Option("--source", "-s", help="Configured source name")],
    url: Annotated[str, typer.Option(help="Ingress base URL")] = "http://127.0.0.1:8000",
    config: Annotated[Path | None, typer.Option(help="Sources file")] = None,
) -> None:
    """Sign FILE for SOURCE and POST it; print the response."""
    import httpx

    src = _source(settings_of(ctx), source, config)
    body = file.read_bytes()
    headers = signed_headers(src, body, content_type_for(file))
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/webhooks/{source}", content=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as exc:
        err.print(f"[red]error[/] could not reach {url}: {exc}")
        raise typer.Exit(1) from None
    out.print(f"{response.status_code} {response.text}")
    if response.status_code >= 400:
        raise typer.Exit(1)


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes; with more than one, /metrics sums them all "
            "(files in PROMETHEUS_MULTIPROC_DIR, else a temporary directory)",
        ),
    ] = 1,
    config: Annotated[
        Path | None,
        typer.Option(help="Sources file (env AGENTRT_WEBHOOKS_CONFIG; default ./webhooks.toml)"),
    ] = None,
    access_log: Annotated[
        bool,
        typer.Option("--access-log/--no-access-log", help="Log every request (at info level)"),
    ] = False,
) -> None:
    """Run the webhook ingress (uvicorn with uvloop and httptools)."""
    import uvicorn

    settings = settings_of(ctx)
    path = config or settings.webhooks_config
    try:
        load(path)
    except ConfigError as exc:
        err.print(f"[red]error[/] {exc}")
        raise typer.Exit(2) from None
    _check_metrics_dir()
    # The embedded servers when no URLs are set; uvicorn's workers read the URLs from env.
    settings = with_servers(settings, redis=True)
    if settings.require_durable_redis:
        # Refuse here, with a clear message and exit 1, rather than in each worker's
        # lifespan (which checks too, and warns when the setting is off).
        run(_require_durable_redis(settings))
    os.environ.update(
        AGENTRT_WEBHOOKS_CONFIG=str(path),
        REDIS_URL=settings.require_redis_url(),
        DATABASE_URL=settings.require_database_url(),
    )
    with _shared_metrics(workers):
        uvicorn.run(
            "webhooks.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop",
            http="httptools",
            **uvicorn_logging(settings.log_level, access_log=access_log),
        )


def _check_metrics_dir() -> None:
    from runtime.ops import metrics

    given = os.environ.get(metrics.MULTIPROC_ENV)
    if given is not None and not Path(given).is_dir():
        err.print(
            f"[red]error[/] {metrics.MULTIPROC_ENV}={given} is not a directory "
            "(create it, or unset it to let serve make one)"
        )
        raise typer.Exit(2)


@contextlib.contextmanager
def _shared_metrics(workers: int) -> Iterator[None]:
    """One /metrics for several uvicorn workers: prometheus-client's multiprocess mode.

    uvicorn spawns its workers, so a variable set here is in place before they import
    prometheus_client. A directory given in PROMETHEUS_MULTIPROC_DIR belongs to whoever
    set it (a supervisor that empties it for all its children); otherwise a temporary
    one is made here and removed at exit.
    """
    from runtime.ops import metrics

    if workers == 1 or metrics.MULTIPROC_ENV in os.environ:
        yield
        return
    made = tempfile.mkdtemp(prefix="agentrt-metrics-")
    os.environ.update(metrics.prepare_multiprocess(made))
    try:
        yield
    finally:
        del os.environ[metrics.MULTIPROC_ENV]
        metrics.remove_dir(made)


async def _require_durable_redis(settings: Settings) -> None:
    from runtime.streams.durability import ensure_durable_redis
    from runtime.streams.keys import connect_redis

    redis = await connect_redis(settings.require_redis_url())
    try:
        await ensure_durable_redis(redis, settings, component="agentrt serve")
    finally:
        await redis.aclose()


def demo(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="First port (ingress, API, metrics); 0: free ones")] = 0,
) -> None:
    """The quick start: `agentrt up --demo` that exits when the sample webhooks are handled.

    Starts the embedded servers (they keep running) and the whole system with the sample
    application, posts realistic webhooks, prints the runs, seals and verifies the log.
    """
    from runtime.cli.up import run_up

    if "AGENTRT_LOG_LEVEL" not in os.environ:
        configure_logging("warning", json=settings_of(ctx).log_json)  # the demo prints what matters
    run_up(ctx, app_target=None, host="127.0.0.1", port=port, workers=1, demo=True,
           keep_servers=True, exit_after_demo=True)  # fmt: skip
    Console().print(
        "\nnext: `agentrt runs` lists these runs and `agentrt runs show RUN` draws one; "
        "`agentrt replay RUN --app webhooks.demo.agents` re-runs it against the record; "
        "`agentrt fork RUN --at 2 --app webhooks.demo.agents --tier smart` branches it; "
        "`agentrt up --open` runs the whole system until Ctrl-C and opens the run explorer "
        "(a web UI of these runs: timelines, time travel, replay, fork, approvals); "
        "`agentrt services down` stops the servers."
    )


def register(app: typer.Typer) -> None:
    """Entry point of the ``agentrt.commands`` group."""
    app.command("serve")(serve)
    app.command("demo")(demo)
    app.add_typer(webhooks_app, name="webhooks")
