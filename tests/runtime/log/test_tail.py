"""Promise 4: a tail reader never skips an event, under many concurrent writers."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from uuid import UUID

from runtime.events.model import START, LogPosition, NewEvent
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.events import Counted

WRITERS = 8
TX_PER_WRITER = 25

Reader = Callable[[EventLog], AsyncIterator[UUID]]


async def tail_reader(log: EventLog) -> AsyncIterator[UUID]:
    async for event in log.subscribe(START, batch=50, poll_interval=0.005):
        yield event.event_id


async def naive_position_reader(log: EventLog) -> AsyncIterator[UUID]:
    """The bug promise 4 guards against: advancing by position alone.

    A bigserial position is taken when a row is inserted, not when its
    transaction commits, so a later position can be readable before an
    earlier one; this reader then passes over the earlier one for good.
    """
    last = 0
    while True:
        rows = await log.pool.fetch(
            f'SELECT position, event_id FROM "{log.schema}".events '
            "WHERE position > $1 ORDER BY position LIMIT 50",
            last,
        )
        for r in rows:
            last = r["position"]
            yield r["event_id"]
        if not rows:
            await asyncio.sleep(0.005)


async def run_writers_and_tail(log: EventLog, reader: Reader) -> tuple[list[UUID], set[UUID]]:
    """8 writers commit out of order (some roll back) while ``reader`` follows.

    Returns what the reader saw, in order, and the ids that were committed.
    """
    committed: set[UUID] = set()
    seen: list[UUID] = []
    rng = random.Random(4)

    async def writer(w: int) -> None:
        for seq in range(TX_PER_WRITER):
            # Now and then a batch large enough to take the COPY path.
            size = 70 if rng.random() < 0.1 else 1
            batch = [NewEvent(body=Counted(writer=w, seq=seq * 100 + i)) for i in range(size)]
            kind = rng.choice(["fast", "fast", "slow", "xid_first", "rollback"])
            async with log.pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                try:
                    if kind == "xid_first":
                        # Takes its transaction id now, its position later:
                        # the inversion a position-ordered reader trips over.
                        await conn.execute("SELECT pg_current_xact_id()")
                        await asyncio.sleep(rng.uniform(0, 0.02))
                    await log.append(f"w{w}-{seq % 3}", batch, conn=conn)
                    if kind in ("slow", "xid_first"):
                        await asyncio.sleep(rng.uniform(0.005, 0.04))
                except BaseException:
                    await tx.rollback()
                    raise
                if kind == "rollback":
                    await tx.rollback()
                else:
                    await tx.commit()
                    committed.update(e.event_id for e in batch)

    async def follow() -> None:
        async for event_id in reader(log):
            seen.append(event_id)

    follower = asyncio.create_task(follow())
    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    # Let the reader drain what was committed last.
    for _ in range(200):
        if len(seen) >= len(committed):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    return seen, committed


async def test_tail_reader_sees_every_commit_once_in_one_stable_order(log: EventLog) -> None:
    seen, committed = await run_writers_and_tail(log, tail_reader)
    assert len(seen) == len(set(seen)), "an event was delivered twice"
    assert set(seen) == committed, (
        f"missed {len(committed - set(seen))}, extra {len(set(seen) - committed)}"
    )
    # Nothing was filled in behind the reader: a fresh read of the whole log
    # yields the very sequence the live reader saw.
    replay: list[UUID] = []
    position = START
    while batch := await log.read_all(position, 37):
        replay.extend(e.event_id for e in batch)
        position = batch[-1].log_position
    assert replay == seen


async def test_the_same_run_catches_a_reader_that_orders_by_position(log: EventLog) -> None:
    seen, committed = await run_writers_and_tail(log, naive_position_reader)
    assert len(committed - set(seen)) > 0, "the broken reader was expected to skip events"


async def test_a_lower_position_committing_late_is_read_not_skipped(log: EventLog) -> None:
    """The interleaving, step by step, for both readers."""
    early, late = NewEvent(body=Counted(writer=1, seq=0)), NewEvent(body=Counted(writer=2, seq=0))
    async with log.pool.acquire() as slow:
        tx = slow.transaction()
        await tx.start()
        await slow.execute("SELECT pg_current_xact_id()")
        first = await log.append("s-slow", [early], conn=slow)  # lower position, not committed
        second = await log.append("s-fast", [late])  # higher position, committed
        assert first.positions[0].position < second.positions[0].position

        # The naive reader sees the higher position and moves past the lower one.
        naive_cursor = await log.pool.fetchval(f'SELECT max(position) FROM "{log.schema}".events')
        assert naive_cursor == second.positions[0].position
        # The log's reader holds back: an older transaction is still running.
        assert await log.read_all(START) == []
        await tx.commit()

    naive_after = await log.pool.fetch(
        f'SELECT event_id FROM "{log.schema}".events WHERE position > $1', naive_cursor
    )
    assert naive_after == []  # `early` is lost to the naive reader for good
    events = await log.read_all(START)
    assert [e.event_id for e in events] == [early.event_id, late.event_id]
    assert events[0].log_position < events[1].log_position
    assert isinstance(events[0].log_position, LogPosition)


async def test_subscribe_wakes_on_notify_before_the_poll_interval(
    log: EventLog, settings: Settings
) -> None:
    loud_pool = await open_runtime_pool(dataclasses.replace(settings, log_notify=True))
    loud = EventLog(loud_pool, schema=log.schema)
    got: list[UUID] = []

    async def follow() -> None:
        # A poll interval far longer than the test: only NOTIFY can wake it in time.
        async for e in log.subscribe(START, poll_interval=30):
            got.append(e.event_id)
            return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    event = NewEvent(body=Counted(writer=0, seq=0))
    try:
        await loud.append("s-n", [event])
        await asyncio.wait_for(task, 5)
    finally:
        await loud_pool.close()
    assert got == [event.event_id]


async def test_subscribe_falls_back_to_polling_without_notify(
    log: EventLog, settings: Settings
) -> None:
    quiet_pool = await open_runtime_pool(dataclasses.replace(settings, log_notify=False))
    quiet = EventLog(quiet_pool, schema=log.schema)
    got: list[UUID] = []

    async def follow() -> None:
        async for e in log.subscribe(START, poll_interval=0.05):
            got.append(e.event_id)
            return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    event = NewEvent(body=Counted(writer=0, seq=1))
    try:
        await quiet.append("s-q", [event])
        await asyncio.wait_for(task, 5)
    finally:
        await quiet_pool.close()
    assert got == [event.event_id]


async def test_notify_off_really_sends_no_notification(log: EventLog, settings: Settings) -> None:
    """So the polling test above is not passing on a NOTIFY it did not expect."""
    woken = asyncio.Event()
    listener = await log.pool.acquire()
    await listener.add_listener(log.channel, lambda *_: woken.set())
    quiet_pool = await open_runtime_pool(dataclasses.replace(settings, log_notify=False))
    loud_pool = await open_runtime_pool(dataclasses.replace(settings, log_notify=True))
    try:
        await EventLog(quiet_pool, schema=log.schema).append("s-q2", [Counted(writer=0, seq=2)])
        await asyncio.sleep(0.3)
        assert not woken.is_set()
        await EventLog(loud_pool, schema=log.schema).append("s-q2", [Counted(writer=0, seq=3)])
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await quiet_pool.close()
        await loud_pool.close()
        await listener.reset()
        await log.pool.release(listener)
