"""The query API: bearer auth on every route, the error shape, a complete OpenAPI document,
filters that stay within one run, time travel, mounting in the ingress, `agentrt api`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
import schemathesis
import structlog
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from projections.api import create_api
from projections.engine import Projector
from projections.queries import encode_cursor
from projections.registry import registered
from runtime.agents.agent import Agent
from runtime.effects.retry import RetryPolicy
from runtime.events.builtin import ApprovalDecided, ApprovalRequested
from runtime.events.model import NewEvent, RecordedEvent
from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.apps.mailpair import Responder, Triage
from tests.support.runtime import count_type, db_url, running, send, wait_for
from tests.support.servers import Servers
from tests.support.webhooks import make_config, standard_headers
from webhooks.app import ROUTES_GROUP, create_app, mount_routes
from webhooks.config import resolve
from webhooks.events import Address, EmailReceived

TOKEN = "test-token-" + "k" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
#: Routes without data, served without a token (the docs, and the health check).
OPEN = {*DOCS, "/healthz"}


class Tally(msgspec.Struct):
    events: int = 0
    types: list[str] = msgspec.field(default_factory=list)


class Tallier(Agent):
    """A stateful agent for time travel: counts the run's events (it never runs here)."""

    name = "tallier"
    subscribes = (EmailReceived,)
    state_type = Tally

    def initial_state(self) -> Tally:
        return Tally()

    def evolve(self, state: Tally, event: RecordedEvent) -> Tally:
        return Tally(state.events + 1, [*state.types, event.event_type])

    async def handle(self, event: Any, ctx: Any) -> None:
        return None


def email(n: int, sender: str) -> EmailReceived:
    return EmailReceived(
        source="test",
        provider="raw",
        message_id=f"<api{n}@example.com>",
        sender=Address(sender),
        subject=f"Refund for invoice {n}",
        text="I was charged twice, please refund the payment.",
    )


def with_token(settings: Settings, token: str | None = TOKEN) -> Settings:
    return dataclasses.replace(settings, api_token=token)


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[LLM]:
    async with model_client(settings) as mc:
        assert mc.offline
        yield LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))


async def project(log: EventLog, settings: Settings) -> None:
    await Projector(log, registered(agents=[Triage(), Responder()]), settings).catch_up()


@pytest.fixture
async def two_runs(
    redis: aioredis.Redis, log: EventLog, llm: LLM, settings: Settings
) -> tuple[uuid.UUID, uuid.UUID]:
    """Two demo runs made by real workers with the offline model, projected."""
    a = await send(redis, email(1, "ada@example.com"))
    b = await send(redis, email(2, "grace@example.com"))
    async with running([Triage(), Responder()], redis, log, llm=llm):
        await wait_for(
            lambda: _at_least(log, "reply.drafted", 2), seconds=60, what="two drafted replies"
        )
        await wait_for(lambda: _at_least(log, "activation.completed", 4), what="4 completions")
    await project(log, settings)
    return a, b


async def _at_least(log: EventLog, event_type: str, n: int) -> bool:
    return await count_type(log, event_type) >= n


@contextlib.asynccontextmanager
async def client_of(app: FastAPI, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api", **kwargs
        ) as client,
    ):
        yield client


@pytest.fixture
async def api(settings: Settings, log: EventLog) -> AsyncIterator[httpx.AsyncClient]:
    app = create_api(with_token(settings), agents=[Triage(), Responder(), Tallier()], pool=log.pool)
    async with client_of(app, headers=AUTH) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def data_routes(app: FastAPI) -> list[APIRoute]:
    """Every route of ``app`` but the docs' and the run explorer's (FastAPI keeps included
    routers as entries of ``app.routes``: their routes are walked through
    ``iter_route_contexts``). The explorer's pages (/ui) take a session cookie, not the
    bearer token: tests/ui/test_frame.py holds them to that."""
    found = [c.original_route for c in iter_route_contexts(app.routes)]
    return [
        r
        for r in found
        if isinstance(r, APIRoute) and r.path not in OPEN and not r.path.startswith("/ui")
    ]


def concrete(path: str, run_id: uuid.UUID) -> str:
    return path.replace("{run_id}", str(run_id)).replace("{approval_id}", str(uuid.uuid4()))


def method_of(route: APIRoute) -> str:
    [method] = route.methods
    return method


#: A body every route accepts (the GET routes ignore it).
BODY = {"approved": True}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return body


# -- auth ------------------------------------------------------------------------------


async def test_every_route_refuses_a_missing_or_wrong_token(api: httpx.AsyncClient) -> None:
    routes = data_routes(api.app)  # type: ignore[attr-defined]
    assert len(routes) >= 9
    anyone = uuid.uuid4()
    wrong = [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    for route in routes:
        for headers in wrong:
            # httpx merges the client's headers: replace the Authorization header.
            request = api.build_request(method_of(route), concrete(route.path, anyone), json=BODY)
            request.headers.pop("Authorization")
            request.headers.update({k: v.encode() for k, v in headers.items()})
            response = await api.send(request)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer", route.path
        # The right token gets past the check (to a 404: no such run, or no projection yet).
        response = await api.request(method_of(route), concrete(route.path, anyone), json=BODY)
        assert response.status_code != 401, (route.path, response.text)


async def test_the_health_check_needs_no_token_and_tells_nothing(api: httpx.AsyncClient) -> None:
    request = api.build_request("GET", "/healthz")
    request.headers.pop("Authorization")
    response = await api.send(request)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_without_a_configured_token_every_route_is_closed(
    settings: Settings, log: EventLog, tmp_path: Path
) -> None:
    # A state directory of its own: the working directory's may hold a kept token.
    bare = dataclasses.replace(with_token(settings, None), state_dir=tmp_path)
    app = create_api(bare, pool=log.pool)
    async with client_of(app) as client:
        for route in data_routes(app):
            for headers in ({}, {"Authorization": "Bearer "}, AUTH):
                response = await client.request(
                    method_of(route), concrete(route.path, uuid.uuid4()), headers=headers, json=BODY
                )
                body = assert_error(response, 401, "unauthorized")
        assert "AGENTRT_API_TOKEN" in body["message"]


# -- OpenAPI -----------------------------------------------------------------------------


async def test_openapi_documents_every_route_with_its_schemas_and_security(
    api: httpx.AsyncClient,
) -> None:
    response = await api.get("/openapi.json", headers={"Authorization": ""})
    assert response.status_code == 200  # the schema is public: it holds no data
    doc = response.json()
    components = doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    routes = data_routes(api.app)  # type: ignore[attr-defined]
    assert {r.path for r in routes} >= {
        "/runs", "/runs/{run_id}", "/runs/{run_id}/events", "/runs/{run_id}/timeline",
        "/runs/{run_id}/state", "/audit", "/usage", "/dead-letters", "/circuit-transitions",
    }  # fmt: skip
    for route in routes:
        op = doc["paths"][route.path][method_of(route).lower()]
        assert op["security"] == [{"bearer": []}], route.path
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        ref = ok.get("$ref") or ok["items"]["$ref"]
        assert ref.removeprefix("#/components/schemas/") in components, ref
        for status in ("401", "404", "422"):
            error = op["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}, (route.path, status)
        documented = {p["name"] for p in op.get("parameters", [])}
        params = [*route.dependant.path_params, *route.dependant.query_params]
        assert params and documented == {p.name for p in params}, route.path
    # Every reference in the document resolves.
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in components, ref
    assert set(components["ErrorBody"]["required"]) == {"code", "message"}
    assert "next_cursor" in components["Page_RunRow_"]["properties"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


# -- the data ------------------------------------------------------------------------------


async def test_runs_list_filter_and_page(
    api: httpx.AsyncClient, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_runs
    page = (await api.get("/runs")).json()
    assert {r["run_id"] for r in page["items"]} == {str(a), str(b)}
    assert {r["status"] for r in page["items"]} == {"completed"}
    assert page["next_cursor"] is None
    assert all(r["llm_calls"] == 2 and r["tool_calls"] == 1 for r in page["items"])
    assert set(page["items"][0]["agents"]) == {"triage", "responder"}

    first = (await api.get("/runs", params={"limit": 1})).json()
    assert len(first["items"]) == 1 and first["next_cursor"]
    second = (await api.get("/runs", params={"limit": 1, "cursor": first["next_cursor"]})).json()
    assert len(second["items"]) == 1 and second["next_cursor"] is None
    assert {first["items"][0]["run_id"], second["items"][0]["run_id"]} == {str(a), str(b)}

    for params, expected in [
        ({"status": "completed", "agent": "responder"}, 2),
        ({"status": "failed"}, 0),
        ({"agent": "nobody"}, 0),
        ({"source": "test"}, 2),
        ({"since": "2000-01-01T00:00:00Z", "until": "2999-01-01T00:00:00Z"}, 2),
        ({"until": "2000-01-01T00:00:00Z"}, 0),
    ]:
        got = (await api.get("/runs", params=params)).json()
        assert len(got["items"]) == expected, (params, got)

    one = (await api.get(f"/runs/{a}")).json()
    assert one["run_id"] == str(a) and one["status"] == "completed"
    assert one["input_tokens"] > 0 and one["cost_usd"] >= 0

    for params, field in [
        ({"status": "nope"}, "query.status"),
        ({"limit": 0}, "query.limit"),
        ({"since": "yesterday"}, "query.since"),
    ]:
        body = assert_error(await api.get("/runs", params=params), 422, "invalid_request")
        assert body["field"] == field
    assert_error(await api.get("/runs", params={"cursor": "garbage"}), 422, "invalid_query")
    naive = await api.get("/runs", params={"since": "2020-01-01T00:00:00"})
    assert_error(naive, 422, "invalid_query")


async def test_a_run_s_routes_never_return_another_run_s_rows(
    api: httpx.AsyncClient, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_runs
    for run_id in (a, b):
        own = {e.event_id for e in await log.read_run(run_id)}
        events = (await api.get(f"/runs/{run_id}/events")).json()
        assert {uuid.UUID(e["event_id"]) for e in events["items"]} == own
        assert {e["run_id"] for e in events["items"]} == {str(run_id)}
        paged = (await api.get(f"/runs/{run_id}/events", params={"limit": 2})).json()
        rest = await api.get(f"/runs/{run_id}/events", params={"cursor": paged["next_cursor"]})
        assert [e["event_id"] for e in paged["items"] + rest.json()["items"]] == [
            e["event_id"] for e in events["items"]
        ]

        timeline = (await api.get(f"/runs/{run_id}/timeline")).json()
        assert {uuid.UUID(e["event_id"]) for e in timeline} == own
        assert timeline[0]["event_id"] == str(run_id)  # the trigger first, then what it caused
        assert timeline[0]["depth"] == 0 and timeline[1]["parent"] == str(run_id)

        audit = (await api.get("/audit", params={"run_id": str(run_id), "limit": 1000})).json()
        assert audit["items"] and {e["run_id"] for e in audit["items"]} == {str(run_id)}
        assert {e["event_id"] for e in audit["items"]} <= {str(e) for e in own}

        state = (await api.get(f"/runs/{run_id}/state")).json()
        assert state["run_id"] == str(run_id)
        assert state["event_count"] == len(own)
        (tally,) = state["agents"]
        assert tally["agent"] == "tallier" and tally["state"]["events"] == len(own)

        dead = (await api.get("/dead-letters", params={"run_id": str(run_id)})).json()
        assert dead == {"items": [], "next_cursor": None}


async def test_time_travel_answers_the_state_as_of_each_event(
    api: httpx.AsyncClient, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_runs
    events = await log.read_run(a)
    for i, event in enumerate(events):
        state = (await api.get(f"/runs/{a}/state", params={"at": event.position})).json()
        assert state["position"] == event.position and state["event_count"] == i + 1
        assert state["agents"][0]["state"] == {
            "events": i + 1,
            "types": [e.event_type for e in events[: i + 1]],
        }
    # A position of the other run is not one of this run's events.
    other = (await log.read_run(b))[0].position
    body = assert_error(
        await api.get(f"/runs/{a}/state", params={"at": other}), 422, "step_out_of_range"
    )
    assert str(other) in body["message"]
    assert_error(await api.get(f"/runs/{a}/state", params={"at": "x"}), 422, "invalid_request")


async def test_unknown_runs_are_404_and_bad_ids_422(
    api: httpx.AsyncClient, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    missing = uuid.uuid4()
    for path in ("", "/events", "/timeline", "/state", "/agent-states"):
        assert_error(await api.get(f"/runs/{missing}{path}"), 404, "run_not_found")
        body = assert_error(await api.get(f"/runs/not-a-uuid{path}"), 422, "invalid_request")
        assert body["field"] == "path.run_id"
    assert_error(await api.get("/audit", params={"run_id": "x"}), 422, "invalid_request")
    empty = (await api.get("/audit", params={"run_id": str(missing)})).json()
    assert empty == {"items": [], "next_cursor": None}
    assert_error(await api.get("/nowhere"), 404, "not_found")
    # Cursors that parse but hold numbers past 64 bits.
    huge = str(2**70)
    for path, cursor in [
        (f"/runs/{two_runs[0]}/events", f"1:{huge}"),
        (f"/runs/{two_runs[0]}/events", f"{huge}:1"),
        ("/audit", encode_cursor(int(huge), 1)),
        ("/dead-letters", encode_cursor(1, int(huge))),
    ]:
        assert_error(await api.get(path, params={"cursor": cursor}), 422, "invalid_query")
    # PostgreSQL text cannot hold NUL: refused before any query, never a 500.
    for path, name in [("/audit", "q"), ("/runs", "agent"), ("/usage", "model")]:
        body = assert_error(await api.get(path, params={name: "a\x00b"}), 422, "invalid_request")
        assert body["field"] == f"query.{name}"


async def test_usage_dead_letters_circuits_and_audit_search(
    api: httpx.AsyncClient, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    usage = (await api.get("/usage")).json()
    assert usage and {row["agent"] for row in usage} == {"triage", "responder"}
    assert sum(row["calls"] for row in usage) == 4
    total = (await api.get("/usage", params={"group_by": "model"})).json()
    assert {row["agent"] for row in total} == {None}
    assert sum(row["calls"] for row in total) == 4
    assert (await api.get("/usage", params={"agent": "triage"})).json()[0]["calls"] == 2
    assert_error(await api.get("/usage", params={"group_by": "x"}), 422, "invalid_request")
    assert (await api.get("/dead-letters")).json() == {"items": [], "next_cursor": None}
    assert_error(await api.get("/dead-letters", params={"status": "x"}), 422, "invalid_request")
    assert (await api.get("/circuit-transitions")).json()["items"] == []
    calls = (await api.get("/audit", params={"type": "tool.call"})).json()["items"]
    assert len(calls) == 2 and {c["subject"] for c in calls} == {"lookup_customer"}
    by_agent = (await api.get("/audit", params={"agent": "responder", "limit": 1000})).json()
    assert by_agent["items"] and {e["actor"] for e in by_agent["items"]} == {"responder"}


async def test_state_without_the_agents_code_is_422_and_unknown_runs_still_404(
    settings: Settings, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    app = create_api(with_token(settings), pool=log.pool)
    async with client_of(app, headers=AUTH) as client:
        body = assert_error(await client.get(f"/runs/{two_runs[0]}/state"), 422, "agent_not_found")
        assert "--app" in body["message"]
        assert_error(await client.get(f"/runs/{uuid.uuid4()}/state"), 404, "run_not_found")


# -- schemathesis ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` on a real uvicorn in a thread of its own (its own loop, its own pool)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def test_openapi_driven_requests_with_a_token_never_get_a_5xx(
    settings: Settings, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    app = create_api(with_token(settings), agents=[Tallier()])
    with serving(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        checked = 0
        started = time.monotonic()
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
            def no_server_error(case: schemathesis.Case) -> None:
                response = case.call(base_url=url, headers=AUTH, timeout=10)
                # Every check (status codes, content types, the response's schema, auth not
                # ignored) but positive data acceptance: a schema-valid cursor can still be
                # one no query returned, and that is a 422 by design.
                case.validate_response(
                    response, headers=AUTH, excluded_checks=[positive_data_acceptance]
                )
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text}"
                )
                assert response.status_code != 401
                if response.status_code >= 400:
                    assert {"code", "message"} <= set(response.json())

            no_server_error()
            checked += 1
        assert checked >= 9
        assert time.monotonic() - started < 60


# -- mounted in the ingress -----------------------------------------------------------------


async def test_the_ingress_mounts_the_api_through_the_entry_point_group(
    servers: Servers, settings: Settings, log: EventLog
) -> None:
    assert "projections" in {ep.name for ep in entry_points(group=ROUTES_GROUP)}
    await project(log, settings)  # the read models exist (empty)
    s = with_token(settings.with_urls(redis_url=db_url(servers.redis_url), database_url=None))
    s = dataclasses.replace(s, redis_url=db_url(servers.redis_url))
    config = make_config()
    app = create_app(s, config, resolve(config))
    async with client_of(app) as client:
        assert_error(await client.get("/runs"), 401, "unauthorized")
        assert (await client.get("/runs", headers=AUTH)).json() == {
            "items": [],
            "next_cursor": None,
        }
        assert_error(await client.get(f"/runs/{uuid.uuid4()}", headers=AUTH), 404, "run_not_found")
        # Webhooks keep their own auth: no bearer token needed, a signature is.
        body = b'{"data": {"customer": {"id": "c1"}}}'
        posted = await client.post("/webhooks/orders", content=body, headers=standard_headers(body))
        assert posted.status_code == 202, posted.text
        unsigned = await client.post("/webhooks/orders", content=body, headers=AUTH)
        assert unsigned.status_code == 401
        doc = (await client.get("/openapi.json")).json()
        assert {"/webhooks/{source}", "/runs", "/runs/{run_id}/timeline"} <= set(doc["paths"])
        assert "RunRow" in doc["components"]["schemas"]
        assert "ErrorBody" in doc["components"]["schemas"]

    plain = create_app(s, config, resolve(config), routes=False)
    async with client_of(plain) as client:
        assert_error(await client.get("/runs", headers=AUTH), 404, "not_found")


async def test_the_mounted_api_without_a_database_answers_503(servers: Servers) -> None:
    s = dataclasses.replace(
        Settings.from_env({}, api_token=TOKEN), redis_url=db_url(servers.redis_url)
    )
    config = make_config()
    app = create_app(s, config, resolve(config))
    async with client_of(app) as client:
        assert_error(await client.get("/runs", headers=AUTH), 503, "unavailable")
        assert_error(await client.get("/runs"), 401, "unauthorized")


def test_a_broken_routes_plugin_is_logged_and_skipped() -> None:
    app = FastAPI()
    broken = EntryPoint(name="broken", value="tests.nowhere:mount", group=ROUTES_GROUP)
    good = EntryPoint(name="projections", value="projections.api:mount", group=ROUTES_GROUP)
    with structlog.testing.capture_logs() as logs:
        mounted = mount_routes(app, Settings.from_env({}, api_token=TOKEN), [broken, good])
    assert mounted == ["projections"]
    assert [e["plugin"] for e in logs if e["event"] == "webhooks.routes_failed"] == ["broken"]
    assert "/runs" in {r.path for r in data_routes(app)}


# -- agentrt api --------------------------------------------------------------------------


def start_api(settings: Settings, state: Path, port: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "AGENTRT_STATE_DIR": str(state),
    }
    env.pop("AGENTRT_API_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "runtime", "api", "--port", str(port),
         "--app", "tests.support.apps.mailpair"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_up(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()
        try:
            httpx.get(f"{url}/openapi.json", timeout=1)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "agentrt api did not start"
            time.sleep(0.1)


def check_served(url: str, token: str) -> None:
    ok = httpx.get(f"{url}/runs", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{url}/runs").status_code == 401


def stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    return stderr


async def test_agentrt_api_makes_a_token_keeps_it_private_and_reuses_it(
    settings: Settings, log: EventLog, tmp_path: Path
) -> None:
    await project(log, settings)
    tokens = []
    for _ in range(2):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_api(settings, tmp_path, port)
        try:
            wait_up(process, url)
            path = tmp_path / "api-token"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            token = path.read_text().strip()
            assert len(token) >= 40
            tokens.append(token)
            check_served(url, token)
        finally:
            stderr = stop(process)
        assert str(path) in stderr and "curl -H" in stderr, stderr
        assert token not in stderr  # where it is, not what it is
    assert tokens[0] == tokens[1]


# -- approvals ----------------------------------------------------------------------------


async def _ask(log: EventLog, run_id: uuid.UUID) -> uuid.UUID:
    approval_id = uuid.uuid4()
    asked = ApprovalRequested(approval_id=approval_id, agent="approver", subject="ship 3 x SKU?")
    await log.append(f"run-{run_id}", [NewEvent(body=asked, run_id=run_id, producer="approver")])
    return approval_id


async def test_deciding_an_approval_records_who_and_refuses_a_second_answer(
    api: httpx.AsyncClient, log: EventLog
) -> None:
    run_id = uuid.uuid4()
    approval_id = await _ask(log, run_id)
    path = f"/runs/{run_id}/approvals/{approval_id}"
    response = await api.post(path, json={"approved": False, "comment": "too many", "by": "ada"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "approval_id": str(approval_id),
        "run_id": str(run_id),
        "approved": False,
        "by": "api:ada",
        "comment": "too many",
    }
    [decided] = [e for e in await log.read_run(run_id) if isinstance(e.body, ApprovalDecided)]
    assert (decided.body.approved, decided.body.by, decided.body.comment) == (
        False,
        "api:ada",
        "too many",
    )
    assert decided.producer == "human:api:ada"
    # A second answer, whatever it says, is refused: the first stands.
    again = await api.post(path, json={"approved": True})
    body = assert_error(again, 409, "approval_already_decided")
    assert "already denied by api:ada" in body["message"]
    assert await count_type(log, "approval.decided") == 1


async def test_approval_route_answers_404_422_and_401_clearly(
    api: httpx.AsyncClient, log: EventLog
) -> None:
    run_id = uuid.uuid4()
    approval_id = await _ask(log, run_id)
    path = f"/runs/{run_id}/approvals/{approval_id}"
    # No such approval, or the approval of another run: 404.
    assert_error(await api.post(f"/runs/{run_id}/approvals/{uuid.uuid4()}", json=BODY), 404,
                 "approval_not_found")  # fmt: skip
    assert_error(await api.post(f"/runs/{uuid.uuid4()}/approvals/{approval_id}", json=BODY), 404,
                 "approval_not_found")  # fmt: skip
    assert_error(await api.post(f"/runs/nope/approvals/{approval_id}", json=BODY), 422,
                 "invalid_request")  # fmt: skip
    for bad in (b"", b"{", b"[]", b'{"approved": "yes"}', b"{}", b'{"approved": true, "x": 1}'):
        response = await api.post(path, content=bad, headers={"content-type": "application/json"})
        body = assert_error(response, 422, "invalid_request")
        assert "approved: bool" in body["message"]
    response = await api.post(path, json=BODY, headers={"Authorization": "Bearer wrong"})
    assert_error(response, 401, "unauthorized")
    # Nothing was decided by any of these.
    assert await count_type(log, "approval.decided") == 0
    assert (await api.post(path, json=BODY)).status_code == 200
