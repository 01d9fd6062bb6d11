"""Circuit breakers shared through a real Redis: states, the single probe, workers that agree."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from runtime.effects.breaker import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Permit,
    State,
    Transition,
    breaker_key,
)
from runtime.errors import AgentrtError, ErrorCode
from tests.support import REPO
from tests.support.servers import Servers, redis_db_url

TEST_DB = 8  # the Redis database these tests own (and flush)


@pytest.fixture
async def redis_url(servers: Servers) -> str:
    url = redis_db_url(servers.redis_url, TEST_DB)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    return url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def name() -> str:
    return f"tool-{uuid.uuid4().hex[:8]}"


def breaker(redis: aioredis.Redis, name: str, **options: float) -> CircuitBreaker:
    settings: dict[str, float] = {"failure_threshold": 3, "reset_timeout": 0.2}
    settings.update(options)
    return CircuitBreaker(
        redis,
        name,
        failure_threshold=int(settings["failure_threshold"]),
        reset_timeout=settings["reset_timeout"],
        probe_timeout=settings.get("probe_timeout", 5.0),
        cache_ttl=settings.get("cache_ttl", 0.0),
    )


async def fail(b: CircuitBreaker, times: int) -> list[Transition | None]:
    return [await b.record_failure(await b.before_call()) for _ in range(times)]


async def open_and_wait(b: CircuitBreaker) -> None:
    """Trip ``b`` and wait out its reset_timeout, so the next caller probes."""
    await fail(b, b.failure_threshold)
    await asyncio.sleep(b.reset_timeout + 0.05)


async def test_a_healthy_breaker_is_closed_and_stores_nothing(
    redis: aioredis.Redis, name: str
) -> None:
    b = breaker(redis, name)
    permit = await b.before_call()
    assert permit == Permit(name=name, generation=0)
    assert await b.record_success(permit) is None
    assert await redis.exists(breaker_key(name)) == 0
    snapshot = await b.state()
    assert snapshot == BreakerState(
        name=name,
        state=State.CLOSED,
        failures=0,
        generation=0,
        opened_at=None,
        retry_in=0.0,
        probe_in_flight=False,
    )


async def test_consecutive_failures_open_the_breaker(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name, reset_timeout=30)
    first, second, third = await fail(b, 3)
    assert first is None and second is None
    assert third is not None
    assert (third.name, third.from_state, third.to_state, third.failures) == (
        name,
        State.CLOSED,
        State.OPEN,
        3,
    )
    assert abs((datetime.now(UTC) - third.at).total_seconds()) < 5  # the server's clock
    snapshot = await b.state()
    assert snapshot.state is State.OPEN and snapshot.opened_at == third.at
    assert await redis.hget(breaker_key(name), "state") == b"open"


async def test_an_open_breaker_fails_fast_with_retry_in(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name, reset_timeout=30)
    await fail(b, 3)
    with pytest.raises(CircuitOpen) as caught:
        await b.before_call()
    refused = caught.value
    assert refused.name == name and 29 < refused.retry_in <= 30
    assert isinstance(refused, AgentrtError) and refused.code is ErrorCode.CIRCUIT_OPEN
    assert 29 < (await b.state()).retry_in <= 30


async def test_a_success_resets_the_consecutive_count(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    await fail(b, 2)
    assert (await b.state()).failures == 2
    assert await b.record_success(await b.before_call()) is None
    assert (await b.state()).failures == 0
    assert await fail(b, 2) == [None, None]
    assert (await b.state()).state is State.CLOSED


async def test_after_reset_timeout_the_next_caller_probes(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    await fail(b, 3)
    with pytest.raises(CircuitOpen):
        await b.before_call()
    await asyncio.sleep(0.25)
    assert (await b.state()).retry_in == 0  # still stored as open: reading changes nothing

    probe = await b.before_call()
    assert probe.probe
    assert probe.transition is not None
    assert (probe.transition.from_state, probe.transition.to_state) == (
        State.OPEN,
        State.HALF_OPEN,
    )
    snapshot = await b.state()
    assert snapshot.state is State.HALF_OPEN and snapshot.probe_in_flight
    with pytest.raises(CircuitOpen) as caught:
        await b.before_call()
    assert 4 < caught.value.retry_in <= 5  # at most until the probe slot expires


async def test_exactly_one_probe_among_concurrent_callers(redis_url: str, name: str) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(4)]
    try:
        breakers = [breaker(clients[i % 4], name) for i in range(20)]
        await open_and_wait(breakers[0])
        results = await asyncio.gather(*(b.before_call() for b in breakers), return_exceptions=True)
    finally:
        for client in clients:
            await client.aclose()
    permits = [r for r in results if isinstance(r, Permit)]
    refusals = [r for r in results if isinstance(r, CircuitOpen)]
    assert len(permits) == 1 and len(refusals) == 19
    assert permits[0].probe and permits[0].transition is not None


async def test_a_successful_probe_closes_the_breaker(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    await open_and_wait(b)
    probe = await b.before_call()
    closed = await b.record_success(probe)
    assert closed is not None
    assert (closed.from_state, closed.to_state, closed.failures) == (
        State.HALF_OPEN,
        State.CLOSED,
        0,
    )
    snapshot = await b.state()
    assert (snapshot.state, snapshot.failures, snapshot.opened_at) == (State.CLOSED, 0, None)
    permit = await b.before_call()
    assert not permit.probe and permit.transition is None


async def test_a_failed_probe_opens_it_again(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    await open_and_wait(b)
    reopened = await b.record_failure(await b.before_call())
    assert reopened is not None
    assert (reopened.from_state, reopened.to_state, reopened.failures) == (
        State.HALF_OPEN,
        State.OPEN,
        4,
    )
    with pytest.raises(CircuitOpen) as caught:
        await b.before_call()
    assert 0 < caught.value.retry_in <= 0.2  # a fresh reset_timeout, from now


async def test_a_lost_probe_expires(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name, probe_timeout=0.2)
    await open_and_wait(b)
    lost = await b.before_call()  # its worker dies: it never reports
    with pytest.raises(CircuitOpen):
        await b.before_call()
    await asyncio.sleep(0.25)

    second = await b.before_call()
    assert second.probe and second.probe_token != lost.probe_token
    assert second.transition is None  # still half-open: no new state
    # The first probe turns up after all: ignored, the slot is no longer its.
    assert await b.record_success(lost) is None
    assert (await b.state()).state is State.HALF_OPEN
    closed = await b.record_success(second)
    assert closed is not None and closed.to_state is State.CLOSED


async def test_a_slow_probe_still_counts_if_nobody_took_its_slot(
    redis: aioredis.Redis, name: str
) -> None:
    b = breaker(redis, name, probe_timeout=0.1)
    await open_and_wait(b)
    probe = await b.before_call()
    await asyncio.sleep(0.15)
    closed = await b.record_success(probe)
    assert closed is not None and closed.to_state is State.CLOSED


async def test_results_from_before_a_state_change_are_ignored(
    redis: aioredis.Redis, name: str
) -> None:
    b = breaker(redis, name)
    early = [await b.before_call() for _ in range(3)]  # in flight while the tool dies
    await open_and_wait(b)
    assert await b.record_success(await b.before_call()) is not None  # closed again
    # The stragglers report now: they must neither count nor reopen anything.
    assert [await b.record_failure(p) for p in early] == [None, None, None]
    snapshot = await b.state()
    assert (snapshot.state, snapshot.failures) == (State.CLOSED, 0)


async def test_concurrent_failures_open_it_exactly_once(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name, failure_threshold=5, reset_timeout=30)
    permits = [await b.before_call() for _ in range(12)]
    transitions = await asyncio.gather(*(b.record_failure(p) for p in permits))
    opened = [t for t in transitions if t is not None]
    assert len(opened) == 1 and opened[0].failures == 5


async def test_transitions_come_exactly_at_state_changes(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name, failure_threshold=2)
    seen: list[tuple[State, State]] = []

    def note(*changes: Transition | None) -> None:
        seen.extend((t.from_state, t.to_state) for t in changes if t is not None)

    note(await b.record_success(await b.before_call()))
    note(*await fail(b, 2))
    await asyncio.sleep(0.25)
    probe = await b.before_call()
    note(probe.transition, await b.record_failure(probe))
    await asyncio.sleep(0.25)
    probe = await b.before_call()
    note(probe.transition, await b.record_success(probe))
    note(await b.record_success(await b.before_call()))
    assert seen == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


async def test_two_clients_share_one_breaker(redis_url: str, name: str) -> None:
    first = aioredis.Redis.from_url(redis_url)
    second = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        worker_a, worker_b = breaker(first, name), breaker(second, name)
        await fail(worker_a, 2)
        tripped = await worker_b.record_failure(await worker_b.before_call())
        assert tripped is not None and tripped.to_state is State.OPEN
        with pytest.raises(CircuitOpen):
            await worker_a.before_call()
        await asyncio.sleep(0.25)
        probe = await worker_b.before_call()
        with pytest.raises(CircuitOpen):
            await worker_a.before_call()
        assert await worker_b.record_success(probe) is not None
        assert (await worker_a.state()).state is State.CLOSED
    finally:
        await first.aclose()
        await second.aclose()


TRIP = """
import asyncio, sys
import redis.asyncio as aioredis
from runtime.effects.breaker import CircuitBreaker

async def main() -> None:
    client = aioredis.Redis.from_url(sys.argv[1])
    try:
        b = CircuitBreaker(client, sys.argv[2], failure_threshold=3, reset_timeout=60)
        for _ in range(3):
            change = await b.record_failure(await b.before_call())
        print(change.to_state if change else "no change")
    finally:
        await client.aclose()

asyncio.run(main())
"""


async def test_another_process_trips_the_breaker_for_us(
    redis: aioredis.Redis, redis_url: str, name: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TRIP,
        redis_url,
        name,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "open"

    b = breaker(redis, name, reset_timeout=60)
    with pytest.raises(CircuitOpen) as caught:
        await b.before_call()
    assert 55 < caught.value.retry_in <= 60


# -- conveniences ---------------------------------------------------------------


class Boom(Exception):
    pass


async def test_call_records_success_and_failure(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    for _ in range(2):
        with pytest.raises(Boom):
            async with b.call():
                raise Boom
    assert (await b.state()).failures == 2
    async with b.call() as permit:
        assert not permit.probe
    assert (await b.state()).failures == 0


async def test_call_can_ignore_the_callers_own_errors(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name, failure_threshold=1)
    with pytest.raises(ValueError, match="bad arguments"):
        async with b.call(is_failure=lambda exc: not isinstance(exc, ValueError)):
            raise ValueError("bad arguments")
    assert (await b.state()).state is State.CLOSED


async def test_a_cancelled_probe_hands_its_slot_back(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    await open_and_wait(b)
    inside = asyncio.Event()

    async def probe() -> None:
        async with b.call():
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(probe())
    await inside.wait()
    assert (await b.state()).probe_in_flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    snapshot = await b.state()
    assert snapshot.state is State.HALF_OPEN and not snapshot.probe_in_flight
    assert (await b.before_call()).probe  # the next caller may probe at once


async def test_acquire_waits_and_becomes_the_probe(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    await fail(b, 3)
    permit = await b.acquire(timeout=2)
    assert permit.probe
    with pytest.raises(CircuitOpen):
        await b.acquire(timeout=0.1)  # the probe is in flight


async def test_call_can_wait_instead_of_failing(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name)
    await fail(b, 3)
    async with b.call(wait=2) as permit:
        assert permit.probe
    assert (await b.state()).state is State.CLOSED


async def test_wait_until_closed(redis_url: str, name: str) -> None:
    watcher_client = aioredis.Redis.from_url(redis_url)
    prober_client = aioredis.Redis.from_url(redis_url)
    try:
        watcher, prober = breaker(watcher_client, name), breaker(prober_client, name)
        assert await watcher.wait_until_closed(timeout=0.1)
        await fail(prober, 3)
        assert not await watcher.wait_until_closed(timeout=0.1)

        async def probe_later() -> None:
            async with prober.call(wait=2):
                pass

        waiting = asyncio.create_task(watcher.wait_until_closed(timeout=3))
        await probe_later()
        assert await waiting
    finally:
        await watcher_client.aclose()
        await prober_client.aclose()


async def test_a_permit_belongs_to_its_breaker(redis: aioredis.Redis, name: str) -> None:
    permit = await breaker(redis, name).before_call()
    with pytest.raises(ValueError, match="reported to breaker"):
        await breaker(redis, name + "-other").record_failure(permit)


@pytest.mark.parametrize(
    "options",
    [{"failure_threshold": 0}, {"reset_timeout": -1}, {"probe_timeout": 0}],
)
async def test_nonsense_settings_are_refused(
    redis: aioredis.Redis, options: dict[str, float]
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        breaker(redis, "x", **options)
    with pytest.raises(ValueError, match="name"):
        CircuitBreaker(redis, "")


# -- a closed state trusted locally for cache_ttl seconds ------------------------------


class Counted:
    """A breaker's script, counting its round trips (the real script still runs)."""

    def __init__(self, script: Any) -> None:
        self.script, self.calls = script, 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.script(*args, **kwargs)


def counted(b: CircuitBreaker) -> tuple[Counted, Counted]:
    before, record = Counted(b._before_call), Counted(b._record)
    b._before_call, b._record = before, record  # type: ignore[assignment]
    return before, record


async def test_a_trusted_closed_breaker_costs_no_round_trip(
    redis: aioredis.Redis, name: str
) -> None:
    b = breaker(redis, name, cache_ttl=5.0, reset_timeout=30.0)
    before, record = counted(b)
    for _ in range(100):
        async with b.call():
            pass
    assert (before.calls, record.calls) == (1, 0)
    # Uncached, the same hundred calls cost two round trips each.
    plain = breaker(redis, name)
    plain_before, plain_record = counted(plain)
    for _ in range(100):
        async with plain.call():
            pass
    assert (plain_before.calls, plain_record.calls) == (100, 100)


async def test_failures_are_reported_at_once_and_open_it(redis: aioredis.Redis, name: str) -> None:
    b = breaker(redis, name, cache_ttl=5.0, reset_timeout=30.0)
    _, record = counted(b)
    transitions = await fail(b, 3)
    assert record.calls == 3 and transitions[-1] is not None
    assert transitions[-1].to_state is State.OPEN
    with pytest.raises(CircuitOpen):
        await b.before_call()


async def test_a_breaker_opened_elsewhere_is_seen_within_the_ttl(
    redis: aioredis.Redis, name: str
) -> None:
    here = breaker(redis, name, cache_ttl=0.3, reset_timeout=30.0)
    there = breaker(redis, name)
    await here.before_call()  # trusted closed from now on, for 0.3 s
    await fail(there, 3)
    await here.before_call()  # the documented bound: still trusted
    await asyncio.sleep(0.35)
    with pytest.raises(CircuitOpen):
        await here.before_call()


async def test_a_stale_failure_ends_the_trust_at_once(redis: aioredis.Redis, name: str) -> None:
    here = breaker(redis, name, cache_ttl=30.0, reset_timeout=60.0)
    there = breaker(redis, name)
    permit = await here.before_call()
    await fail(there, 3)
    assert await here.record_failure(permit) is None  # an older generation: ignored...
    with pytest.raises(CircuitOpen):  # ...and this worker asks again
        await here.before_call()


async def test_a_success_resets_failures_counted_elsewhere_within_the_ttl(
    redis: aioredis.Redis, name: str
) -> None:
    here = breaker(redis, name, cache_ttl=0.2, reset_timeout=30.0)
    there = breaker(redis, name)
    await here.before_call()
    await fail(there, 2)
    await here.record_success(await here.before_call())  # trusted: not reported yet
    assert (await here.state()).failures == 2
    await asyncio.sleep(0.25)
    await here.record_success(await here.before_call())  # learns of them, resets them
    assert (await here.state()).failures == 0


async def test_trust_is_capped_at_reset_timeout_so_one_probe_holds(
    redis_url: str, name: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        breakers = [breaker(clients[i % 2], name, cache_ttl=30.0) for i in range(10)]
        assert breakers[0].cache_ttl == breakers[0].reset_timeout == 0.2
        for b in breakers:
            await b.before_call()  # every one trusts the closed state
        await open_and_wait(breakers[0])
        results = await asyncio.gather(*(b.before_call() for b in breakers), return_exceptions=True)
    finally:
        for client in clients:
            await client.aclose()
    assert len([r for r in results if isinstance(r, Permit)]) == 1


async def test_uncapped_trust_would_let_calls_past_the_probe(redis: aioredis.Redis,
                                                             name: str) -> None:  # fmt: skip
    """The cap is what keeps the single probe: without it (a broken variant), a worker
    still trusting the closed state from before the breaker opened lets calls through
    beside the probe."""
    here = breaker(redis, name, reset_timeout=0.2)
    here.cache_ttl = 30.0  # BROKEN on purpose: past reset_timeout
    there = breaker(redis, name)
    await here.before_call()
    await open_and_wait(there)
    probe = await there.before_call()
    assert probe.probe
    extra = await here.before_call()  # should have been refused: the probe is in flight
    assert not extra.probe
