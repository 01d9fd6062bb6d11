"""The built-in read models and their queries on runs made by real workers (the demo's
agents, the offline model): statuses, counts, usage, causation order, audit, isolation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from projections.builtin import builtin_projections
from projections.engine import Projector
from projections.errors import InvalidQuery, UnknownRun
from projections.queries import ReadModels
from runtime.effects.retry import RetryPolicy
from runtime.events.builtin import StepRecorded
from runtime.events.ids import run_stream
from runtime.events.model import NewEvent
from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.apps.mailpair import Responder, Triage
from tests.support.runtime import count_type, running, send, wait_for
from webhooks.events import Address, EmailReceived

EMAILS = [
    ("ada@example.com", "Invoice 1042 charged twice?", "My card was charged twice, refund one."),
    ("grace@example.com", "Login broken", "Since I reset my password the login shows an error."),
    ("promo@lucky.example", "You are our winner!", "Claim your prize: a crypto lottery offer."),
]


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[LLM]:
    async with model_client(settings) as mc:
        assert mc.offline
        yield LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))


@pytest.fixture
async def runs(
    redis: aioredis.Redis, log: EventLog, llm: LLM, settings: Settings
) -> list[uuid.UUID]:
    """Three demo runs (two replies drafted, one spam), projected with the app's agents."""
    ids = []
    for n, (sender, subject, text) in enumerate(EMAILS):
        body = EmailReceived(source="postmark", provider="raw", message_id=f"<b{n}@x>",
                             sender=Address(sender), subject=subject, text=text)  # fmt: skip
        ids.append(await send(redis, body))
    async with running([Triage(), Responder()], redis, log, llm=llm):
        await wait_for(lambda: _at_least(log, "reply.drafted", 2), seconds=60, what="replies")
        await wait_for(lambda: _at_least(log, "activation.completed", 6), what="6 completions")
    agents = [Triage(), Responder()]
    await Projector(log, builtin_projections(agents, settings), settings).catch_up()
    return ids


async def _at_least(log: EventLog, event_type: str, n: int) -> bool:
    return await count_type(log, event_type) >= n


async def test_runs_rows(log: EventLog, settings: Settings, runs: list[uuid.UUID]) -> None:
    rm = ReadModels(log.pool, settings)
    for run_id, (sender, _, _) in zip(runs, EMAILS, strict=True):
        row = await rm.run(run_id)
        steps = [e.body for e in await log.read_run(run_id) if isinstance(e.body, StepRecorded)]
        spam = sender.startswith("promo")
        assert row.status == "completed"
        assert row.agents == ["responder", "triage"]  # the responder completes on spam too
        assert (row.source, row.trigger_type) == ("postmark", "email.received")
        assert (row.llm_calls, row.tool_calls) == ((1, 0) if spam else (2, 1))
        assert row.activations == 2 and row.retries == 0 and row.parent_run_id is None
        assert row.input_tokens == sum(s.usage.input_tokens for s in steps if s.usage)
        assert row.output_tokens == sum(s.usage.output_tokens for s in steps if s.usage)
        assert sum(m.calls for m in row.usage.values()) == row.llm_calls
        assert row.finished_at is not None and row.duration_ms is not None
        assert row.duration_ms >= 0 and row.error is None

    # Newest first, one page at a time, every run once.
    seen, cursor = [], None
    while True:
        page = await rm.runs(limit=1, cursor=cursor)
        seen += [r.run_id for r in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(runs) and len(seen) == 3
    assert [r.run_id for r in (await rm.runs(source="postmark", agent="triage")).items] == seen
    assert (await rm.runs(status="failed")).items == []
    assert (await rm.runs(agent="nobody")).items == []
    future = datetime.now(UTC) + timedelta(days=1)
    assert (await rm.runs(since=future)).items == []
    with pytest.raises(InvalidQuery):
        await rm.runs(cursor="not a cursor")
    with pytest.raises(InvalidQuery):
        await rm.runs(status="sleeping")


async def test_timeline_puts_each_trigger_before_what_it_caused(
    log: EventLog, settings: Settings, runs: list[uuid.UUID]
) -> None:
    rm = ReadModels(log.pool, settings)
    for run_id in runs:
        in_log = await log.read_run(run_id)
        # The log has the triage's steps before its trigger ...
        first = next(i for i, e in enumerate(in_log) if e.event_id == run_id)
        assert any(isinstance(e.body, StepRecorded) for e in in_log[:first])
        timeline = await rm.timeline(run_id)
        # ... the timeline has the trigger first, and every entry after its parent.
        assert timeline[0].event_id == run_id and timeline[0].depth == 0
        assert sorted(t.position for t in timeline) == sorted(e.position for e in in_log)
        placed: dict[uuid.UUID, int] = {}
        for t in timeline:
            assert t.run_id == run_id
            if t.parent is not None:
                assert t.parent in placed and t.depth == placed[t.parent] + 1
            placed[t.event_id] = t.depth
        steps = [t for t in timeline if t.event_type == "step.recorded"]
        assert all(t.activation_id and t.step and t.kind and t.summary for t in steps)
        assert all(t.model and t.input_tokens for t in steps if t.kind == "llm")


async def test_audit_usage_and_isolation(
    log: EventLog, settings: Settings, runs: list[uuid.UUID]
) -> None:
    rm = ReadModels(log.pool, settings)
    a, b, spam = runs
    entries = (await rm.audit(run_id=a)).items
    assert {e.run_id for e in entries} == {a}
    actions = [e.action for e in entries]
    assert actions.count("llm.call") == 2 and actions.count("tool.call") == 1
    assert {"event.received", "event.emitted", "activation.completed"} <= set(actions)
    tool = next(e for e in entries if e.action == "tool.call")
    assert (tool.actor, tool.subject) == ("triage", "lookup_customer")
    # Filters: actor, type, text; and one run's filter never reaches another run.
    assert {e.actor for e in (await rm.audit(agent="responder")).items} == {"responder"}
    llm_calls = (await rm.audit(type="llm.call")).items
    assert len(llm_calls) == 5 and {e.run_id for e in llm_calls} == set(runs)
    found = (await rm.audit(text="lookup_customer")).items
    assert {e.run_id for e in found} == {a, b}
    assert (await rm.audit(run_id=spam, type="tool.call")).items == []
    assert (await rm.audit(run_id=uuid.uuid4())).items == []
    page = await rm.audit(limit=2)
    rest = await rm.audit(limit=100, cursor=page.next_cursor)
    assert {e.position for e in page.items}.isdisjoint(e.position for e in rest.items)
    assert len(page.items) + len(rest.items) == len((await rm.audit(limit=1000)).items)

    # Usage sums equal the steps' usage.
    steps = [e.body for e in await log.read_all(limit=10_000) if isinstance(e.body, StepRecorded)]
    usages = [s.usage for s in steps if s.usage is not None]
    (total,) = await rm.usage(group_by=())
    assert total.calls == len(usages) == 5
    assert total.input_tokens == sum(u.input_tokens for u in usages)
    assert total.output_tokens == sum(u.output_tokens for u in usages)
    assert total.cache_read_input_tokens == sum(u.cache_read_input_tokens for u in usages)
    by_agent = {r.agent: r.calls for r in await rm.usage(group_by=("agent",))}
    assert by_agent == {"triage": 3, "responder": 2}
    assert await rm.usage(agent="nobody") == []
    with pytest.raises(InvalidQuery):
        await rm.usage(group_by=("week",))

    # Nothing for one run leaks into another's answers.
    assert (await rm.dead_letters(run_id=a)).items == []
    assert await rm.agent_states(a) == []  # the demo's agents keep no state
    assert {t.run_id for t in await rm.timeline(b)} == {b}
    assert (await rm.events(a, limit=1000)).items[0].run_id == a
    assert {e.run_id for e in (await rm.events(a)).items} == {a}


async def test_unknown_and_unprojected_runs(
    log: EventLog, settings: Settings, runs: list[uuid.UUID]
) -> None:
    rm = ReadModels(log.pool, settings)
    with pytest.raises(UnknownRun, match="no such run"):
        await rm.run(uuid.uuid4())
    late = uuid.uuid4()
    body = EmailReceived(source="postmark", provider="raw", message_id="<late@x>",
                         sender=Address("late@example.com"))  # fmt: skip
    await log.append(run_stream(late), [NewEvent(body=body, event_id=late, run_id=late)])
    with pytest.raises(UnknownRun, match="not projected yet"):
        await rm.run(late)
    with pytest.raises(UnknownRun, match="not projected yet"):
        await rm.timeline(late)
    page = await rm.events(late)
    assert [e.event_id for e in page.items] == [late] and page.next_cursor is None
    assert page.items[0].body["source"] == "postmark"
