"""Duplicate deliveries run no step twice (promises 2, 3): activation claims, redrives of
handled events, dead letters of committed events, rolling deploys, hung handlers.

Each guard has a broken variant kept beside it (the same scenario without the
guard), which must show the bug: so the test is known to catch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.effects.tools import ToolContext, tool
from runtime.errors import ClaimLost, RedriveRefused
from runtime.events.model import Event
from runtime.log.store import EventLog
from runtime.streams.keys import DLQ_STREAM, agent_stream, ingress_stream
from runtime.worker import dead_letters as dlq
from runtime.worker.claims import Claim, Claims
from runtime.worker.delivery import parse_delivery
from runtime.worker.options import WorkerOptions
from runtime.worker.worker import Worker
from tests.support.runtime import count_type, fast_options, inbox_rows, ingress_fields, wait_for

#: Real executions of the tools below: (tool, idempotency key), in call order.
CALLS: list[tuple[str, str]] = []


class Charge(Event, tag="dup.charge"):
    ref: str


class Refund(Event, tag="dup.refund"):
    ref: str


@tool
async def slow_charge(ctx: ToolContext, ref: str) -> str:
    """Charge a card (slowly: long enough for a second copy to arrive meanwhile)."""
    CALLS.append(("slow_charge", ctx.idempotency_key))
    await asyncio.sleep(0.5)
    return f"charged {ref}"


class Biller(Agent):
    name = "biller"
    subscribes = (Charge,)
    tools = (slow_charge,)
    #: While set, the handler fails after its step.
    fail: ClassVar[bool] = False

    async def handle(self, event: Charge, ctx: Context) -> None:
        await ctx.tool(slow_charge, ref=event.ref)
        if type(self).fail:
            raise RuntimeError("the ledger is down")


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    Biller.fail = False


@contextlib.asynccontextmanager
async def workers(
    agents_per_worker: Sequence[Sequence[Agent]],
    redis: aioredis.Redis,
    log: EventLog,
    options: WorkerOptions | None = None,
    *,
    claims: type[Claims] | None = None,
) -> AsyncIterator[list[Worker]]:
    """Several workers (consumers of the same groups) in this loop until the block ends."""
    opts = options or fast_options(claim_idle=2.0)
    ws = [Worker(list(agents), redis=redis, log=log, options=opts) for agents in agents_per_worker]
    if claims is not None:
        for w in ws:
            w.claims = claims(redis, ttl=opts.claim_idle)
    stop = asyncio.Event()
    for w in ws:
        await w.setup()
    tasks = [asyncio.create_task(w.run(stop)) for w in ws]
    try:
        yield ws
    finally:
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result


async def _twice(redis: aioredis.Redis, body: Event) -> uuid.UUID:
    """The same event, twice in the ingress stream (a relay republish, a redrive...)."""
    fields = ingress_fields(body)
    await redis.xadd(ingress_stream(0), fields)
    await redis.xadd(ingress_stream(0), fields)
    return uuid.UUID(fields["event_id"])


async def _handled(log: EventLog, n: int) -> bool:
    return len(await inbox_rows(log)) >= n


async def _settled(redis: aioredis.Redis, group: str, streams: Sequence[str]) -> bool:
    for stream in streams:
        if int((await redis.xpending(stream, group))["pending"]):
            return False
    return True


# -- two copies at once ------------------------------------------------------------


async def _run_two_copies(redis: aioredis.Redis, log: EventLog, claims: type[Claims] | None) -> int:
    await _twice(redis, Charge(ref="r1"))
    # batch=1: each read takes one copy, so the copies can go to either
    # worker, and both run at once (the tool takes 0.5 s).
    opts = fast_options(claim_idle=2.0, batch=1)
    async with workers([[Biller()], [Biller()]], redis, log, opts, claims=claims):
        await wait_for(lambda: _handled(log, 1), what="the charge handled")
        await wait_for(lambda: _settled(redis, "biller", [ingress_stream(0)]), what="both acked")
    assert len(await inbox_rows(log)) == 1
    assert await count_type(log, "activation.completed") == 1
    return len(CALLS)


async def test_two_copies_at_once_call_the_tool_once(redis: aioredis.Redis, log: EventLog) -> None:
    assert await _run_two_copies(redis, log, claims=None) == 1
    assert await count_type(log, "step.recorded") == 1


class _NoClaim(Claim):
    """The broken variant: every claim is granted at once (no exclusion)."""

    async def acquire(self) -> bool:
        self.valid_until = float("inf")
        return False


class NoClaims(Claims):
    def claim(self, agent: str, trigger_id: uuid.UUID) -> Claim:
        return _NoClaim(self, agent, trigger_id)


async def test_without_the_claim_both_copies_call_the_tool(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """The guard's broken variant: the scenario above does call the tool twice."""
    assert await _run_two_copies(redis, log, claims=NoClaims) == 2


async def test_claims_taken_at_once_share_a_round_trip_and_exclude(
    redis: aioredis.Redis,
) -> None:
    counting = _CountsPipelines(redis)
    claims = Claims(counting, ttl=5.0)  # type: ignore[arg-type]
    agent_claims = [claims.claim("a", uuid.uuid4()) for _ in range(20)]
    same = uuid.uuid4()
    rivals = [claims.claim("a", same) for _ in range(2)]
    got = await asyncio.gather(*(c._claims.take(c.key, c.token) for c in agent_claims + rivals))
    assert counting.pipelines == 1  # the 22 SETs in one round trip
    assert all(got[:20]) and sorted(got[20:]) == [False, True]


class _CountsPipelines:
    """The client, counting the pipelines (round trips) made through it."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis, self.pipelines = redis, 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.pipelines += 1
        return self._redis.pipeline(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


async def test_a_step_after_the_claim_was_lost_is_not_executed(redis: aioredis.Redis) -> None:
    claims = Claims(redis, ttl=0.5)
    claim = claims.claim("biller", uuid.uuid4())
    assert await claim.acquire() is False
    await claim.confirm()  # held, by the local clock: no round trip
    # The worker stalled past its lease; another took the activation over.
    await redis.set(claim.key, "someone-else")
    claim.valid_until = 0.01  # the local lease ran out
    with pytest.raises(ClaimLost):
        await claim.confirm()
    assert await redis.get(claim.key) == b"someone-else"  # not taken back
    assert not claim.held and claim.key not in claims.held


async def test_a_lapsed_claim_nobody_took_is_taken_again(redis: aioredis.Redis) -> None:
    claims = Claims(redis, ttl=0.5)
    claim = claims.claim("biller", uuid.uuid4())
    await claim.acquire()
    await redis.delete(claim.key)  # it expired: the renewals came too late (a busy loop)
    claim.valid_until = 0.01
    assert await claim.confirm() is True  # taken again: the caller checks the record
    assert await redis.get(claim.key) == claim.token.encode()
    assert await claim.confirm() is False  # and now simply held


class _Retaken:
    """A guard whose claim lapsed and was taken again before every step."""

    async def before_load(self) -> None:
        pass

    async def before_execute(self) -> bool:
        return True


async def test_a_retaken_claim_stops_if_another_worker_recorded_the_step(
    log: EventLog,
) -> None:
    from runtime.effects.steps import StepOutput, Steps

    ids: dict[str, Any] = {"activation_id": uuid.uuid4(), "run_id": uuid.uuid4(),
                           "agent": "biller", "trigger_id": uuid.uuid4()}  # fmt: skip
    calls: list[str] = []

    def call(who: str) -> Any:
        async def run() -> StepOutput:
            calls.append(who)
            return StepOutput(result=who)

        return run

    mine = Steps(log, guard=_Retaken(), lazy=True, **ids)
    await mine.ensure_loaded()  # nothing recorded yet
    other = Steps(log, **ids)  # ran on while this one's claim had lapsed
    await other.run("tool", "charge", {"ref": "r"}, call("other"))
    with pytest.raises(ClaimLost, match="step 1 was recorded by another worker"):
        await mine.run("tool", "charge", {"ref": "r"}, call("mine"))
    assert calls == ["other"]
    # The same guard on an untouched record goes on and calls.
    fresh = Steps(log, guard=_Retaken(), **{**ids, "activation_id": uuid.uuid4()})
    await fresh.run("tool", "charge", {"ref": "r"}, call("fresh"))
    assert calls == ["other", "fresh"]


async def test_a_second_copy_waits_for_the_claim_then_finds_the_step(
    redis: aioredis.Redis,
) -> None:
    claims = Claims(redis, ttl=5.0)
    trigger = uuid.uuid4()
    first, second = claims.claim("biller", trigger), claims.claim("biller", trigger)
    assert await first.acquire() is False
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(0.2)
    assert not waiting.done()  # held by the first
    first.release_later()
    async with redis.pipeline(transaction=False) as pipe:
        assert await claims.release_in(pipe) == 1
        await pipe.execute()
    assert await asyncio.wait_for(waiting, 5) is True  # it waited, then got it
    assert await redis.get(second.key) == second.token.encode()


# -- redrive of a handled event ----------------------------------------------------


async def test_redrive_of_a_handled_event_is_refused_and_force_keeps_the_keys(
    redis: aioredis.Redis, log: EventLog
) -> None:
    Biller.fail = True
    fields = ingress_fields(Charge(ref="r2"))
    event_id = uuid.UUID(fields["event_id"])
    await redis.xadd(ingress_stream(0), fields)
    opts = fast_options(claim_idle=2.0, max_deliveries=1)
    async with workers([[Biller()]], redis, log, opts):
        await wait_for(lambda: _dead_letters(redis, 1), what="a dead letter")
    [letter] = await dlq.list_dead_letters(redis)
    assert len(CALLS) == 1
    # A duplicate copy of the event commits it after all (the ledger is back):
    # its step comes from the log, so the tool is not called again.
    Biller.fail = False
    await redis.xadd(ingress_stream(0), fields)
    async with workers([[Biller()]], redis, log, opts):
        await wait_for(lambda: _handled(log, 1), what="the copy committed")
    assert len(CALLS) == 1

    with pytest.raises(RedriveRefused, match="has handled event") as refused:
        await dlq.redrive(redis, log, letter.id)
    assert "--force" in refused.value.message
    assert await redis.xlen(DLQ_STREAM) == 1  # still there, untouched

    plan = await dlq.redrive(redis, log, letter.id, force=True)
    assert plan.forced and plan.generation == 1
    async with workers([[Biller()]], redis, log, opts):
        await wait_for(lambda: _handled(log, 2), what="the forced redrive committed")
    # A second activation, with an inbox row of its own; its tool call carried
    # the original idempotency key, so an idempotent API answers as before.
    assert len(CALLS) == 2 and CALLS[0][1] == CALLS[1][1]
    assert sorted(r[1] == event_id for r in await inbox_rows(log)) == [False, True]
    assert await count_type(log, "activation.completed") == 2


async def _dead_letters(redis: aioredis.Redis, n: int) -> bool:
    return int(await redis.xlen(DLQ_STREAM)) >= n


async def test_an_unhandled_dead_letter_redrives_without_force(
    redis: aioredis.Redis, log: EventLog
) -> None:
    Biller.fail = True
    await redis.xadd(ingress_stream(0), ingress_fields(Charge(ref="r3")))
    opts = fast_options(claim_idle=2.0, max_deliveries=1)
    async with workers([[Biller()]], redis, log, opts):
        await wait_for(lambda: _dead_letters(redis, 1), what="a dead letter")
    [letter] = await dlq.list_dead_letters(redis)
    Biller.fail = False
    plan = await dlq.redrive(redis, log, letter.id)
    assert not plan.forced
    async with workers([[Biller()]], redis, log, opts):
        await wait_for(lambda: _handled(log, 1), what="the redrive committed")
    # The redrive is a new activation (its own steps), with the original's keys.
    assert len(CALLS) == 2 and CALLS[0][1] == CALLS[1][1]


async def test_dead_lettering_skips_an_event_that_committed(
    redis: aioredis.Redis, log: EventLog
) -> None:
    fields = ingress_fields(Charge(ref="r4"))
    await redis.xadd(ingress_stream(0), fields)
    async with workers([[Biller()]], redis, log):
        await wait_for(lambda: _handled(log, 1), what="the charge handled")
    # A stale copy, which another worker now decides to dead-letter.
    stream = ingress_stream(0)
    entry_id = (await redis.xadd(stream, fields)).decode()
    await redis.xreadgroup("biller", "stale", {stream: ">"})
    d = parse_delivery(stream, entry_id, fields)
    lettered = await dlq.dead_letter(
        log, redis, "biller", stream, entry_id, fields, d, RuntimeError("too many"), 9
    )
    assert lettered is False
    assert await redis.xlen(DLQ_STREAM) == 0
    assert await count_type(log, "activation.dead_lettered") == 0
    assert int((await redis.xpending(stream, "biller"))["pending"]) == 0  # acknowledged


# -- rolling deploys -----------------------------------------------------------------


class BillerV1(Biller):
    """The old version: charges only."""

    subscribes = (Charge,)


class BillerV2(Biller):
    """The new version: also refunds."""

    subscribes = (Charge, Refund)

    async def handle(self, event: Any, ctx: Context) -> None:
        if isinstance(event, Refund):
            ctx.emit(Charge(ref=f"refunded {event.ref}"))
            return
        await super().handle(event, ctx)


class NoHandOff(Worker):
    """The broken variant: entries this version does not handle are acknowledged away."""

    async def _hand_off(self, *args: Any) -> bool:
        return False


async def _deploy(redis: aioredis.Redis, log: EventLog, old: type[Worker]) -> int:
    refunds = [ingress_fields(Refund(ref=f"x{i}")) for i in range(10)]
    for f in refunds:
        await redis.xadd(ingress_stream(0), f)
    opts = fast_options(claim_idle=2.0)
    new = Worker([BillerV2()], redis=redis, log=log, options=opts)
    await new.setup()  # the new version announced itself: its worker is starting
    stop_old, stop_new = asyncio.Event(), asyncio.Event()
    # The old worker reads every refund first (the new one is not reading yet).
    old_worker = old([BillerV1()], redis=redis, log=log, options=opts)
    old_task = asyncio.create_task(old_worker.run(stop_old))
    streams = [ingress_stream(0), ingress_stream(1), agent_stream("biller")]
    try:
        await wait_for(lambda: _read_all(redis, "biller"), what="the old worker read them")
        new_task = asyncio.create_task(new.run(stop_new))
        try:
            await wait_for(
                lambda: _settled(redis, "biller", streams), seconds=30, what="nothing pending"
            )
            await asyncio.sleep(0.3)
        finally:
            stop_new.set()
            await new_task
    finally:
        stop_old.set()
        await old_task
    return sum(1 for r in await inbox_rows(log) if r[0] == "biller")


async def _read_all(redis: aioredis.Redis, group: str) -> bool:
    for info in await redis.xinfo_groups(ingress_stream(0)):
        if info["name"] == group.encode():
            lag = info.get("lag")
            return lag is not None and int(lag) == 0
    return False


async def test_a_rolling_deploy_loses_none_of_the_new_versions_events(
    redis: aioredis.Redis, log: EventLog
) -> None:
    assert await _deploy(redis, log, Worker) == 10


async def test_without_hand_off_the_old_version_drops_them(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """The broken variant: the old worker acknowledges the refunds away."""
    assert await _deploy(redis, log, NoHandOff) == 0


# -- hung handlers -------------------------------------------------------------------


class Hangs(Agent):
    name = "hangs"
    subscribes = (Charge,)
    timeout = 0.3
    started: ClassVar[int] = 0

    async def handle(self, event: Charge, ctx: Context) -> None:
        type(self).started += 1
        await asyncio.Event().wait()  # never returns


async def test_a_hung_handler_times_out_and_is_dead_lettered(
    redis: aioredis.Redis, log: EventLog
) -> None:
    Hangs.started = 0
    await redis.xadd(ingress_stream(0), ingress_fields(Charge(ref="h1")))
    opts = fast_options(claim_idle=0.3, max_deliveries=2)
    async with workers([[Hangs()]], redis, log, opts):
        await wait_for(lambda: _dead_letters(redis, 1), seconds=30, what="a dead letter")
    [letter] = await dlq.list_dead_letters(redis)
    assert letter.error_type == "HandlerTimeout"
    assert "timeout of 0.3 s" in letter.error
    assert letter.deliveries == 2
    assert Hangs.started == 2
    assert await count_type(log, "activation.dead_lettered") == 1
