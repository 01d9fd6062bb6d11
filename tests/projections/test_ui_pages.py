"""The run explorer's approvals, audit, usage, dead-letter and circuit pages without a
browser: CSRF on every POST, approvals scoped to their run, bad input as 4xx messages,
Redis needed and said so, and the SVG bar chart.

Not under tests/ui: the browser tests' session-long Playwright (sync API) keeps an event
loop running in this thread, and the async tests that run after it fail to start theirs.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from projections.api import create_api
from projections.engine import Projector
from projections.registry import registered
from projections.ui.charts import BAR_WIDTH, bar_chart
from runtime.events.builtin import ApprovalRequested, CircuitTransitioned
from runtime.events.ids import run_stream
from runtime.events.model import NewEvent
from runtime.log import approvals
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.streams.keys import DLQ_STREAM, agent_stream
from runtime.worker import dead_letters as dlq
from runtime.worker.delivery import parse_delivery
from tests.support.runtime import count_type, db_url

TOKEN = "ui-test-token-" + "k" * 32


async def _client(settings: Settings, log: EventLog) -> AsyncIterator[httpx.AsyncClient]:
    app = create_api(dataclasses.replace(settings, api_token=TOKEN), pool=log.pool)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
    ):
        await client.get("/ui/login")
        nonce = client.cookies["agentrt_login"]
        form = {"token": TOKEN, "csrf": nonce, "next": "/ui/"}
        signed = await client.post("/ui/login", data=form)
        assert signed.status_code == 303, signed.text
        yield client


@pytest.fixture
async def ui(settings: Settings, log: EventLog) -> AsyncIterator[httpx.AsyncClient]:
    """A signed-in client of the run explorer on this test's log and Redis database."""
    settings = dataclasses.replace(settings, redis_url=db_url(settings.require_redis_url()))
    async for client in _client(settings, log):
        yield client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


async def _ask(log: EventLog, run_id: uuid.UUID, subject: str) -> uuid.UUID:
    approval_id = uuid.uuid4()
    details = {"risk": 3, "draft": {"subject": "Re: <b>", "body": "Hi"}}
    asked = ApprovalRequested(approval_id=approval_id, agent="reviewer", subject=subject,
                              details=details)  # fmt: skip
    await log.append(run_stream(run_id), [NewEvent(body=asked, run_id=run_id, producer="reviewer")])
    return approval_id


async def project(log: EventLog, settings: Settings) -> None:
    await Projector(log, registered(agents=[]), settings).catch_up()


# -- approvals ----------------------------------------------------------------------------


async def test_approvals_page_lists_and_decides_only_with_csrf_and_the_owning_run(
    ui: httpx.AsyncClient, log: EventLog
) -> None:
    run_a, run_b = uuid.uuid4(), uuid.uuid4()
    a = await _ask(log, run_a, "Send a refund to <ada>?")
    b = await _ask(log, run_b, "Send a reply to grace?")
    page = await ui.get("/ui/approvals")
    assert page.status_code == 200
    assert "Send a refund to &lt;ada&gt;?" in page.text and "Send a reply to grace?" in page.text
    assert "Re: &lt;b&gt;" in page.text and "Risk" in page.text
    token = csrf_of(page.text)
    path = f"/ui/runs/{run_a}/approvals/{a}"

    refused = await ui.post(path, data={"decision": "approve"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    # Another run's approval, or an unknown one: 404, and nothing is decided.
    other = await ui.post(f"/ui/runs/{run_b}/approvals/{a}",
                          data={"decision": "approve", "csrf": token})  # fmt: skip
    assert other.status_code == 404 and "has no approval" in other.text
    unknown = await ui.post(f"/ui/runs/{run_a}/approvals/{uuid.uuid4()}",
                            data={"decision": "deny", "csrf": token})  # fmt: skip
    assert unknown.status_code == 404
    bad = await ui.post(path, data={"decision": "maybe", "csrf": token})
    assert bad.status_code == 422
    assert await count_type(log, "approval.decided") == 0

    done = await ui.post(path, data={"decision": "approve", "comment": " ok by Ada ",
                                     "csrf": token})  # fmt: skip
    assert done.status_code == 200 and "Approved" in done.text
    decision = await approvals.decision_of(log, a)
    assert decision is not None and decision.approved
    assert (decision.by, decision.comment) == ("ui", "ok by Ada")
    again = await ui.post(path, data={"decision": "deny", "csrf": token},
                          headers={"hx-request": "true"})  # fmt: skip
    assert again.status_code == 409 and "already approved" in again.text
    assert await count_type(log, "approval.decided") == 1
    # The decided one is gone from the page, the other still waits.
    after = await ui.get("/ui/approvals")
    assert str(a) not in after.text and str(b) in after.text


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("/ui/audit?run_id=nope", "a run id"),
        ("/ui/audit?since=yesterday", "a date and time"),
        ("/ui/audit?since=2026-12-02T00:00&until=2026-12-01T00:00", "must not be before since"),
        ("/ui/audit?q=" + "x" * 600, "at most 500 characters"),
        ("/ui/usage?since=2026-13-01", "a day, like"),
        ("/ui/usage?since=2026-12-02&until=2026-12-01", "must not be before since"),
        ("/ui/dead-letters?status=lost", "open or redriven"),
        ("/ui/circuits?name=" + "n" * 300, "at most 200 characters"),
    ],
)
async def test_bad_filters_are_said_beside_the_form(
    ui: httpx.AsyncClient, log: EventLog, settings: Settings, url: str, said: str
) -> None:
    await project(log, settings)
    r = await ui.get(url)
    assert r.status_code == 422, r.text
    assert said in r.text and 'role="alert"' in r.text
    assert "<form" in r.text  # the form stays, to be corrected
    # An htmx request gets the message as a fragment (htmx would treat a 4xx as a failure).
    fragment = await ui.get(url, headers={"hx-request": "true", "hx-target": "audit"})
    assert fragment.status_code == 200 and said in fragment.text


async def test_bad_cursors_and_ids_are_4xx(
    ui: httpx.AsyncClient, log: EventLog, settings: Settings
) -> None:
    await project(log, settings)
    for url in ("/ui/audit?cursor=garbage", "/ui/circuits?cursor=x", "/ui/dead-letters?cursor=1"):
        r = await ui.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
    r = await ui.get("/ui/dead-letters/not-an-id")
    assert r.status_code == 404 and "like 1733045000000-0" in r.text
    # Well-formed but past a stream id's 64 bits: Redis would answer an error (was a 500).
    huge = "99999999999999999999-0"
    r = await ui.get(f"/ui/dead-letters/{huge}")
    assert r.status_code == 404 and "like 1733045000000-0" in r.text
    r = await ui.post(f"/ui/dead-letters/{huge}/redrive", data={"csrf": csrf_of(r.text)})
    assert r.status_code == 404
    for url in ("/ui/audit", "/ui/usage", "/ui/dead-letters", "/ui/circuits"):
        assert (await ui.get(url)).status_code == 200, url


# -- dead letters -------------------------------------------------------------------------


async def _dead_letter(log: EventLog, redis: aioredis.Redis) -> tuple[str, uuid.UUID]:
    """A real dead letter (the worker's function): its id in Redis, and its run."""
    event_id = uuid.uuid4()
    fields = {"event_id": str(event_id), "type": "email.received", "schema_version": "1",
              "body": '{"subject": "<hello>"}', "run_id": str(event_id)}  # fmt: skip
    stream = agent_stream("triage")
    entry_id = (await redis.xadd(stream, fields)).decode()
    d = parse_delivery(stream, entry_id, fields)
    assert await dlq.dead_letter(log, redis, "triage", stream, entry_id, fields, d,
                                 RuntimeError("the <shop> is down"), 5)  # fmt: skip
    [letter] = await dlq.list_dead_letters(redis)
    return letter.id, event_id


async def test_dead_letter_inspect_and_redrive_need_csrf(
    ui: httpx.AsyncClient, log: EventLog, settings: Settings, redis: aioredis.Redis
) -> None:
    letter_id, run_id = await _dead_letter(log, redis)
    await project(log, settings)
    listed = await ui.get("/ui/dead-letters?status=open")
    assert listed.status_code == 200 and f"/ui/dead-letters/{letter_id}" in listed.text
    one = await ui.get(f"/ui/dead-letters/{letter_id}")
    assert one.status_code == 200
    assert "the &lt;shop&gt; is down" in one.text and "&lt;hello&gt;" in one.text
    assert f"/ui/runs/{run_id}" in one.text and "--force" in one.text
    before = await redis.xlen(agent_stream("triage"))

    refused = await ui.post(f"/ui/dead-letters/{letter_id}/redrive", data={})
    assert refused.status_code == 403
    assert await redis.xlen(DLQ_STREAM) == 1 and await count_type(log, "dead_letter.redriven") == 0

    done = await ui.post(f"/ui/dead-letters/{letter_id}/redrive", data={"csrf": csrf_of(one.text)})
    assert done.status_code == 200 and "Redriven" in done.text
    assert await redis.xlen(DLQ_STREAM) == 0
    assert await redis.xlen(agent_stream("triage")) == before + 1
    assert await count_type(log, "dead_letter.redriven") == 1
    again = await ui.post(f"/ui/dead-letters/{letter_id}/redrive", data={"csrf": csrf_of(one.text)})
    assert again.status_code == 404 and "nothing was redriven" in again.text


async def test_dead_letters_without_redis_say_it_needs_redis_url(
    settings: Settings, log: EventLog
) -> None:
    async for client in _client(dataclasses.replace(settings, redis_url=None), log):
        await project(log, settings)
        r = await client.get("/ui/dead-letters/1733045000000-0")
        assert r.status_code == 503 and "REDIS_URL" in r.text
        assert (await client.get("/ui/dead-letters")).status_code == 200


# -- circuits -----------------------------------------------------------------------------


async def test_circuits_page_shows_each_circuits_state_and_filters_its_history(
    ui: httpx.AsyncClient, log: EventLog, settings: Settings
) -> None:
    run_id = uuid.uuid4()
    moves = [
        ("find_orders", "closed", "open"),
        ("send_mail", "closed", "open"),
        ("find_orders", "open", "half_open"),
        ("find_orders", "half_open", "closed"),
    ]
    for name, before, after in moves:
        body = CircuitTransitioned(name=name, from_state=before, to_state=after, failures=5,
                                   reason="<5 failures>")  # fmt: skip
        await log.append(run_stream(run_id), [NewEvent(body=body, run_id=run_id, producer="x")])
    await project(log, settings)
    page = await ui.get("/ui/circuits")
    assert page.status_code == 200
    now = page.text.split("<h2>History</h2>")[0]
    states = re.findall(r'<th scope="row"><a [^>]*>([a-z_]+)</a></th><td><span class="badge '
                        r'([a-z_]+)">', now)  # fmt: skip
    assert states == [("find_orders", "closed"), ("send_mail", "open")]
    assert "&lt;5 failures&gt;" in page.text and f"/ui/runs/{run_id}" in page.text
    one = await ui.get("/ui/circuits?name=send_mail")
    history = one.text.split("<h2>History</h2>")[1]
    assert history.count("<tr>") == 2  # the header and send_mail's one transition
    assert "find_orders" not in history


async def test_a_circuit_that_tripped_long_ago_still_shows_its_state(
    ui: httpx.AsyncClient, log: EventLog, settings: Settings
) -> None:
    """send_mail opened, then another tool flapped 1,002 times: send_mail is still open on
    the page (its state was taken from the newest 1,000 transitions of all circuits)."""
    run_id = uuid.uuid4()

    def move(name: str, before: str, after: str) -> NewEvent:
        body = CircuitTransitioned(name=name, from_state=before, to_state=after, failures=5,
                                   reason="failures")  # fmt: skip
        return NewEvent(body=body, run_id=run_id, producer="x")

    flaps = [move("find_orders", *(("closed", "open") if i % 2 == 0 else ("open", "closed")))
             for i in range(1002)]  # fmt: skip
    await log.append(run_stream(run_id), [move("send_mail", "closed", "open"), *flaps])
    await project(log, settings)
    page = await ui.get("/ui/circuits")
    now = page.text.split("<h2>History</h2>")[0]
    states = re.findall(r'<th scope="row"><a [^>]*>([a-z_]+)</a></th><td><span class="badge '
                        r'([a-z_]+)">', now)  # fmt: skip
    assert states == [("find_orders", "closed"), ("send_mail", "open")]


# -- the chart ----------------------------------------------------------------------------


def test_bar_chart_empty_one_and_many() -> None:
    empty = str(bar_chart([], title="Cost"))
    assert empty.startswith("<svg") and "No data" in empty and "<rect" not in empty
    assert "<title" in empty and 'role="img"' in empty

    one = str(bar_chart([("claude-haiku", 42.0)], title="Tokens"))
    assert one.count("<rect") == 1 and f'width="{BAR_WIDTH:.1f}"' in one  # the largest: full
    assert "<title>claude-haiku: 42</title>" in one

    many = str(bar_chart([("a", 10.0), ("<script>", 5.0), ("zero", 0.0), ("neg", -3.0)],
                         title="T & <x>", value=lambda v: f"${v:.2f}"))  # fmt: skip
    widths = [float(w) for w in re.findall(r'<rect[^>]* width="([\d.]+)"', many)]
    assert widths == [BAR_WIDTH, BAR_WIDTH / 2, 0.0, 0.0]
    assert "<script>" not in many and "&lt;script&gt;" in many
    assert "T &amp; &lt;x&gt;" in many and "$5.00" in many
    assert "style=" not in many and "style=" not in one and "style=" not in empty
