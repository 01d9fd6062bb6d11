"""compose.yaml, checked without a Docker engine.

Every agentrt service's command parses as a real `agentrt` command (click's own parser
with the plugins' commands loaded, nothing run), every variable a service sets is one
agentrt reads, every health check names a route of the server that container runs (or
a real command), and the engines are the promised ones: Redis 7 fsyncing every write,
PostgreSQL 16.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from starlette.routing import Match
from typer.core import TyperGroup
from typer.exceptions import TyperException

from runtime.errors import SettingsError
from runtime.ops.metrics import METRICS_ROUTES
from runtime.settings import Settings, env_names
from tests.support import REPO

COMPOSE = REPO / "compose.yaml"
#: The services the issue names, and the ones that scale out.
SERVICES = {"redis", "postgres", "migrate", "ingress", "api", "worker", "relay", "projector"}
REPLICATED = {"ingress", "api", "worker"}
#: Variables the engines' images read (their documentation), and their health commands.
ENGINES: dict[str, tuple[str, frozenset[str], str]] = {
    "redis": ("redis:7", frozenset(), "redis-cli"),
    "postgres": (
        "postgres:16",
        frozenset({"POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB", "PGDATA"}),
        "pg_isready",
    ),
}
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}")
_PROBE = re.compile(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[^'\"\s]*)")


class Problem(Exception):
    pass


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment (the file's defaults)."""
    return _VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), text)


# typer (>= 0.22) carries its own copy of click: its command and context types.
Command = Any
Context = Any


@functools.cache
def agentrt() -> TyperGroup:
    """The `agentrt` command as users get it: built-ins plus the plugin entry points."""
    from runtime.cli.app import app, load_plugins

    load_plugins(app)
    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)
    return command


def parse_command(args: list[str]) -> Context:
    """Parse ``args`` as `agentrt` would, down to the leaf command; nothing is invoked.

    click's ``make_context`` converts and validates every option (unknown ones, bad
    values, missing required ones raise) without calling the command.
    """
    if not args or args[0] != "agentrt":
        raise Problem(f"{args!r} is not an agentrt command")
    if "--help" in args:
        raise Problem(f"{args!r} asks for help instead of running")
    command: Command = agentrt()
    name, rest, ctx = "agentrt", list(args[1:]), None
    try:
        while isinstance(command, TyperGroup):
            ctx = command.make_context(name, list(rest), parent=ctx)
            if not ctx.args and len(rest) == 0:
                raise Problem(f"{' '.join(args)}: no sub-command")
            # A group keeps its sub-command's name and the arguments after it.
            token = rest[len(rest) - len(ctx.args) - 1]
            sub = command.get_command(ctx, token)
            if sub is None:
                raise Problem(f"{' '.join(args)}: {token!r} is not a command of {name!r}")
            command, name, rest = sub, token, ctx.args
        return command.make_context(name, list(rest), parent=ctx)
    except typer.Exit as exc:
        raise Problem(f"{' '.join(args)}: exits without running ({exc})") from None
    except TyperException as exc:  # click's UsageError, BadParameter, NoSuchOption, ...
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise Problem(f"{' '.join(args)}: {message}") from None


def chain(ctx: Context) -> Iterable[Context]:
    node: Context | None = ctx
    while node is not None:
        yield node
        node = node.parent


def envvars_of(ctx: Context) -> set[str]:
    """The variables the options of ``ctx``'s commands read (``envvar=``)."""
    names: set[str] = set()
    for node in chain(ctx):
        for param in node.command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
    return names


@functools.cache
def app_of(server: str) -> Any:
    """The HTTP app an agentrt server runs (built, not started: nothing connects)."""
    if server == "serve":
        from webhooks.app import create_app
        from webhooks.config import WebhooksConfig

        return create_app(Settings(), WebhooksConfig(), {})
    from projections.api import create_api

    return create_api(Settings())


def route_exists(server: str, path: str) -> bool:
    """Whether a GET of ``path`` reaches a route of ``server`` (the app's own router decides)."""
    path = path.split("?", 1)[0]
    if server == "metrics":
        return path in METRICS_ROUTES
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in app_of(server).routes)


def listening(ctx: Context) -> dict[int, str]:
    """Port -> which server the command runs on it."""
    params = ctx.params
    ports = {}
    if ctx.info_name in ("serve", "api") and params.get("port"):
        ports[int(params["port"])] = str(ctx.info_name)
    if params.get("metrics_port"):
        ports[int(params["metrics_port"])] = "metrics"
    return ports


def check_health(name: str, service: dict[str, Any], ctx: Context | None) -> list[str]:
    check = service.get("healthcheck")
    if not check or "test" not in check:
        return [f"{name}: no health check"]
    test = [interpolate(str(part)) for part in check["test"]]
    if test[0] not in ("CMD", "CMD-SHELL"):
        return [f"{name}: health check {test!r} is not CMD or CMD-SHELL"]
    if name in ENGINES:
        wanted = ENGINES[name][2]
        return [] if test[1] == wanted else [f"{name}: health check is not {wanted}"]
    assert ctx is not None
    if test[1] == "agentrt":
        try:
            parse_command(test[1:])
        except Problem as exc:
            return [f"{name}: health check: {exc}"]
        return []
    probes = [m for part in test[1:] for m in _PROBE.finditer(part)]
    if len(probes) != 1:
        return [f"{name}: health check {test!r} names no local URL (or several)"]
    port, path = int(probes[0].group(1)), probes[0].group(2)
    server = listening(ctx).get(port)
    if server is None:
        return [f"{name}: health check probes port {port}, where the command serves nothing"]
    if not route_exists(server, path):
        return [f"{name}: health check probes {path}, not a route of the {server} server"]
    return []


def problems(compose: dict[str, Any]) -> list[str]:
    """Everything wrong with a parsed compose file (empty: fine)."""
    found: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services", {})
    if missing := SERVICES - set(services):
        found.append(f"missing services: {sorted(missing)}")
    for name in REPLICATED & set(services):
        if int(services[name].get("deploy", {}).get("replicas", 1)) < 2:
            found.append(f"{name}: should run several replicas")
    for name, service in services.items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        if name in ENGINES:
            image, reads, _ = ENGINES[name]
            if not str(service.get("image", "")).startswith(image):
                found.append(f"{name}: image is not {image}")
            if unknown := set(env) - reads:
                found.append(f"{name}: sets variables its image does not read: {sorted(unknown)}")
            found += check_health(name, service, None)
            continue
        command = [interpolate(str(part)) for part in service.get("command", [])]
        try:
            ctx = parse_command(command)
        except Problem as exc:
            found.append(f"{name}: {exc}")
            continue
        if unknown := set(env) - env_names() - envvars_of(ctx):
            found.append(f"{name}: sets variables agentrt does not read: {sorted(unknown)}")
        try:
            Settings.from_env({k: interpolate(str(v)) for k, v in env.items()})
        except SettingsError as exc:
            found.append(f"{name}: {exc}")
        if name == "migrate":
            if service.get("restart") != "no":
                found.append("migrate: a one-shot service (restart: no)")
            continue
        found += check_health(name, service, ctx)
        condition = (service.get("depends_on") or {}).get("migrate", {}).get("condition")
        if condition != "service_completed_successfully":
            found.append(f"{name}: does not wait for migrate to complete")
    redis = services.get("redis", {}).get("command", [])
    if " ".join(redis).count("--appendonly yes") != 1 or "--appendfsync always" not in " ".join(
        redis
    ):
        found.append("redis: not run with appendonly yes and appendfsync always (promise 1)")
    return found


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


# -- the file ----------------------------------------------------------------------------------


def test_compose_file_checks_out() -> None:
    assert problems(load(COMPOSE)) == []


def test_every_agentrt_service_runs_the_command_it_names() -> None:
    services = load(COMPOSE)["services"]
    ran = {
        name: parse_command([interpolate(str(p)) for p in s["command"]]).command.name
        for name, s in services.items()
        if name not in ENGINES
    }
    assert ran == {
        "migrate": "migrate",
        "ingress": "serve",
        "api": "api",
        "worker": "worker",
        "relay": "relay",
        "projector": "projector",
    }


def test_the_checker_reads_options_variables_and_routes() -> None:
    ctx = parse_command(["agentrt", "worker", "--app", "m", "--metrics-port", "9101"])
    assert ctx.params["metrics_port"] == 9101
    assert "AGENTRT_APP" in envvars_of(parse_command(["agentrt", "projector"]))
    for path in ("/readyz", "/healthz", "/metrics"):
        assert route_exists("serve", path)
    assert not route_exists("serve", "/webhooks/orders")  # POST only
    assert not route_exists("serve", "/health")
    assert route_exists("api", "/healthz")
    assert route_exists("api", "/runs/abc")
    assert not route_exists("api", "/runs/abc/nothing")
    assert route_exists("metrics", "/metrics")
    assert not route_exists("metrics", "/")
    assert "REDIS_URL" in env_names()


# -- broken variants: each invented thing is caught --------------------------------------------


def variant(tmp_path: Path, old: str, new: str) -> list[str]:
    text = COMPOSE.read_text()
    assert text.count(old) >= 1, old
    path = tmp_path / "compose.yaml"
    path.write_text(text.replace(old, new, 1))
    return problems(load(path))


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ('"--no-relay"', '"--no-relays"', "worker: agentrt worker"),
        ('"--workers", "2"', '"--workers", "two"', "ingress: agentrt serve"),
        ('"--metrics-port", "9102"', '"--metrics-port", "9102", "--lease", "5"', "relay:"),
        ('["agentrt", "db", "migrate"]', '["agentrt", "db", "upgrade"]', "'upgrade' is not"),
        ('["agentrt", "projector"', '["agentrt", "projectors"', "'projectors' is not"),
        ("AGENTRT_LOG_JSON:", "AGENTRT_JSON_LOGS:", "AGENTRT_JSON_LOGS"),
        ("AGENTRT_APP: ${", "AGENTRT_AP: ${", "AGENTRT_AP"),
        ('AGENTRT_LOG_JSON: "true"', 'AGENTRT_LOG_JSON: "sure"', "not a boolean"),
        ("8010/healthz", "8010/health", "not a route of the api server"),
        ("8000/readyz", "8000/ready", "not a route of the serve server"),
        ("9101/healthz", "9101/status", "not a route of the metrics server"),
        ("9103/healthz", "9104/healthz", "port 9104"),
        ("POSTGRES_DB:", "POSTGRES_DATABASE:", "POSTGRES_DATABASE"),
        ('"--appendfsync", "always"', '"--appendfsync", "everysec"', "promise 1"),
        ("image: postgres:16", "image: postgres:15", "not postgres:16"),
        ("replicas: 3", "replicas: 1", "worker: should run several"),
    ],
)
def test_an_invented_option_variable_or_route_is_reported(
    tmp_path: Path, old: str, new: str, reported: str
) -> None:
    found = variant(tmp_path, old, new)
    assert any(reported in p for p in found), found


def test_a_service_without_a_health_check_is_reported() -> None:
    compose = copy.deepcopy(load(COMPOSE))
    del compose["services"]["relay"]["healthcheck"]
    assert problems(compose) == ["relay: no health check"]


def test_a_service_that_does_not_wait_for_migrate_is_reported() -> None:
    compose = copy.deepcopy(load(COMPOSE))
    compose["services"]["projector"]["depends_on"] = {"redis": {"condition": "service_healthy"}}
    assert problems(compose) == ["projector: does not wait for migrate to complete"]
