"""The relay's checkpoint and lease belong to the deployment, not to its routes (promise 4).

Adding an agent or a subscription must not republish the log to anyone, and a
new subscription starts at the current position unless asked to backfill.
During a rolling deploy two versions of an app (old routes, new routes, one
relay name) run side by side: whichever holds the lease, every event reaches
each of its subscribers once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import cast
from uuid import UUID

import msgspec
import redis.asyncio as aioredis

from runtime.events.model import Cursor, LogPosition, NewEvent, event_type_of
from runtime.log.store import EventLog
from runtime.streams.keys import agent_stream
from runtime.worker.relay import LIVE, Relay
from tests.support.events import Counted
from tests.support.runtime import wait_for

COUNTED = event_type_of(Counted(writer=0, seq=0))
OLD = {COUNTED: ["xavier"]}
NEW = {COUNTED: ["xavier", "yolanda"]}


def relay(log: EventLog, redis: aioredis.Redis, routes: Mapping[str, list[str]],
          **kwargs: object) -> Relay:  # fmt: skip
    # A short lease: a relay waiting for it looks every 0.5 s.
    options: dict[str, object] = {"poll_interval": 0.05, "timer_interval": 0.05,
                                  "lease_seconds": 1.5, **kwargs}  # fmt: skip
    return Relay(log, redis, routes, **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(r: Relay) -> AsyncIterator[Relay]:
    started = Started(r)
    try:
        yield r
    finally:
        await started.stop()


async def append(log: EventLog, n: int, first: int = 0) -> list[UUID]:
    ids = []
    for i in range(n):
        event = NewEvent(body=Counted(writer=1, seq=first + i), run_id=uuid.uuid4())
        await log.append(f"run-{event.run_id}", [event])
        ids.append(event.event_id)
    return ids


async def published(redis: aioredis.Redis, agent: str) -> list[UUID]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(agent_stream(agent)))
    return [UUID(fields[b"event_id"].decode()) for _, fields in entries]


async def position_of(log: EventLog, event_id: UUID) -> LogPosition:
    [event] = [e for e in await log.read_all(limit=10_000) if e.event_id == event_id]
    return event.log_position


async def caught_up(log: EventLog, r: Relay, last: UUID, *, agents: dict[str, int]) -> None:
    """Until ``r``'s checkpoint has passed ``last`` and each agent's stream holds its count."""
    target = await position_of(log, last)

    async def done() -> bool:
        if await r.position() < target:
            return False
        return all([len(await published(r.redis, a)) >= n for a, n in agents.items()])

    await wait_for(done, seconds=30, what=f"the relay past {target} with {agents}")


async def holds_lease(r: Relay) -> bool:
    return bool(await r.redis.get(r.lease_key) == r._token.encode())


async def test_adding_an_agent_republishes_nothing_and_gives_it_no_history(
    redis: aioredis.Redis, log: EventLog
) -> None:
    async with running(relay(log, redis, OLD)) as old:
        before = await append(log, 5)
        await caught_up(log, old, before[-1], agents={"xavier": 5})
    async with running(relay(log, redis, NEW)) as new:
        after = await append(log, 3, 100)
        await caught_up(log, new, after[-1], agents={"xavier": 8, "yolanda": 3})
        await asyncio.sleep(0.3)  # anything extra would have arrived by now
    assert await published(redis, "xavier") == before + after
    assert await published(redis, "yolanda") == after
    subs = await redis.hgetall(new.subscriptions_key)
    assert subs == {b"xavier test.counted": LIVE.encode(), b"yolanda test.counted": LIVE.encode()}


async def test_a_new_agent_with_backfill_gets_the_history_on_its_own_stream(
    redis: aioredis.Redis, log: EventLog
) -> None:
    async with running(relay(log, redis, OLD)) as old:
        before = await append(log, 5)
        await caught_up(log, old, before[-1], agents={"xavier": 5})
    async with running(relay(log, redis, NEW, backfill=True, batch=2)) as new:
        after = await append(log, 3, 100)
        await caught_up(log, new, after[-1], agents={"xavier": 8, "yolanda": 8})
        await asyncio.sleep(0.3)
    assert await published(redis, "xavier") == before + after
    assert await published(redis, "yolanda") == before + after
    # Backfill is for subscriptions the relay has not seen: a restart repeats nothing.
    async with running(relay(log, redis, NEW, backfill=True)) as again:
        last = await append(log, 1, 200)
        await caught_up(log, again, last[-1], agents={"xavier": 9, "yolanda": 9})
        await asyncio.sleep(0.3)
    assert await published(redis, "xavier") == before + after + last
    assert await published(redis, "yolanda") == before + after + last


async def test_naming_a_relay_after_its_routes_republishes_the_log(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """The old identity (a hash of the routes), kept as the failure the name avoids."""

    def by_routes(routes: Mapping[str, list[str]]) -> str:
        digest = hashlib.sha256(msgspec.json.encode(routes, order="sorted")).hexdigest()
        return "app-" + digest[:12]

    async with running(relay(log, redis, OLD, name=by_routes(OLD))) as old:
        before = await append(log, 3)
        await caught_up(log, old, before[-1], agents={"xavier": 3})
    async with running(relay(log, redis, NEW, name=by_routes(NEW))) as new:
        await caught_up(log, new, before[-1], agents={"xavier": 6, "yolanda": 3})
    assert await published(redis, "xavier") == before + before  # every event twice
    assert await published(redis, "yolanda") == before  # the whole history


async def test_a_relay_named_after_its_routes_hands_its_checkpoint_on(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """Upgrading from relays named after their routes: the name adopts that checkpoint."""
    before = await append(log, 3)
    legacy = relay(log, redis, OLD)
    last = await position_of(log, before[-1])
    await redis.set(legacy._legacy_checkpoint_key, str(last))  # a bare TX:POSITION, as then
    async with running(relay(log, redis, OLD)) as r:
        after = await append(log, 2, 100)
        await caught_up(log, r, after[-1], agents={"xavier": 2})
        await asyncio.sleep(0.3)
    assert await published(redis, "xavier") == after


async def test_two_app_versions_publish_every_event_once_to_each_subscriber(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """A rolling deploy, both ways: old and new relays (same name) take turns at the lease.

    While the old one holds it, the new subscription's events are not published;
    the new one, taking over, sends them (to that agent only) before going on.
    When an old one takes the lease back, it pauses the subscription it does
    not know, and the next new holder sends what it missed.
    """
    xavier: list[UUID] = []
    yolanda: list[UUID] = []

    async def expect(r: Relay, batch: list[UUID], *, new_gets_them: bool) -> None:
        xavier.extend(batch)
        if new_gets_them:
            yolanda.extend(batch)
        await caught_up(log, r, batch[-1], agents={"xavier": len(xavier), "yolanda": len(yolanda)})

    async with contextlib.AsyncExitStack() as stack:
        old = Started(relay(log, redis, OLD))
        stack.push_async_callback(old.stop)
        await wait_for(lambda: holds_lease(old.relay), what="the old relay's lease")
        await expect(old.relay, await append(log, 4), new_gets_them=False)

        new = Started(relay(log, redis, NEW))
        stack.push_async_callback(new.stop)
        # The new version has entered its subscription: from here on its events are due.
        await wait_for(lambda: redis.hexists(new.relay.subscriptions_key, "yolanda test.counted"),
                       what="the new relay joining")  # fmt: skip
        missed = await append(log, 4, 100)
        await expect(old.relay, missed, new_gets_them=False)
        assert await published(redis, "yolanda") == []  # the old version holds the lease
        assert not await holds_lease(new.relay)

        await old.stop()  # the new relay takes over, and sends yolanda what she missed
        await wait_for(lambda: holds_lease(new.relay), what="the new relay's lease")
        yolanda.extend(missed)
        await expect(new.relay, await append(log, 4, 200), new_gets_them=True)

        # An old process takes the lease back (the new one restarts, say): it
        # pauses the subscription it does not have.
        old_again = Started(relay(log, redis, OLD))
        stack.push_async_callback(old_again.stop)
        await new.stop()
        await wait_for(lambda: holds_lease(old_again.relay), what="the old relay, again")
        paused = await append(log, 4, 300)
        await expect(old_again.relay, paused, new_gets_them=False)

        newest = Started(relay(log, redis, NEW))
        stack.push_async_callback(newest.stop)
        await old_again.stop()
        await wait_for(lambda: holds_lease(newest.relay), what="the newest relay's lease")
        yolanda.extend(paused)
        await expect(newest.relay, await append(log, 4, 400), new_gets_them=True)
        await asyncio.sleep(0.3)  # anything extra would have arrived by now

    assert await published(redis, "xavier") == xavier
    assert await published(redis, "yolanda") == yolanda
    assert len(set(xavier)) == len(xavier) == 20
    assert len(set(yolanda)) == len(yolanda) == 16  # all but the first 4


class Started:
    """A relay running until :meth:`stop` (which may be called again)."""

    def __init__(self, r: Relay) -> None:
        self.relay = r
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(r.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        done, _ = await asyncio.wait([self._task], timeout=20)
        if not done:
            for task in asyncio.all_tasks():  # where it hangs, for the failure report
                task.print_stack(file=sys.stdout)
        assert done, "the relay did not stop within 20 s"
        self._task.result()


async def test_a_checkpoint_past_the_end_of_the_log_is_rewound(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """A PostgreSQL that lost its last commits hands their ids and positions out again:
    the relay's checkpoint then names an event that is not there. It resumes at
    the newest older cursor whose event is (here the one a second before)."""
    before = await append(log, 3)
    r = relay(log, redis, OLD)
    anchor = Cursor(await position_of(log, before[1]), before[1])
    last = await position_of(log, before[-1])
    lost = Cursor(LogPosition(last.tx + 100, last.position + 100), uuid.uuid4())
    await redis.set(r.checkpoint_key, str(lost))
    await redis.lpush(r.anchors_key, str(anchor))
    await redis.hset(r.subscriptions_key, "xavier test.counted", LIVE)
    async with running(r):
        after = await append(log, 2, 100)
        await caught_up(log, r, after[-1], agents={"xavier": 3})
        await asyncio.sleep(0.3)
    assert await published(redis, "xavier") == before[2:] + after
    assert (await r.checkpoint()).event_id == after[-1]


async def test_a_bare_checkpoint_past_the_end_of_the_log_is_rewound_to_the_start(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """A checkpoint as earlier versions wrote it (TX:POSITION, no event id), beyond
    the log's end: resuming there would skip every event below it."""
    before = await append(log, 2)
    r = relay(log, redis, OLD)
    last = await position_of(log, before[-1])
    await redis.set(r.checkpoint_key, str(LogPosition(last.tx + 100, last.position + 100)))
    async with running(r):
        after = await append(log, 2, 100)
        await caught_up(log, r, after[-1], agents={"xavier": 4})
    assert await published(redis, "xavier") == before + after


async def test_releasing_the_lease_leaves_another_relays_lease_in_place(
    redis: aioredis.Redis, log: EventLog
) -> None:
    first, second = relay(log, redis, OLD), relay(log, redis, OLD)
    await redis.set(first.lease_key, first._token, px=60_000)
    assert await first.release()
    assert await redis.get(first.lease_key) is None
    # The lease expired under the first relay and the second took it: the
    # first one's release (its stop, say) must leave it alone.
    await redis.set(second.lease_key, second._token, px=60_000)
    assert not await first.release()
    assert await redis.get(second.lease_key) == second._token.encode()


async def test_a_get_then_del_release_deletes_the_lease_taken_in_between(
    redis: aioredis.Redis, log: EventLog
) -> None:
    """The release the relay had: between its GET and its DEL the lease can expire and
    be taken by another relay, whose lease the DEL then deletes (two relays publish)."""
    first, second = relay(log, redis, OLD), relay(log, redis, OLD)
    await redis.set(first.lease_key, first._token, px=60_000)
    if await redis.get(first.lease_key) == first._token.encode():
        await redis.delete(first.lease_key)  # expired, in effect
        await redis.set(second.lease_key, second._token, nx=True, px=60_000)  # taken
        await redis.delete(first.lease_key)
    assert await redis.get(second.lease_key) is None  # the second relay's lease, gone
