"""The query API app (``agentrt api``) and its mounting into another app (the ingress).

Both serve the same router (:func:`projections.api.routes.router`) guarded by the same
bearer check; they differ in who owns the PostgreSQL pool. ``create_api`` opens it in
its lifespan (so a bad URL fails the start, by name); ``mount`` opens it on the first
request that needs it and closes it when the host app's lifespan ends, so an ingress
whose users never query pays nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import asyncpg
import structlog
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from projections.api.auth import bearer_check, configured_token
from projections.api.backend import Backend
from projections.api.http import ErrorBody, json_response
from projections.api.openapi import install_components
from projections.ui import install as install_ui
from runtime.agents.agent import Agent
from runtime.settings import Settings

log = structlog.get_logger(__name__)

DESCRIPTION = """\
Read models of the agentrt log: runs, their events and timelines, each agent's state as of
any event (time travel), audit entries, token usage and cost, dead letters.

The run explorer, a web UI over the same data, is at `/ui` (sign in with the token).

Every route needs `Authorization: Bearer <token>` (settings.api_token, or the token
`agentrt api` keeps in `<state_dir>/api-token`); a missing or wrong token is 401.
The schema (`/openapi.json`) and the docs (`/docs`) are served without a token: they
describe the routes and hold no data.

Lists are cursor-paginated: pass a response's `next_cursor` as `cursor` for the next
page; `next_cursor` is null on the last page.
"""


def install(app: FastAPI, backend: Backend) -> str | None:
    """Add the guarded router to ``app`` and the result schemas to its OpenAPI document;
    the token it is guarded with."""
    from projections.api.routes import SCHEMA_TYPES, router

    token = configured_token(backend.settings)
    if token is None:
        log.info(
            "api.no_token",
            hint="every query route answers 401 until AGENTRT_API_TOKEN is set "
            "(or `agentrt api` has created <state_dir>/api-token)",
        )
    app.include_router(router(backend, bearer_check(token)))
    install_components(app, [ErrorBody, *SCHEMA_TYPES])
    return token


def create_api(
    settings: Settings, *, agents: Iterable[Agent] = (), pool: asyncpg.Pool | None = None
) -> FastAPI:
    """The query API. Opens the runtime's pool in its lifespan unless given one (which
    stays the caller's to close). ``agents`` are what ``/state`` folds with."""
    backend = Backend(settings, agents, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.pool()
        try:
            yield
        finally:
            await app.state.ui.watch.close()
            await backend.close()

    app = FastAPI(
        title="agentrt query API", version="0.1.0", description=DESCRIPTION, lifespan=lifespan
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_response(
            ErrorBody(code=code, message=str(exc.detail)), exc.status_code, _headers(exc.headers)
        )

    @app.get("/healthz", summary="The process is alive (no token: it tells nothing)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    token = install(app, backend)
    # The run explorer (/ui): pages over the same backend, signed in with the same token.
    install_ui(app, backend, token)
    app.state.backend = backend
    return app


def _headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(headers) if headers else None


def mount(app: FastAPI, settings: Settings) -> None:
    """Entry point of the ``agentrt.routes`` group: the API's routes (with their bearer
    check) in an existing app. The pool opens on the first query and closes when ``app``'s
    lifespan ends; no agents are loaded, so ``/state`` answers 422 there."""
    backend = Backend(settings)
    install(app, backend)
    _close_with(app, backend.close)


def _close_with(app: FastAPI, close: Callable[[], Any]) -> None:
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            try:
                yield state
            finally:
                await close()

    app.router.lifespan_context = lifespan
