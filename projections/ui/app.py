"""The run explorer's frame: templates, static files, sign-in, CSRF, error pages.

Pages are server-rendered (Jinja2) and updated in parts by htmx; there is no JavaScript
build step. Each page module (``projections.ui.pages.*``) adds its routes to the one
router through ``routes(router, ui)``; every route but sign-in needs a session, and every
POST its CSRF token (:mod:`projections.ui.session`), checked here before the handler runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import mimetypes
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import asyncpg
import jinja2
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute

from projections.errors import ReadSideError
from projections.queries import ReadModels
from projections.ui.live import LogWatch
from projections.ui.session import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    PATH,
    Session,
    Sessions,
)

if TYPE_CHECKING:  # a type only: projections.api imports this package at its start
    from projections.api.backend import Backend

#: The page modules, each with ``routes(router, ui)``.
PAGES = ("runs", "run", "actions", "approvals", "audit", "usage", "dead_letters", "circuits")

#: Sent with every page: scripts only from here (htmx runs no eval), no framing.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class SignIn(Exception):
    """No valid session: GETs go to the sign-in page, htmx requests are told to."""


class CsrfRefused(Exception):
    """A state-changing request without its session's CSRF token."""


class Static:
    """The package's static files, kept in memory and served under a content hash, so
    they can be cached for a year (a new release has a new hash: a new URL)."""

    def __init__(self) -> None:
        root = importlib.resources.files("projections.ui") / "static"
        self.files: dict[str, tuple[bytes, str]] = {}
        digest = hashlib.sha256()
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if not entry.is_file() or entry.name.endswith(".md"):
                continue
            data = entry.read_bytes()
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            self.files[entry.name] = (data, kind)
            digest.update(entry.name.encode() + b"\0" + data)
        self.version = digest.hexdigest()[:12]

    def url(self, name: str) -> str:
        return f"{PATH}/static/{self.version}/{name}"


def usd_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:.4f}" if value >= 0.0001 or value == 0 else f"${value:.6f}"


def ms_text(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 60_000:
        return f"{value / 1000:.1f} s"
    return f"{value / 60_000:.1f} min"


def when_text(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def short_text(value: object) -> str:
    return str(value)[:8]


@dataclass
class UI:
    """What the pages share: the API's backend, sessions, templates and static files."""

    backend: Backend
    sessions: Sessions
    env: jinja2.Environment
    static: Static
    watch: LogWatch
    _models: ReadModels | None = None

    async def models(self) -> ReadModels:
        if self._models is None:
            self._models = ReadModels(await self.backend.pool(), self.backend.settings)
        return self._models

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        session: Session | None = getattr(request.state, "ui_session", None)
        html = self.env.get_template(template).render(
            request=request,
            csrf=session.csrf if session else "",
            signed_in=session is not None,
            static=self.static.url,
            path=request.url.path,
            # A history restore wants the whole page (htmx keeps no pages in localStorage).
            htmx=request.headers.get("hx-request") == "true"
            and "hx-history-restore-request" not in request.headers,
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("projections.ui", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        # The templates ship in the package: no stat of every template file on every render.
        auto_reload=False,
    )
    env.filters.update(usd=usd_text, ms=ms_text, when=when_text, short=short_text)
    env.globals.update(urlencode=urlencode, quote=quote)
    return env


def _next_target(value: str | None) -> str:
    """Where to go after signing in: a path of the UI's own, never another site."""
    if value and value.startswith(f"{PATH}/") and not value.startswith("//") and "\\" not in value:
        return value
    return f"{PATH}/"


class UIRoute(APIRoute):
    """A page: needs a session (except sign-in), a POST its CSRF token; errors as pages."""

    ui: UI  # set by :func:`install` on the class it makes

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        ui = self.ui
        public = bool((self.openapi_extra or {}).get("x-public"))

        async def guarded(request: Request) -> Response:
            try:
                if not public:
                    session = ui.sessions.check(request.cookies.get(COOKIE))
                    if session is None:
                        raise SignIn
                    request.state.ui_session = session
                    if request.method not in ("GET", "HEAD"):
                        given = request.headers.get(CSRF_HEADER)
                        if given is None and _is_form(request):
                            field = (await request.form()).get(CSRF_FIELD)
                            given = field if isinstance(field, str) else None
                        if not Sessions.csrf_ok(session, given):
                            raise CsrfRefused
                return await handler(request)
            except SignIn:
                return _sign_in(request)
            except CsrfRefused:
                return ui.render(
                    request, "error.html", 403, title="Refused",
                    message="This request did not carry the page's CSRF token, so it was "
                    "refused and nothing changed. Reload the page and try again.",
                )  # fmt: skip
            except ReadSideError as exc:
                return ui.render(request, "error.html", exc.status, title=exc.code,
                                 message=exc.message)  # fmt: skip
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()))
                return ui.render(request, "error.html", 422, title="Invalid request",
                                 message=f"{where}: {first.get('msg', 'invalid')}")  # fmt: skip
            except asyncpg.DataError as exc:
                return ui.render(request, "error.html", 422, title="Invalid request",
                                 message=f"a value is out of range: {exc}")  # fmt: skip

        return guarded


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "")
    return kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data"))


def _sign_in(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = f"{PATH}/login?{urlencode({'next': target})}"
    if request.headers.get("hx-request") == "true":  # htmx follows this with a full load
        return Response(status_code=401, headers={"HX-Redirect": login})
    if request.method not in ("GET", "HEAD"):
        return Response("sign in first", status_code=401, media_type="text/plain")
    return RedirectResponse(login, status_code=303)


def _login_routes(r: APIRouter, ui: UI) -> None:
    public = {"x-public": True}

    @r.get("/login", openapi_extra=public)
    async def login_page(request: Request, next: str | None = None) -> Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or Sessions.login_nonce()
        response = ui.render(
            request, "login.html", next=_next_target(next), login_csrf=nonce, error=None,
            configured=ui.sessions.configured,
        )  # fmt: skip
        _set_cookie(request, response, LOGIN_COOKIE, nonce, max_age=3600)
        return response

    @r.post("/login", openapi_extra=public)
    async def login(request: Request) -> Response:
        form = await request.form()
        token, given, target = (str(form.get(k) or "") for k in ("token", CSRF_FIELD, "next"))
        expected = request.cookies.get(LOGIN_COOKIE)
        if not expected or not Sessions.same(given, expected):
            raise CsrfRefused
        if not ui.sessions.token_matches(token):
            return ui.render(
                request, "login.html", 401, next=_next_target(target), login_csrf=expected,
                error="That is not the API's token.", configured=ui.sessions.configured,
            )  # fmt: skip
        value, _ = ui.sessions.issue()
        signed_in = RedirectResponse(_next_target(target), status_code=303)
        _set_cookie(request, signed_in, COOKIE, value, max_age=ui.sessions.lifetime)
        signed_in.delete_cookie(LOGIN_COOKIE, path=PATH)
        return signed_in

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        response = RedirectResponse(f"{PATH}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PATH)
        return response

    @r.get("/static/{version}/{name}", openapi_extra=public)
    async def static(version: str, name: str) -> Response:
        found = ui.static.files.get(name)
        if found is None:
            return Response("no such file", status_code=404, media_type="text/plain")
        data, kind = found
        # An old version's URL still gets the current file, without the year-long promise.
        cache = (
            "public, max-age=31536000, immutable" if version == ui.static.version else "no-cache"
        )
        headers = {"cache-control": cache, "x-content-type-options": "nosniff"}
        return Response(data, media_type=kind, headers=headers)


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PATH, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def install(app: FastAPI, backend: Backend, token: str | None) -> UI:
    """Serve the run explorer at ``/ui`` of ``app`` (``agentrt api``)."""
    ui = UI(backend, Sessions(token), _environment(), Static(), LogWatch(backend))
    route_class = type("BoundUIRoute", (UIRoute,), {"ui": ui})
    r = APIRouter(prefix=PATH, route_class=route_class, include_in_schema=False)
    _login_routes(r, ui)
    for name in PAGES:
        module = importlib.import_module(f"projections.ui.pages.{name}")
        module.routes(r, ui)

    @r.get("/{rest:path}")
    async def not_found(request: Request, rest: str) -> Response:
        """Any other path under /ui: the explorer's 404 page (signed in), not the API's JSON."""
        return ui.render(request, "error.html", 404, title="Not found",
                         message=f"The run explorer has no page at /ui/{rest}.")  # fmt: skip

    app.include_router(r)

    @app.get(PATH, include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse(f"{PATH}/", status_code=307)

    app.state.ui = ui
    return ui
