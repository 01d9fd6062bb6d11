"""Dead letters: activations that failed too often; inspecting one and redriving it.

The list is the ``dead_letters`` read model (open and redriven ones); an open letter's
entry, with the trigger's body, is in Redis's dead-letter stream, which is also where a
redrive takes it from (``agentrt dlq redrive``). Redis is ``REDIS_URL``, which
``agentrt up`` gives the API's process; each request opens its own connection and
closes it (the page is rare; a pool held for it would be idle).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import redis.asyncio as aioredis
from fastapi import APIRouter, Request, Response

from projections.ui.app import UI
from projections.ui.filters import Form, error_status
from runtime.errors import DeadLetterNotFound, RedriveRefused, ServiceUnavailable
from runtime.streams.keys import connect_redis
from runtime.worker import dead_letters as dlq

#: Letters per page.
PAGE_SIZE = 50
#: Open letters of Redis's stream matched to the page's rows (by agent, stream, entry).
MAX_MATCHED = 1000
#: A Redis stream entry id: two unsigned 64-bit numbers (checked by :func:`entry_id_ok`).
ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_U64 = 2**64 - 1


def entry_id_ok(value: str) -> bool:
    """A well-formed stream id Redis accepts (a larger number is a Redis error: a 500)."""
    if not ENTRY_ID.match(value):
        return False
    ms, seq = value.split("-")
    return int(ms) <= _U64 and int(seq) <= _U64


NO_REDIS = (
    "Inspecting and redriving a dead letter needs Redis, and this API has no REDIS_URL. "
    "`agentrt up` sets it; for `agentrt api` alone, set REDIS_URL to the workers' Redis."
)


class NoRedis(Exception):
    """The API was started without ``REDIS_URL``."""


@asynccontextmanager
async def redis_of(ui: UI) -> AsyncIterator[aioredis.Redis]:
    """A connection to the deployment's Redis for this request, closed after it."""
    url = ui.backend.settings.redis_url
    if url is None:
        raise NoRedis
    client = await connect_redis(url, attempts=2, socket_timeout=5.0)
    try:
        yield client
    finally:
        await client.aclose()


def _body(letter: dlq.DeadLetter) -> str:
    """The trigger event's body, indented when it is JSON."""
    raw = letter.fields.get("body", "")
    try:
        return msgspec.json.format(raw, indent=2)
    except msgspec.DecodeError:
        return raw


def routes(r: APIRouter, ui: UI) -> None:
    def unavailable(request: Request, message: str) -> Response:
        return ui.render(request, "error.html", 503, title="Redis is not available",
                         message=message)  # fmt: skip

    def bad_id(request: Request) -> Response:
        return ui.render(request, "error.html", 404, title="No such dead letter",
                         message="a dead letter's id is like 1733045000000-0")  # fmt: skip

    @r.get("/dead-letters")
    async def dead_letters_page(request: Request, cursor: str | None = None) -> Response:
        form = Form(request, ("status", "agent"))
        status, agent = form.text("status"), form.text("agent")
        if status not in (None, "open", "redriven"):
            form.errors["status"] = "open or redriven"
        page = None
        ids: dict[tuple[str, str, str], str] = {}
        redis_note = None
        if not form.errors:
            models = await ui.models()
            page = await models.dead_letters(agent=agent, status=status, limit=PAGE_SIZE,
                                             cursor=cursor or None)  # fmt: skip
            if any(row.status == "open" for row in page.items):
                try:
                    async with redis_of(ui) as redis:
                        for letter in await dlq.list_dead_letters(redis, agent=agent,
                                                                  count=MAX_MATCHED):  # fmt: skip
                            ids[(letter.agent, letter.stream, letter.entry_id)] = letter.id
                except NoRedis:
                    redis_note = NO_REDIS
                except ServiceUnavailable as exc:
                    redis_note = f"Redis did not answer ({exc.message}): no inspecting now."
        code = error_status(request, form)
        return ui.render(request, "dead_letters.html", code, form=form, page=page, ids=ids,
                         redis_note=redis_note, cursor=cursor or "")  # fmt: skip

    @r.get("/dead-letters/{dead_letter_id}")
    async def dead_letter_page(request: Request, dead_letter_id: str) -> Response:
        if not entry_id_ok(dead_letter_id):
            return bad_id(request)
        try:
            async with redis_of(ui) as redis:
                letter = await dlq.get_dead_letter(redis, dead_letter_id)
        except NoRedis:
            return unavailable(request, NO_REDIS)
        except ServiceUnavailable as exc:
            return unavailable(request, exc.message)
        except DeadLetterNotFound:
            return ui.render(request, "error.html", 404, title="No such dead letter",
                             message=f"no open dead letter {dead_letter_id}: it may have been "
                             "redriven already (see the list's redriven ones)")  # fmt: skip
        return ui.render(request, "dead_letters_one.html", letter=letter, body=_body(letter),
                         refused=None)  # fmt: skip

    @r.post("/dead-letters/{dead_letter_id}/redrive")
    async def redrive(request: Request, dead_letter_id: str) -> Response:
        if not entry_id_ok(dead_letter_id):
            return bad_id(request)
        form = await request.form()
        force = form.get("force") == "1"
        log = await ui.backend.log()
        try:
            async with redis_of(ui) as redis:
                letter = await dlq.get_dead_letter(redis, dead_letter_id)
                try:
                    plan = await dlq.redrive(redis, log, dead_letter_id, force=force)
                except RedriveRefused as exc:
                    return ui.render(request, "dead_letters_one.html", 409, letter=letter,
                                     body=_body(letter), refused=exc.message)  # fmt: skip
        except NoRedis:
            return unavailable(request, NO_REDIS)
        except ServiceUnavailable as exc:
            return unavailable(request, exc.message)
        except DeadLetterNotFound:
            return ui.render(request, "error.html", 404, title="No such dead letter",
                             message=f"no open dead letter {dead_letter_id}: nothing was "
                             "redriven (was it redriven already?)")  # fmt: skip
        return ui.render(request, "dead_letters_redriven.html", letter=letter, plan=plan)
