"""The run explorer's frame over HTTP (no browser): sign-in, the session cookie, CSRF on
every POST of every page, static files' caching, the security headers.

The app is ``create_api``'s, on this test's own schema, driven in-process (ASGI)."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from projections.api import create_api
from projections.engine import Projector
from projections.registry import registered
from projections.ui.session import COOKIE, CSRF_HEADER, LIFETIME, LOGIN_COOKIE, Sessions
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.events import Noted

TOKEN = "ui-token-" + "t" * 32
BASE = "http://testserver"


@contextlib.asynccontextmanager
async def served(
    settings: Settings, log: EventLog
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_api(dataclasses.replace(settings, api_token=TOKEN), pool=log.pool)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client,
    ):
        yield app, client


@pytest.fixture
async def ui(settings: Settings, log: EventLog) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app and a client (no cookies yet), over a log with a few events, projected."""
    await log.append(f"test-{uuid.uuid4()}", [Noted(text="before", n=i) for i in range(3)])
    await Projector(log, registered(settings=settings), settings).catch_up()
    async with served(settings, log) as pair:
        yield pair


def sessions(app: FastAPI) -> Sessions:
    found: Sessions = app.state.ui.sessions
    return found


def cookie_of(response: httpx.Response, name: str) -> str | None:
    """The raw Set-Cookie header for ``name``."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return header
    return None


async def sign_in(client: httpx.AsyncClient, token: str, next_: str = "/ui/") -> httpx.Response:
    page = await client.get("/ui/login", params={"next": next_})
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text
    return await client.post(
        "/ui/login", data={"token": token, "csrf": match.group(1), "next": next_}
    )


async def test_wrong_token_is_a_401_page_and_no_session(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = ui
    r = await sign_in(client, "not-the-token")
    assert r.status_code == 401
    assert "That is not the API&#39;s token." in r.text
    assert cookie_of(r, COOKIE) is None
    assert (await client.get("/ui/")).status_code == 303  # still signed out


async def test_right_token_sets_a_strict_httponly_cookie_for_ui_only(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = ui
    assert (await client.get("/ui/")).headers["location"] == "/ui/login?next=%2Fui%2F"
    r = await sign_in(client, TOKEN, next_="/ui/runs?status=completed")
    assert r.status_code == 303 and r.headers["location"] == "/ui/runs?status=completed"
    header = cookie_of(r, COOKIE)
    assert header is not None, r.headers
    attributes = {a.strip().split("=")[0].lower(): a for a in header.split(";")[1:]}
    assert "httponly" in attributes
    assert attributes["samesite"].strip().lower() == "samesite=strict"
    assert attributes["path"].strip() == "Path=/ui"
    assert attributes["max-age"].strip() == f"Max-Age={LIFETIME}"
    assert "secure" not in attributes  # plain http here; Secure behind https (below)
    assert TOKEN not in header  # the cookie is not the token
    page = await client.get("/ui/")
    assert page.status_code == 200 and "Sign out" in page.text


async def test_behind_https_the_cookies_are_secure(ui: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, _ = ui
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        page = await client.get("/ui/login")
        login = cookie_of(page, LOGIN_COOKIE)
        assert login is not None and "; secure" in login.lower()
        r = await sign_in(client, TOKEN)
        header = cookie_of(r, COOKIE)
        assert r.status_code == 303 and header is not None
        assert "; secure" in header.lower() and "samesite=strict" in header.lower()


async def test_sign_in_form_needs_its_double_submit_cookie(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = ui
    await client.get("/ui/login")
    assert client.cookies.get(LOGIN_COOKIE)
    r = await client.post("/ui/login", data={"token": TOKEN, "csrf": "guessed", "next": "/ui/"})
    assert r.status_code == 403 and cookie_of(r, COOKIE) is None
    client.cookies.clear()
    r = await client.post("/ui/login", data={"token": TOKEN, "csrf": "x", "next": "/ui/"})
    assert r.status_code == 403 and cookie_of(r, COOKIE) is None


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example/ui/", "/\\evil.example", "/ui\\..\\x",
     "javascript:alert(1)", "/other", "ui/"],
)  # fmt: skip
async def test_sign_in_never_redirects_off_the_ui(
    ui: tuple[FastAPI, httpx.AsyncClient], target: str
) -> None:
    _, client = ui
    r = await sign_in(client, TOKEN, next_=target)
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/"


def _client_with(app: FastAPI, cookie: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=BASE, cookies={COOKIE: cookie}
    )


async def test_expired_forged_and_tampered_sessions_are_refused(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, _ = ui
    good, _ = sessions(app).issue()
    expired, _ = sessions(app).issue(now=time.time() - LIFETIME - 120)
    future, _ = sessions(app).issue(now=time.time() + 3600)
    forged, _ = Sessions("another-token").issue()
    issued, nonce, signature = good.split(".")
    tampered = [
        f"{int(issued) + 1}.{nonce}.{signature}",  # a later sign-in time, same signature
        f"{issued}.{nonce}x.{signature}",
        f"{issued}.{nonce}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}",
        f"{issued}.{nonce}",
        "",
        TOKEN,  # the bearer token is not a session
    ]
    async with _client_with(app, good) as c:
        assert (await c.get("/ui/")).status_code == 200  # the control
    for cookie in [expired, future, forged, *tampered]:
        async with _client_with(app, cookie) as c:
            r = await c.get("/ui/")
            assert r.status_code == 303, cookie
            assert r.headers["location"].startswith("/ui/login"), cookie
            htmx = await c.get("/ui/", headers={"hx-request": "true"})
            assert htmx.status_code == 401 and htmx.headers["hx-redirect"].startswith("/ui/login")


def test_malformed_cookies_are_refused_not_raised() -> None:
    """A forged cookie of any shape is no session: never an exception (a 500 before
    sign-in). Non-ASCII digits pass str.isdigit(); int() of 4,400 digits raises; a
    non-ASCII signature made compare_digest raise TypeError."""
    s = Sessions("the-token")
    good, _ = s.issue()
    issued, nonce, signature = good.split(".")
    for cookie in (f"²{issued[1:]}.{nonce}.{signature}", f"{'9' * 4400}.{nonce}.{signature}",
                   f"{issued}.{nonce}.{signature[:-1]}\xb2", f"{issued}.n\xf6nce.{signature}",
                   "..", "1.2.3.4"):  # fmt: skip
        assert s.check(cookie) is None, cookie
    # A host whose clock runs a little ahead issued it: still good; an hour ahead: not.
    ahead, _ = s.issue(now=time.time() + 30)
    assert s.check(ahead) is not None
    assert s.check(s.issue(now=time.time() + 3600)[0]) is None
    assert not Sessions.csrf_ok(s.check(good), "\xb2")  # type: ignore[arg-type]


async def test_json_api_takes_the_bearer_not_the_session_cookie(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, _ = ui
    cookie, _ = sessions(app).issue()
    async with _client_with(app, cookie) as c:
        assert (await c.get("/ui/")).status_code == 200  # the cookie is good for pages
        for path in ("/runs", "/runs?limit=1", "/usage"):
            r = await c.get(path)
            assert r.status_code == 401, (path, r.text)
        r = await c.get("/runs", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200


async def test_static_files_are_immutable_under_their_version_only(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = ui
    version = app.state.ui.static.version
    page = (await client.get("/ui/login")).text
    assert f"/ui/static/{version}/app.css" in page  # pages link the current version
    r = await client.get(f"/ui/static/{version}/app.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert (
        "immutable" in r.headers["cache-control"]
        and "max-age=31536000" in r.headers["cache-control"]
    )
    js = await client.get(f"/ui/static/{version}/htmx.min.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    old = await client.get("/ui/static/0123456789ab/app.css")
    assert old.status_code == 200 and old.headers["cache-control"] == "no-cache"
    assert old.content == r.content
    missing = await client.get(f"/ui/static/{version}/nothing.js")
    assert missing.status_code == 404
    hidden = await client.get(f"/ui/static/{version}/VENDORED.md")
    assert hidden.status_code == 404


async def test_pages_carry_the_csp_and_no_inline_script_or_style(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = ui
    login = await client.get("/ui/login")
    cookie, _ = sessions(app).issue()
    paths = {getattr(c.original_route, "path", "") for c in iter_route_contexts(app.routes)}
    async with _client_with(app, cookie) as c:
        pages = [
            login,
            await c.get("/ui/"),
            await c.get("/ui/?status=nonsense"),
            await c.post("/ui/logout"),
        ]  # fmt: skip  (the last: the 403 page)
        if "/ui/runs/{run_id}" in paths:  # the run page (an unknown run: its error page)
            pages.append(await c.get(f"/ui/runs/{uuid.uuid4()}"))
    assert pages[3].status_code == 403
    for r in pages:
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "style-src 'self'" in csp, (r.url, csp)
        assert "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), r.url  # no inline script
        assert not re.search(r"\sstyle=", r.text), r.url
        assert not re.search(r"\son[a-z]+=|\shx-on", r.text), r.url  # no inline handlers


# -- CSRF: every POST of every page ------------------------------------------------------


def ui_posts(app: FastAPI) -> list[APIRoute]:
    """Every POST route under /ui but sign-in (guarded by its double-submit cookie): the
    pages other modules add are covered as they appear."""
    found = [c.original_route for c in iter_route_contexts(app.routes)]
    return [
        r for r in found
        if isinstance(r, APIRoute) and r.path.startswith("/ui/") and "POST" in (r.methods or ())
        and r.path != "/ui/login"
    ]  # fmt: skip


def concrete(path: str, run_id: str) -> str:
    path = path.replace("{run_id}", run_id)
    return re.sub(r"\{[^}]+\}", lambda m: str(uuid.uuid4()) if "id" in m.group(0) else "1", path)


async def events_in(log: EventLog) -> int:
    return int(await log.pool.fetchval(f'SELECT count(*) FROM "{log.schema}".events'))


async def assert_posts_refused_without_csrf(app: FastAPI, log: EventLog, run_id: str) -> int:
    """Each POST under /ui, with a valid session but no CSRF token, or another session's
    (as header and as form field), is refused with 403 and appends nothing; how many
    routes were checked."""
    cookie, mine = sessions(app).issue()
    _, theirs = sessions(app).issue()
    assert mine.csrf != theirs.csrf
    routes = ui_posts(app)
    assert routes, "no POST routes under /ui (sign-out at least should be one)"
    async with _client_with(app, cookie) as c:
        for route in routes:
            url = concrete(route.path, run_id)
            before = await events_in(log)
            attempts: list[dict[str, Any]] = [
                {},
                {"data": {"approved": "true", "by": "ops", "reason": "x"}},
                {"headers": {CSRF_HEADER: theirs.csrf}},
                {"headers": {CSRF_HEADER: ""}},
                {"data": {"csrf": theirs.csrf, "approved": "true"}},
                {"json": {"csrf": mine.csrf}},  # a JSON body's field is not the header
                {"headers": {CSRF_HEADER: theirs.csrf, "hx-request": "true"}},
            ]
            for kwargs in attempts:
                r = await c.post(url, **kwargs)
                assert r.status_code == 403, (route.path, kwargs, r.status_code, r.text[:300])
                assert "CSRF" in r.text
            assert await events_in(log) == before, route.path
    return len(routes)


async def test_every_ui_post_needs_its_sessions_csrf_token(
    ui: tuple[FastAPI, httpx.AsyncClient], log: EventLog
) -> None:
    app, _ = ui
    run_id = str(uuid.uuid4())
    checked = await assert_posts_refused_without_csrf(app, log, run_id)
    assert checked >= 1
    # ... and the same session's token is accepted (sign-out: a redirect to sign-in).
    cookie, mine = sessions(app).issue()
    async with _client_with(app, cookie) as c:
        r = await c.post("/ui/logout", headers={CSRF_HEADER: mine.csrf})
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        r = await c.post("/ui/logout", data={"csrf": mine.csrf})
        assert r.status_code == 303


async def test_a_post_without_a_session_is_not_run(
    ui: tuple[FastAPI, httpx.AsyncClient], log: EventLog
) -> None:
    app, client = ui
    before = await events_in(log)
    for route in ui_posts(app):
        r = await client.post(concrete(route.path, str(uuid.uuid4())))
        assert r.status_code == 401, route.path
    assert await events_in(log) == before


@pytest.fixture
def csrf_check_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug the check above must catch: a frame that lets any POST through."""
    monkeypatch.setattr(Sessions, "csrf_ok", staticmethod(lambda session, given: True))


async def test_the_csrf_check_catches_a_frame_without_csrf(
    ui: tuple[FastAPI, httpx.AsyncClient], log: EventLog, csrf_check_disabled: None
) -> None:
    app, _ = ui
    with pytest.raises(AssertionError):
        await assert_posts_refused_without_csrf(app, log, str(uuid.uuid4()))


async def test_htmx_keeps_no_pages_and_a_history_restore_gets_the_whole_page(
    ui: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """htmx would keep snapshots of pages (runs, audit entries, the CSRF field) in
    localStorage, where they outlive the session: its history cache is off, and going back
    reloads the page. A restore request (HX-Request with HX-History-Restore-Request) gets
    the whole page, frame included, not a fragment."""
    import json
    import re

    app, _ = ui
    cookie, _ = sessions(app).issue()
    async with _client_with(app, cookie) as c:
        page = await c.get("/ui/")
        restore = await c.get(
            "/ui/", headers={"hx-request": "true", "hx-history-restore-request": "true"}
        )
        fragment = await c.get("/ui/audit", headers={"hx-request": "true"})
    [raw] = re.findall(r"<meta name=\"htmx-config\" content='([^']*)'>", page.text)
    config = json.loads(raw)
    assert config["historyCacheSize"] == 0 and config["refreshOnHistoryMiss"] is True
    assert config["allowEval"] is False and config["selfRequestsOnly"] is True
    assert '<nav aria-label="Sections">' in restore.text  # the frame
    assert '<nav aria-label="Sections">' not in fragment.text  # an ordinary htmx request
