"""Agents in a running worker: LLM steps, budgets, durable timers, approvals, circuit breakers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.effects.breaker import State
from runtime.effects.budget import Budget
from runtime.effects.retry import RetryPolicy
from runtime.errors import AlreadyDecided, ApprovalNotFound, BudgetExceeded, CircuitOpen
from runtime.events.builtin import (
    ApprovalDecided,
    ApprovalRequested,
    CircuitTransitioned,
    RunBudgetExceeded,
    StepRecorded,
    TimerFired,
)
from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.log import approvals
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.streams.keys import DLQ_STREAM
from runtime.worker.worker import Worker
from tests.support import REPO
from tests.support.apps.orders import OrderAudited, OrderPlaced
from tests.support.runtime import (
    count_type,
    db_url,
    fast_options,
    inbox_rows,
    running,
    send,
    wait_for,
)
from tests.support.servers import Servers


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[LLM]:
    async with model_client(settings) as mc:
        assert mc.offline and mc.server is not None
        yield LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))


class Classifier(Agent):
    name = "classifier"
    subscribes = (OrderPlaced,)
    system = "Classify the order. Reply with one of: urgent, normal"

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        answer = await ctx.llm(f"Order {event.order_id} for {event.sku}, urgent please")
        ctx.emit(OrderAudited(order_id=event.order_id, seen_by=answer.text))


class Frugal(Classifier):
    name = "frugal"
    budget = Budget(tokens=5)


async def test_llm_steps_run_through_the_worker_with_usage(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    def tokens() -> float:
        labels = {"model": "claude-haiku-4-5", "kind": "input"}
        return REGISTRY.get_sample_value("agentrt_llm_tokens_total", labels) or 0.0

    before = tokens()
    await send(redis, OrderPlaced(order_id="u1", sku="SKU-1"))
    async with running([Classifier()], redis, log, relay=False, llm=llm):
        await wait_for(lambda: _has(log, "activation.completed"), what="completion")
    [step] = [e.body for e in await log.read_all() if isinstance(e.body, StepRecorded)]
    assert step.kind == "llm"
    assert step.usage is not None and step.usage.offline and step.usage.input_tokens > 0
    [audited] = [e.body for e in await log.read_all() if isinstance(e.body, OrderAudited)]
    assert audited.seen_by == "[offline] urgent"
    assert tokens() - before == step.usage.input_tokens


async def _has(log: EventLog, event_type: str, n: int = 1) -> bool:
    return await count_type(log, event_type) >= n


async def test_budget_exceeded_stops_the_run_without_calling(
    redis: aioredis.Redis, log: EventLog, llm: LLM, settings: Settings
) -> None:
    event_id = await send(redis, OrderPlaced(order_id="b1", sku="SKU-2"))
    async with running([Frugal()], redis, log, relay=False, llm=llm):
        await wait_for(lambda: _has(log, "run.budget_exceeded"), what="the budget event")
    run = await log.read_stream(f"run-{event_id}")
    assert [e.event_type for e in run] == [
        "orders.placed",
        "run.budget_exceeded",
        "activation.completed",
    ]
    stop = run[1].body
    assert isinstance(stop, RunBudgetExceeded)
    assert stop.budget_tokens == 5 and stop.requested_tokens > 5
    assert await count_type(log, "step.recorded") == 0
    assert await count_type(log, "orders.audited") == 0
    assert [r[2] for r in await inbox_rows(log)] == ["budget_exceeded"]


class Swallower(Frugal):
    """Catches everything around its model call and carries on with a fallback."""

    name = "swallower"

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        try:
            answer = (await ctx.llm(f"Order {event.order_id}")).text
        except Exception:  # what a handler should not do, and cannot do to a budget stop
            answer = "fallback"
        ctx.emit(OrderAudited(order_id=event.order_id, seen_by=answer))


async def test_a_budget_stop_cannot_be_swallowed_by_except_exception(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    event_id = await send(redis, OrderPlaced(order_id="b2", sku="SKU-2"))
    async with running([Swallower()], redis, log, relay=False, llm=llm):
        await wait_for(lambda: _has(log, "run.budget_exceeded"), what="the budget event")
    types = [e.event_type for e in await log.read_stream(f"run-{event_id}")]
    assert types == ["orders.placed", "run.budget_exceeded", "activation.completed"]
    assert await count_type(log, "orders.audited") == 0  # the fallback never ran
    assert [r[2] for r in await inbox_rows(log)] == ["budget_exceeded"]


def test_budget_exceeded_is_not_an_exception() -> None:
    """The property the test above relies on, stated directly."""
    assert not issubclass(BudgetExceeded, Exception)
    assert issubclass(BudgetExceeded, BaseException)


class Reminder(Agent):
    """Sets a durable timer, and acts when it fires."""

    name = "reminder"
    subscribes = (OrderPlaced, TimerFired)

    async def handle(self, event: OrderPlaced | TimerFired, ctx: Context) -> None:
        if isinstance(event, OrderPlaced):
            due = datetime.now(UTC) + timedelta(seconds=0.3)
            ctx.sleep_until(due, "follow_up", payload={"order": event.order_id})
        else:
            ctx.emit(OrderAudited(order_id=event.payload["order"], seen_by=f"timer {event.name}"))


async def test_durable_timer_fires_once_to_the_agent_that_set_it(
    redis: aioredis.Redis, log: EventLog
) -> None:
    event_id = await send(redis, OrderPlaced(order_id="t1", sku="SKU-3"))
    started = datetime.now(UTC)
    async with running([Reminder(), _fulfilment()], redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the timer's follow-up")
        # The fulfilment of the same order runs beside it (retried if it was slow).
        await wait_for(lambda: _handled_by(log, "fulfilment"), what="the fulfilment")
    types = [e.event_type for e in await log.read_stream(f"run-{event_id}")]
    assert types.count("timer.scheduled") == 1
    assert types.count("timer.fired") == 1
    [audited] = [e for e in await log.read_all() if isinstance(e.body, OrderAudited)]
    assert audited.body.seen_by == "timer follow_up"
    assert audited.recorded_at >= started + timedelta(seconds=0.3)
    # Fulfilment also handles orders.placed, but the timer was only for the reminder.
    consumers = [r[0] for r in await inbox_rows(log)]
    assert consumers.count("fulfilment") == 1 and consumers.count("reminder") == 2


async def _handled_by(log: EventLog, agent: str) -> bool:
    return any(r[0] == agent for r in await inbox_rows(log))


class Approver(Agent):
    name = "approver"
    subscribes = (OrderPlaced, ApprovalDecided)

    async def handle(self, event: OrderPlaced | ApprovalDecided, ctx: Context) -> None:
        if isinstance(event, OrderPlaced):
            ctx.request_approval(f"ship {event.quantity} x {event.sku}?", {"order": event.order_id})
            return
        requested = [e.body for e in ctx.history if isinstance(e.body, ApprovalRequested)]
        order = requested[0].details["order"] if requested else "?"
        verdict = "approved" if event.approved else "denied"
        ctx.emit(OrderAudited(order_id=order, seen_by=f"{verdict} by {event.by}"))

    def evolve(self, state: object, event: object) -> object:
        return state


async def test_a_run_waits_for_approval_then_goes_on(redis: aioredis.Redis, log: EventLog) -> None:
    event_id = await send(redis, OrderPlaced(order_id="a1", sku="SKU-4", quantity=3))
    async with running([Approver()], redis, log):
        await wait_for(lambda: _has(log, "approval.requested"), what="the request")
        [(approval_id, run_id, request)] = await approvals.pending_approvals(log)
        assert run_id == event_id and request.subject == "ship 3 x SKU-4?"
        await approvals.decide(log, approval_id, approved=True, by="ada")
        with pytest.raises(AlreadyDecided, match="already approved by ada"):
            await approvals.decide(log, approval_id, approved=False, by="bob")
        await wait_for(lambda: _has(log, "orders.audited"), what="the run going on")
    [audited] = [e.body for e in await log.read_all() if isinstance(e.body, OrderAudited)]
    assert audited.seen_by == "approved by ada"
    assert await approvals.pending_approvals(log) == []
    with pytest.raises(ApprovalNotFound):
        await approvals.decide(log, uuid.uuid4(), approved=True)


async def test_breaker_opened_by_one_worker_process_fails_fast_in_another(
    redis: aioredis.Redis,
    log: EventLog,
    settings: Settings,
    servers: Servers,
    tmp_path: Path,
) -> None:
    calls = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "REDIS_URL": db_url(servers.redis_url),
        "DATABASE_URL": servers.database_url,
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "AGENTRT_BREAKER_FAILURES": "2",
        "AGENTRT_BREAKER_RESET": "60",
        "AGENTRT_LOG_LEVEL": "warning",
        "ORDERS_CALLS": str(calls),
        "ORDERS_TOOL_FAIL": "1",
        "PYTHONPATH": str(REPO),
    }
    for i in range(2):
        await send(redis, OrderPlaced(order_id=f"f{i}", sku="SKU-5"))
    command = [sys.executable, "-m", "runtime", "worker",
               "--app", "tests.support.apps.orders:Fulfilment",
               "--partitions", "2", "--max-deliveries", "1", "--no-relay"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, cwd=REPO, stderr=subprocess.PIPE)
    try:
        await wait_for(lambda: _xlen(redis, DLQ_STREAM, 2), seconds=60, what="2 dead letters")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert len(calls.read_text().splitlines()) == 2, stderr.decode()[-2000:]
    # The other process's failures opened the breaker; the transition is in the log.
    [transition] = [e.body for e in await log.read_all() if isinstance(e.body, CircuitTransitioned)]
    assert (transition.name, transition.from_state, transition.to_state) == (
        "reserve_stock",
        "closed",
        "open",
    )
    # This process shares it: its activation fails fast, without calling the tool.
    worker = Worker([_fulfilment()], redis=redis, log=log, options=fast_options(max_deliveries=1),
                    breaker_threshold=2, breaker_reset=60)  # fmt: skip
    assert (await worker.breaker("reserve_stock").state()).state is State.OPEN
    await send(redis, OrderPlaced(order_id="f2", sku="SKU-5"))
    async with running([_fulfilment()], redis, log, relay=False,
                       options=fast_options(max_deliveries=1)):  # fmt: skip
        await wait_for(lambda: _xlen(redis, DLQ_STREAM, 3), what="a third dead letter")
    assert len(calls.read_text().splitlines()) == 2  # not called again
    last = (await redis.xrevrange(DLQ_STREAM, count=1))[0][1]
    assert last[b"dlq_error_type"] == CircuitOpen.__name__.encode()


def _fulfilment() -> Agent:
    from tests.support.apps.orders import Fulfilment

    return Fulfilment()


async def _xlen(redis: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await redis.xlen(stream)) >= n


async def test_worker_metrics_count_outcomes(redis: aioredis.Redis, log: EventLog) -> None:
    def completed() -> float:
        value = REGISTRY.get_sample_value(
            "agentrt_activations_total", {"agent": "fulfilment", "outcome": "completed"}
        )
        return value or 0.0

    before = completed()
    for i in range(3):
        await send(redis, OrderPlaced(order_id=f"m{i}", sku="SKU-6"))
    async with running([_fulfilment()], redis, log, relay=False):
        await wait_for(lambda: _has(log, "activation.completed", 3), what="3 completions")
    assert completed() - before == 3
    count = REGISTRY.get_sample_value("agentrt_activation_seconds_count", {"agent": "fulfilment"})
    assert count is not None and count >= 3
    await asyncio.sleep(0)
