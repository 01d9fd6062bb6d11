"""Human approval with a deadline: the default applies at it (approve, deny, escalate) through a
durable timer, one decision per approval whoever makes it, and no work before the pause redone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from runtime import Agent, ApprovalDecided, ApprovalEscalated, ApprovalRequested, Context
from runtime.agents.context import Trigger
from runtime.effects.tools import ToolContext, tool
from runtime.errors import AlreadyDecided
from runtime.events.builtin import StepRecorded
from runtime.events.model import NewEvent
from runtime.log import approvals
from runtime.log.store import EventLog
from runtime.worker.relay import TIMERS_KEY
from tests.support.apps.orders import OrderAudited, OrderPlaced
from tests.support.runtime import count_type, inbox_rows, running, send, wait_for

#: Calls of the quote tool, by order id (the work done before the pause).
QUOTES: list[str] = []


@tool
async def quote(ctx: ToolContext, order_id: str, sku: str) -> str:
    """Price an order (counts its calls)."""
    QUOTES.append(order_id)
    return f"{sku}: 42 EUR"


class Gatekeeper(Agent):
    """Prices an order (a step), asks for approval with a deadline, then acts on the answer."""

    name = "gatekeeper"
    subscribes = (OrderPlaced, ApprovalDecided)
    tools = (quote,)
    wait: ClassVar[float] = 1.0
    default: ClassVar[Any] = "deny"
    escalate_to: ClassVar[str | None] = None

    async def handle(self, event: OrderPlaced | ApprovalDecided, ctx: Context) -> None:
        if isinstance(event, OrderPlaced):
            price = await ctx.tool(quote, order_id=event.order_id, sku=event.sku)
            deadline = await ctx.now() + timedelta(seconds=self.wait)
            ctx.request_approval(f"ship {event.sku}?", {"order": event.order_id, "price": price},
                                 deadline=deadline, default=self.default,
                                 escalate_to=self.escalate_to)  # fmt: skip
            return
        # The price comes from the run's history: the step that got it is not run again.
        [asked] = [e.body for e in ctx.history if isinstance(e.body, ApprovalRequested)]
        verdict = "approved" if event.approved else "denied"
        seen = f"{verdict} by {event.by} at {asked.details['price']}"
        ctx.emit(OrderAudited(order_id=asked.details["order"], seen_by=seen))

    def evolve(self, state: object, event: object) -> object:
        return state  # a fold (of nothing) makes the worker read the run's history


class Lenient(Gatekeeper):
    name = "lenient"
    default = "approve"


class Patient(Gatekeeper):
    name = "patient"
    wait = 4.0
    default = "approve"


class Escalating(Gatekeeper):
    name = "escalating"
    default = "escalate"
    escalate_to = "manager"


class Manager(Agent):
    name = "manager"
    subscribes = (ApprovalEscalated,)

    async def handle(self, event: ApprovalEscalated, ctx: Context) -> None:
        seen = f"escalated: {event.subject}"
        ctx.emit(OrderAudited(order_id=event.details["order"], seen_by=seen))


class DecidingManager(Agent):
    """The escalation's target decides itself (a durable step), and tells what it got."""

    name = "manager"
    subscribes = (ApprovalEscalated,)

    async def handle(self, event: ApprovalEscalated, ctx: Context) -> None:
        mine = await ctx.decide_approval(event.approval_id, approved=False, comment="too late")
        again = await ctx.decide_approval(event.approval_id, approved=True)
        ctx.emit(OrderAudited(order_id=event.details["order"], seen_by=f"manager {mine} {again}"))


@pytest.fixture(autouse=True)
def _quotes() -> None:
    QUOTES.clear()


async def _has(log: EventLog, event_type: str, n: int = 1) -> bool:
    return await count_type(log, event_type) >= n


async def _audits(log: EventLog) -> list[str]:
    return [e.body.seen_by for e in await log.read_all() if isinstance(e.body, OrderAudited)]


async def _decisions(log: EventLog) -> list[ApprovalDecided]:
    return [e.body for e in await log.read_all() if isinstance(e.body, ApprovalDecided)]


async def test_deny_at_the_deadline_then_a_late_human_is_refused(
    redis: aioredis.Redis, log: EventLog
) -> None:
    await send(redis, OrderPlaced(order_id="d1", sku="SKU-1"))
    async with running([Gatekeeper()], redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the run going on")
    [decision] = await _decisions(log)
    assert (decision.approved, decision.by) == (False, "deadline")
    assert "no decision by" in decision.comment
    assert await _audits(log) == ["denied by deadline at SKU-1: 42 EUR"]
    with pytest.raises(AlreadyDecided, match="already denied by deadline"):
        await approvals.decide(log, decision.approval_id, approved=True, by="ada")
    assert len(await _decisions(log)) == 1
    # The price was asked once: the activation that resumed did not redo it.
    assert QUOTES == ["d1"]
    steps = [e.body for e in await log.read_all() if isinstance(e.body, StepRecorded)]
    assert [(s.kind, s.name) for s in steps] == [("tool", "quote"), ("clock", "now")]


async def test_approve_at_the_deadline(redis: aioredis.Redis, log: EventLog) -> None:
    await send(redis, OrderPlaced(order_id="d2", sku="SKU-2"))
    async with running([Lenient()], redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the run going on")
    assert await _audits(log) == ["approved by deadline at SKU-2: 42 EUR"]
    assert QUOTES == ["d2"]


async def test_a_human_before_the_deadline_wins_and_the_deadline_changes_nothing(
    redis: aioredis.Redis, log: EventLog
) -> None:
    await send(redis, OrderPlaced(order_id="d3", sku="SKU-3"))
    async with running([Patient()], redis, log):
        await wait_for(lambda: _has(log, "approval.requested"), what="the request")
        [(approval_id, _, asked)] = await approvals.pending_approvals(log)
        assert asked.default == "approve" and asked.deadline is not None
        await approvals.decide(log, approval_id, approved=False, by="ada", comment="no stock")
        await wait_for(lambda: _has(log, "orders.audited"), what="the run going on")
        # The deadline passes (its timer is handled and gone): nothing changes.
        await wait_for(lambda: _no_timers(redis), seconds=30, what="the deadline's timer")
    [decision] = await _decisions(log)
    assert (decision.approved, decision.by, decision.comment) == (False, "ada", "no stock")
    assert await _audits(log) == ["denied by ada at SKU-3: 42 EUR"]
    assert await approvals.pending_approvals(log) == []


async def _no_timers(redis: aioredis.Redis) -> bool:
    return int(await redis.zcard(TIMERS_KEY)) == 0


async def test_escalate_at_the_deadline_goes_to_the_named_agent_and_stays_open(
    redis: aioredis.Redis, log: EventLog
) -> None:
    await send(redis, OrderPlaced(order_id="d4", sku="SKU-4"))
    async with running([Escalating(), Manager()], redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the manager's answer")
        assert await _audits(log) == ["escalated: ship SKU-4?"]
        # Still open: someone decides after the escalation, and the run goes on.
        [(approval_id, _, _)] = await approvals.pending_approvals(log)
        await approvals.decide(log, approval_id, approved=True, by="boss")
        await wait_for(lambda: _has(log, "orders.audited", 2), what="the run going on")
    assert (await _audits(log))[1] == "approved by boss at SKU-4: 42 EUR"
    assert await count_type(log, "approval.escalated") == 1
    assert [r[0] for r in await inbox_rows(log)].count("manager") == 1


async def test_the_escalation_s_target_agent_decides_once(
    redis: aioredis.Redis, log: EventLog
) -> None:
    await send(redis, OrderPlaced(order_id="d6", sku="SKU-6"))
    async with running([Escalating(), DecidingManager()], redis, log):
        await wait_for(lambda: _has(log, "orders.audited", 2), what="the run going on")
    assert sorted(await _audits(log)) == [
        "denied by agent:manager at SKU-6: 42 EUR",
        "manager True False",  # its own second answer was refused
    ]
    [decision] = await _decisions(log)
    assert (decision.approved, decision.by) == (False, "agent:manager")
    assert decision.comment == "too late"
    with pytest.raises(AlreadyDecided, match="already denied by agent:manager"):
        await approvals.decide(log, decision.approval_id, approved=True, by="ada")
    steps = [e.body for e in await log.read_all() if isinstance(e.body, StepRecorded)]
    assert [s.kind for s in steps if s.agent == "manager"] == ["approval", "approval"]


async def test_broken_variant_a_decision_with_its_own_event_id_is_not_single(
    redis: aioredis.Redis, log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the first test guards: with a fresh event id per decision (not the one derived
    from the approval), the human after the deadline is not refused: two decisions."""
    await send(redis, OrderPlaced(order_id="d5", sku="SKU-5"))
    async with running([Gatekeeper()], redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the run going on")
    [decision] = await _decisions(log)
    monkeypatch.setattr(approvals, "decision_id", lambda _: uuid.uuid4())
    await approvals.decide(log, decision.approval_id, approved=True, by="ada")  # not refused
    assert len(await _decisions(log)) == 2


def _context() -> Context:
    trigger = Trigger(event_id=uuid.uuid4(), type="orders.placed", run_id=uuid.uuid4(),
                      causation_id=None, producer=None, body=OrderPlaced(order_id="x", sku="y"),
                      stream="s", entry_id="0-1")  # fmt: skip
    return Context(agent=Gatekeeper(), trigger=trigger, activation_id=uuid.uuid4(),
                   steps=None, services=None, history=[])  # type: ignore[arg-type]  # fmt: skip


def test_request_approval_refuses_an_incomplete_deadline() -> None:
    ctx = _context()
    soon = datetime.now(UTC) + timedelta(minutes=5)
    with pytest.raises(ValueError, match="both deadline and default"):
        ctx.request_approval("?", deadline=soon)
    with pytest.raises(ValueError, match="both deadline and default"):
        ctx.request_approval("?", default="deny")
    with pytest.raises(ValueError, match="approve, deny or escalate"):
        ctx.request_approval("?", deadline=soon, default="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="escalate_to"):
        ctx.request_approval("?", deadline=soon, default="escalate")
    with pytest.raises(ValueError, match="timezone-aware"):
        ctx.request_approval("?", deadline=datetime.now() + timedelta(1), default="deny")
    assert ctx.emitted == []
    ctx.request_approval("?", deadline=soon, default="deny")
    assert [type(e.body).__name__ for e in ctx.emitted] == ["ApprovalRequested", "TimerScheduled"]


def test_describe_shows_what_is_asked() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    asked = ApprovalRequested(approval_id=uuid.UUID(int=1), agent="gatekeeper",
                              subject="ship SKU-1?", details={"order": "d1"},
                              deadline=now + timedelta(seconds=90), default="escalate",
                              escalate_to="manager")  # fmt: skip
    run_id = uuid.UUID(int=2)
    text = "\n".join(approvals.describe(uuid.UUID(int=1), run_id, asked, now=now))
    for part in ("ship SKU-1?", '{"order":"d1"}', str(run_id), "gatekeeper",
                 "2026-01-01T00:01:30+00:00 (in 90 s)", "escalate to manager"):  # fmt: skip
        assert part in text, (part, text)


async def _asked(log: EventLog, **deadline: Any) -> uuid.UUID:
    run_id, approval_id = uuid.uuid4(), uuid.uuid4()
    body = ApprovalRequested(approval_id=approval_id, agent="gatekeeper", subject="?",
                             deadline=datetime.now(UTC), **deadline)  # fmt: skip
    await log.append(f"run-{run_id}", [NewEvent(body=body, run_id=run_id)])
    return approval_id


async def test_a_deadline_applied_twice_decides_or_escalates_once(log: EventLog) -> None:
    """The relay may fire a timer twice (a crash between its append and its ZREM)."""
    approved = await _asked(log, default="approve")
    assert await approvals.apply_deadline(log, approved, fired_by=uuid.uuid4()) == "approved"
    again = await approvals.apply_deadline(log, approved, fired_by=uuid.uuid4())
    assert again == "already_decided"
    escalated = await _asked(log, default="escalate", escalate_to="manager")
    for _ in range(2):
        await approvals.apply_deadline(log, escalated, fired_by=uuid.uuid4())
    assert await count_type(log, "approval.decided") == 1
    assert await count_type(log, "approval.escalated") == 1
    # Decided meanwhile: the escalation does not happen.
    decided = await _asked(log, default="escalate", escalate_to="manager")
    await approvals.decide(log, decided, approved=True, by="ada")
    assert await approvals.apply_deadline(log, decided, fired_by=uuid.uuid4()) == (
        "already_decided"
    )
    assert await count_type(log, "approval.escalated") == 1
