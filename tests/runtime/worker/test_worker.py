"""Workers against real Redis and Postgres: activations, inbox, relay, retries, dead letters."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.errors import DeadLetterNotFound
from runtime.events.builtin import StepRecorded
from runtime.log.store import EventLog
from runtime.streams.keys import DLQ_STREAM, agent_stream, ingress_stream
from runtime.worker import dead_letters as dlq
from runtime.worker.groups import trim_acknowledged
from runtime.worker.worker import Worker
from tests.support.apps.orders import Auditor, Fulfilment, OrderPlaced, reserve_stock
from tests.support.runtime import (
    count_type,
    fast_options,
    inbox_rows,
    running,
    send,
    wait_for,
)


async def pending(redis: aioredis.Redis, stream: str, group: str) -> int:
    summary = await redis.xpending(stream, group)
    return int(summary["pending"])


async def test_events_flow_through_agents_and_relay(redis: aioredis.Redis, log: EventLog) -> None:
    ids = [await send(redis, OrderPlaced(order_id=f"o{i}", sku="SKU-1", quantity=i + 1),
                      partition=i % 2) for i in range(6)]  # fmt: skip
    async with running([Fulfilment(), Auditor()], redis, log):
        await wait_for(lambda: _count(log, "orders.audited", 6), what="6 audited orders")
    # Each run holds its trigger, the fulfilment's and the auditor's output, once.
    for event_id in ids:
        run = await log.read_stream(f"run-{event_id}")
        types = [e.event_type for e in run]
        assert types.count("orders.placed") == 1
        assert types.count("orders.stock_reserved") == 1
        assert types.count("orders.audited") == 1
        assert types.count("activation.completed") == 2
        assert run[0].event_id == event_id  # the trigger keeps its ingress id
        assert all(e.run_id == event_id for e in run)
    rows = await inbox_rows(log)
    assert sorted((c, o) for c, _, o in rows) == sorted(
        [("fulfilment", "completed")] * 6 + [("auditor", "completed")] * 6
    )
    # The auditor's state folded the run's earlier events.
    audited = [e.body for e in await log.read_all() if e.event_type == "orders.audited"]
    assert all(getattr(b, "seen_by", "") != "0 earlier" for b in audited)
    for p in range(2):
        assert await pending(redis, ingress_stream(p), "fulfilment") == 0
    assert await pending(redis, agent_stream("auditor"), "auditor") == 0


async def _count(log: EventLog, event_type: str, n: int) -> bool:
    return await count_type(log, event_type) >= n


async def test_redelivered_event_is_acked_and_skipped(redis: aioredis.Redis, log: EventLog) -> None:
    event_id = uuid.uuid4()
    body = OrderPlaced(order_id="dup", sku="SKU-2")
    for _ in range(3):  # the same event, three entries (a duplicate publish)
        await send(redis, body, event_id=event_id)
    async with running([Fulfilment()], redis, log, relay=False):
        await wait_for(lambda: _no_pending(redis, ingress_stream(0), "fulfilment"), what="acks")
        await wait_for(lambda: _count(log, "activation.completed", 1), what="completion")
    assert await count_type(log, "orders.stock_reserved") == 1
    assert await count_type(log, "orders.placed") == 1
    assert await count_type(log, "step.recorded") == 1
    assert len(await inbox_rows(log)) == 1


async def _no_pending(redis: aioredis.Redis, stream: str, group: str) -> bool:
    info = await redis.xinfo_groups(stream)
    mine = [g for g in info if g["name"] in (group, group.encode())]
    if not mine:
        return False
    length = await redis.xlen(stream)
    last = mine[0]["last-delivered-id"]
    entries = await redis.xrange(stream, "-", "+")
    delivered_all = length == 0 or entries[-1][0] == last
    return delivered_all and int(mine[0]["pending"]) == 0


class FlakyAfterStep(Agent):
    """Fails after its tool step on the first ``fail_times`` attempts."""

    name = "flaky"
    subscribes = (OrderPlaced,)
    tools = (reserve_stock,)
    fail_times = 1

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.tool_results: list[str] = []

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        n = self.attempts[event.order_id] = self.attempts.get(event.order_id, 0) + 1
        reservation = await ctx.tool(reserve_stock, sku=event.sku, quantity=event.quantity)
        self.tool_results.append(reservation)
        if n <= self.fail_times and event.order_id != "good":
            raise RuntimeError("crash after the step")
        ctx.emit(OrderPlaced(order_id=f"{event.order_id}-done", sku=event.sku))


async def test_retried_activation_reuses_recorded_steps(
    redis: aioredis.Redis, log: EventLog, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("ORDERS_CALLS", str(calls))
    agent = FlakyAfterStep()
    await send(redis, OrderPlaced(order_id="r1", sku="SKU-3"))
    async with running([agent], redis, log, relay=False):
        await wait_for(lambda: _count(log, "activation.completed", 1), what="completion")
    assert agent.attempts == {"r1": 2}
    # The tool ran once; the retry got the recorded result back, identical.
    assert len(calls.read_text().splitlines()) == 1
    assert agent.tool_results[0] == agent.tool_results[1]
    assert await count_type(log, "step.recorded") == 1


class Diverging(Agent):
    """Asks for a different tool input on its retry: a handler that is not deterministic."""

    name = "diverging"
    subscribes = (OrderPlaced,)
    tools = (reserve_stock,)

    def __init__(self) -> None:
        self.attempts = 0

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        self.attempts += 1
        await ctx.tool(reserve_stock, sku=event.sku, quantity=self.attempts)
        raise RuntimeError("fail so the activation is retried")


async def test_changed_handler_raises_divergence_and_is_dead_lettered(
    redis: aioredis.Redis, log: EventLog
) -> None:
    await send(redis, OrderPlaced(order_id="d1", sku="SKU-4"))
    async with running([Diverging()], redis, log, relay=False,
                       options=fast_options(max_deliveries=2)):  # fmt: skip
        await wait_for(lambda: _xlen(redis, DLQ_STREAM, 1), what="a dead letter")
    [letter] = await dlq.list_dead_letters(redis)
    assert letter.error_type == "StepDivergence"
    assert "diverged at step 1" in letter.error
    dead = [e.body for e in await log.read_all() if e.event_type == "activation.dead_lettered"]
    assert len(dead) == 1
    assert getattr(dead[0], "error_code", None) == "step_divergence"


async def _xlen(redis: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await redis.xlen(stream)) >= n


async def test_dead_letter_after_max_deliveries_then_redrive(
    redis: aioredis.Redis, log: EventLog
) -> None:
    agent = FlakyAfterStep()
    agent.fail_times = 3  # fails on deliveries 1..3; max_deliveries is 3
    bad = await send(redis, OrderPlaced(order_id="bad", sku="SKU-5"))
    good = await send(redis, OrderPlaced(order_id="good", sku="SKU-6"))
    async with running([agent], redis, log, relay=False):
        await wait_for(lambda: _xlen(redis, DLQ_STREAM, 1), what="a dead letter")
        # The group moved on: the other event was handled, nothing is pending.
        await wait_for(lambda: _no_pending(redis, ingress_stream(0), "flaky"), what="acks")
    rows = await inbox_rows(log)
    assert {r[1] for r in rows} == {good}
    [letter] = await dlq.list_dead_letters(redis)
    assert letter.event_id == str(bad)
    assert letter.deliveries == 3
    assert letter.agent == "flaky"
    assert "crash after the step" in letter.error
    shown = await dlq.get_dead_letter(redis, letter.id)
    assert shown.fields["type"] == "orders.placed"
    events = await log.read_stream(f"run-{bad}")
    assert [e.event_type for e in events] == ["activation.dead_lettered"]

    # Redrive: a fresh activation (its own steps) that now succeeds.
    plan = await dlq.redrive(redis, log, letter.id)
    assert not plan.forced and plan.generation == 1
    assert await redis.xlen(DLQ_STREAM) == 0
    assert (await redis.xrange(agent_stream("flaky")))[0][0].decode() == plan.entry_id
    async with running([agent], redis, log, relay=False):
        await wait_for(lambda: _inbox_has(log, bad), what="the redriven event handled")
    types = [e.event_type for e in await log.read_stream(f"run-{bad}")]
    assert "dead_letter.redriven" in types
    assert types.count("activation.completed") == 1
    with pytest.raises(DeadLetterNotFound):
        await dlq.get_dead_letter(redis, letter.id)


async def _inbox_has(log: EventLog, event_id: uuid.UUID) -> bool:
    return any(r[1] == event_id for r in await inbox_rows(log))


async def test_poison_entry_is_dead_lettered_at_once(redis: aioredis.Redis, log: EventLog) -> None:
    await redis.xadd(ingress_stream(0), {"type": "orders.placed", "body": b"{}"})  # no event_id
    await redis.xadd(
        ingress_stream(0),
        {"event_id": str(uuid.uuid4()), "type": "orders.placed", "body": b'{"nope": 1}'},
    )
    good = await send(redis, OrderPlaced(order_id="fine", sku="SKU-7"))
    async with running([Fulfilment()], redis, log, relay=False):
        await wait_for(lambda: _inbox_has(log, good), what="the good event")
        await wait_for(lambda: _xlen(redis, DLQ_STREAM, 2), what="two dead letters")
    letters = await dlq.list_dead_letters(redis)
    assert sorted(x.error_type for x in letters) == ["InvalidDelivery", "InvalidDelivery"]
    assert any("'event_id' is missing" in x.error for x in letters)
    assert any("orders.placed" in x.error for x in letters)


async def test_reclaims_entries_of_a_dead_consumer_including_deleted_ones(
    redis: aioredis.Redis, log: EventLog
) -> None:
    agent = Fulfilment()
    worker = Worker([agent], redis=redis, log=log, options=fast_options(partitions=1))
    await worker.setup()
    ids = [await send(redis, OrderPlaced(order_id=f"c{i}", sku="S")) for i in range(5)]
    stream = ingress_stream(0)
    # A consumer reads everything and dies; one of its entries is deleted meanwhile.
    got = await redis.xreadgroup("fulfilment", "dead-one", {stream: ">"}, count=10)
    entry_ids = [e[0] for e in got[0][1]]
    await redis.xdel(stream, entry_ids[0])
    assert await pending(redis, stream, "fulfilment") == 5
    await asyncio.sleep(0.35)
    async with running([agent], redis, log, relay=False, options=fast_options(partitions=1)):
        await wait_for(lambda: _pending_is(redis, stream, "fulfilment", 0), what="reclaims")
        await wait_for(lambda: _count(log, "activation.completed", 4), what="4 completions")
    handled = {r[1] for r in await inbox_rows(log)}
    assert handled == set(ids[1:])  # the deleted one had nothing left to handle


async def _pending_is(redis: aioredis.Redis, stream: str, group: str, n: int) -> bool:
    return await pending(redis, stream, group) == n


async def test_trim_keeps_what_any_group_still_needs(redis: aioredis.Redis) -> None:
    stream = "agentrt:test:{trim}"
    ids = [await redis.xadd(stream, {"n": str(i)}) for i in range(10)]
    await redis.xgroup_create(stream, "fast", id="0")
    await redis.xgroup_create(stream, "slow", id="0")
    fast = await redis.xreadgroup("fast", "c", {stream: ">"}, count=10)
    await redis.xack(stream, "fast", *[e[0] for e in fast[0][1]])
    slow = await redis.xreadgroup("slow", "c", {stream: ">"}, count=6)
    slow_ids = [e[0] for e in slow[0][1]]
    await redis.xack(stream, "slow", *slow_ids[:3], *slow_ids[4:])  # entry 3 still pending
    assert await trim_acknowledged(redis, stream) == 3
    left = [e[0] for e in await redis.xrange(stream)]
    assert left == ids[3:]  # the pending one and everything "slow" has not read
    await redis.xack(stream, "slow", slow_ids[3])
    assert await trim_acknowledged(redis, stream) == 3  # up to slow's last delivered
    assert [e[0] for e in await redis.xrange(stream)] == ids[6:]


async def test_graceful_stop_acks_only_what_committed(
    redis: aioredis.Redis, log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERS_TOOL_DELAY", "0.05")
    ids = [await send(redis, OrderPlaced(order_id=f"g{i}", sku="S"), partition=i % 2)
           for i in range(40)]  # fmt: skip
    opts = fast_options(concurrency=6, claim_idle=30.0, drain_timeout=0.01)
    async with running([Fulfilment()], redis, log, relay=False, options=opts):
        await wait_for(lambda: _count(log, "activation.completed", 5), what="some progress")
    # Stopped mid-stream with a tiny drain: some activations were cut short.
    committed = {r[1] for r in await inbox_rows(log)}
    assert 5 <= len(committed) < 40
    for p in range(2):
        stream = ingress_stream(p)
        pend = await redis.xpending_range(stream, "fulfilment", "-", "+", 100)
        pending_ids = {row["message_id"] for row in pend}
        for entry_id, fields in await redis.xrange(stream):
            event_id = uuid.UUID(fields[b"event_id"].decode())
            delivered = entry_id <= (await _last_delivered(redis, stream, "fulfilment"))
            if delivered and entry_id not in pending_ids:
                assert event_id in committed, "acknowledged without a commit"
    # A fresh worker finishes the rest, exactly once each.
    async with running([Fulfilment()], redis, log, relay=False,
                       options=fast_options(claim_idle=0.2)):  # fmt: skip
        await wait_for(lambda: _count(log, "activation.completed", 40), what="all 40")
    rows = await inbox_rows(log)
    assert sorted(r[1] for r in rows) == sorted(ids)
    assert await count_type(log, "orders.stock_reserved") == 40


async def _last_delivered(redis: aioredis.Redis, stream: str, group: str) -> bytes:
    for g in await redis.xinfo_groups(stream):
        if g["name"] in (group, group.encode()):
            value = g["last-delivered-id"]
            return value if isinstance(value, bytes) else str(value).encode()
    raise AssertionError("no group")


async def test_log_lines_carry_correlation_fields(redis: aioredis.Redis, log: EventLog) -> None:
    event_id = await send(redis, OrderPlaced(order_id="t1", sku="SKU-8"))
    # The processors the runtime configures (runtime/logconfig.py) merge the contextvars.
    merge = [structlog.contextvars.merge_contextvars]
    with structlog.testing.capture_logs(processors=merge) as logs:
        async with running([Fulfilment()], redis, log, relay=False):
            await wait_for(lambda: _count(log, "activation.completed", 1), what="completion")
    mine = [x for x in logs if x.get("event") == "activation.completed"]
    assert mine, logs
    line = mine[0]
    assert line["run_id"] == str(event_id)
    assert line["event_id"] == str(event_id)
    assert line["agent"] == "fulfilment"
    assert "activation_id" in line and "causation_id" in line
    # Lines written inside a step carry its number too.
    assert any(x.get("step") == 1 and x.get("event_id") == str(event_id) for x in logs), logs
    steps = [e.body for e in await log.read_all() if isinstance(e.body, StepRecorded)]
    assert steps[0].name == "reserve_stock"


async def test_entries_held_by_a_busy_worker_are_not_stolen(
    redis: aioredis.Redis, log: EventLog, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow activations, a short claim_idle and two workers: leases keep each entry on one."""
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("ORDERS_CALLS", str(calls))
    monkeypatch.setenv("ORDERS_TOOL_DELAY", "0.15")
    for i in range(8):
        await send(redis, OrderPlaced(order_id=f"s{i}", sku="S"))
    opts = fast_options(concurrency=2, batch=16, partitions=1, claim_idle=0.3)
    async with (
        running([Fulfilment()], redis, log, relay=False, options=opts),
        running([Fulfilment()], redis, log, relay=False, options=opts),
    ):
        await wait_for(lambda: _count(log, "activation.completed", 8), what="8 completions")
    lines = calls.read_text().splitlines()
    assert len(lines) == 8, "a tool ran twice: an entry was reclaimed from a live worker"
    assert await count_type(log, "step.recorded") == 8


async def test_a_relay_that_lost_its_lease_publishes_nothing(
    redis: aioredis.Redis, log: EventLog
) -> None:
    from runtime.events.model import NewEvent
    from runtime.worker.relay import LeaseLost, Relay
    from tests.support.apps.orders import StockReserved

    run_id = uuid.uuid4()
    await log.append(f"run-{run_id}", [NewEvent(body=StockReserved(order_id="l1", reservation="r"),
                                                run_id=run_id, producer="fulfilment")])  # fmt: skip
    page = await log.read_all()
    relay = Relay(log, redis, [Auditor()])
    await redis.set(relay.lease_key, "someone-else")
    with pytest.raises(LeaseLost):
        await relay.publish(page)
    assert await redis.xlen(agent_stream("auditor")) == 0
    assert await redis.get(relay.checkpoint_key) is None
    # Holding the lease, the same page goes out, with the checkpoint, once.
    await redis.set(relay.lease_key, relay._token)
    assert await relay.publish(page) == 1
    assert await redis.xlen(agent_stream("auditor")) == 1
    assert (await relay.position()) == page[-1].log_position


async def test_workers_wake_the_relay_through_redis(redis: aioredis.Redis, log: EventLog) -> None:
    """With a poll interval far longer than the test, only the worker's wake-up can
    get the fulfilment's output to the auditor in time (appends do not NOTIFY)."""
    from runtime.worker.relay import Relay

    agents = [Fulfilment(), Auditor()]
    relay = Relay(log, redis, agents, poll_interval=30)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        async with running(agents, redis, log, relay=False):
            await asyncio.sleep(0.3)  # the relay has caught up and waits
            await send(redis, OrderPlaced(order_id="w1", sku="SKU-9"))
            await wait_for(lambda: _count(log, "orders.audited", 1), seconds=10,
                           what="the auditor, woken through Redis")  # fmt: skip
    finally:
        stop.set()
        await task
