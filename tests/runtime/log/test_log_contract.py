"""Contract of the event log: append, read, conflicts, idempotency, upcasting."""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import pytest

from runtime.errors import ConcurrencyConflict, DuplicateEventMismatch, InvalidAppend
from runtime.events.model import START, Event, EventRegistry, NewEvent
from runtime.log.store import NO_STREAM, EventLog
from tests.support.events import Noted


async def test_append_then_read_stream_and_all(log: EventLog) -> None:
    first = await log.append("s-a", [Noted(text="one"), Noted(text="two")], NO_STREAM)
    second = await log.append("s-b", [Noted(text="three")], NO_STREAM)
    assert first.stream_version == 2 and first.inserted
    assert second.stream_version == 1

    stream = await log.read_stream("s-a")
    assert [e.body for e in stream] == [Noted(text="one"), Noted(text="two")]
    assert [e.stream_version for e in stream] == [1, 2]
    assert [e.log_position for e in stream] == first.positions
    assert await log.read_stream("s-a", from_version=2) == stream[1:]
    assert await log.stream_version("s-a") == 2
    assert await log.stream_version("nope") == 0

    everything = await log.read_all(START)
    assert [e.body.text for e in everything] == ["one", "two", "three"]  # type: ignore[attr-defined]
    # Paging from any event's position continues exactly after it.
    assert await log.read_all(everything[0].log_position, limit=1) == everything[1:2]


async def test_envelope_round_trips(log: EventLog) -> None:
    event = NewEvent(
        body=Noted(text="x", n=7),
        run_id=NewEvent(body=Noted(text="")).event_id,
        causation_id=NewEvent(body=Noted(text="")).event_id,
        producer="agent.test",
        trace="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    await log.append("s-env", [event], NO_STREAM)
    (stored,) = await log.read_stream("s-env")
    assert stored.event_id == event.event_id
    assert stored.run_id == event.run_id
    assert stored.causation_id == event.causation_id
    assert stored.producer == "agent.test"
    assert stored.trace == event.trace
    assert stored.recorded_at == event.recorded_at
    assert stored.event_type == "test.noted" and stored.schema_version == 1
    assert len(stored.hash) == 32 and stored.prev_hash == bytes(32)


async def test_wrong_expected_version_is_a_typed_conflict(log: EventLog) -> None:
    await log.append("s-c", [Noted(text="a")], NO_STREAM)
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append("s-c", [Noted(text="b")], NO_STREAM)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s-c", 0, 1)
    assert "s-c" in str(info.value) and "expected version 0" in str(info.value)
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append("s-c", [Noted(text="b")], 5)
    assert info.value.actual == 1
    # The right version goes through; nothing of the refused appends is stored.
    await log.append("s-c", [Noted(text="b")], 1)
    assert [e.body.text for e in await log.read_stream("s-c")] == ["a", "b"]  # type: ignore[attr-defined]


async def test_racing_writers_one_wins_the_version(log: EventLog) -> None:
    await log.append("s-race", [Noted(text="base")], NO_STREAM)
    results = await asyncio.gather(
        *(log.append("s-race", [Noted(text=f"w{i}")], 1) for i in range(8)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, ConcurrencyConflict) and r.actual == 2 for r in losers)
    assert await log.stream_version("s-race") == 2


async def test_any_version_appends_all_land_without_conflict(log: EventLog) -> None:
    await asyncio.gather(*(log.append("s-any", [Noted(text=str(i))]) for i in range(10)))
    stored = await log.read_stream("s-any")
    assert [e.stream_version for e in stored] == list(range(1, 11))
    assert sorted(e.body.text for e in stored) == sorted(str(i) for i in range(10))  # type: ignore[attr-defined]


async def test_reappend_is_a_noop_returning_original_positions(log: EventLog) -> None:
    batch = [NewEvent(body=Noted(text="a")), NewEvent(body=Noted(text="b"))]
    first = await log.append("s-idem", batch, NO_STREAM)
    await log.append("s-idem", [Noted(text="c")], 2)
    again = await log.append("s-idem", batch, NO_STREAM)
    assert again.positions == first.positions
    assert not again.inserted
    assert len(await log.read_stream("s-idem")) == 3
    assert len(await log.read_all(START)) == 3


async def test_concurrent_identical_appends_store_once(log: EventLog) -> None:
    batch = [NewEvent(body=Noted(text=str(i))) for i in range(5)]
    results = await asyncio.gather(*(log.append("s-dup", batch, NO_STREAM) for _ in range(6)))
    assert {tuple(r.positions) for r in results} == {tuple(results[0].positions)}
    assert sum(r.inserted for r in results) == 1
    assert len(await log.read_stream("s-dup")) == 5


async def test_partly_stored_batch_is_refused(log: EventLog) -> None:
    a, b = NewEvent(body=Noted(text="a")), NewEvent(body=Noted(text="b"))
    await log.append("s-part", [a], NO_STREAM)
    with pytest.raises(DuplicateEventMismatch) as info:
        await log.append("s-part", [a, b], NO_STREAM)
    assert info.value.event_id == a.event_id
    assert len(await log.read_stream("s-part")) == 1


@pytest.mark.parametrize(
    ("stream", "events", "message"),
    [
        ("s", [], "no events"),
        ("", [Noted(text="x")], "stream id"),
        ("x" * 201, [Noted(text="x")], "stream id"),
        ("s", [Noted(text="x"), "not an event"], "not an agentrt Event"),
        ("s", [NewEvent(body=Noted(text="x"), recorded_at=datetime(2020, 1, 1))], "timezone"),
    ],
)
async def test_bad_appends_are_refused_before_the_database(
    log: EventLog, stream: str, events: list[object], message: str
) -> None:
    with pytest.raises(InvalidAppend, match=message):
        await log.append(stream, events)  # type: ignore[arg-type]
    assert await log.read_all(START) == []


async def test_same_event_id_twice_in_one_batch_is_refused(log: EventLog) -> None:
    e = NewEvent(body=Noted(text="x"))
    with pytest.raises(InvalidAppend, match="twice"):
        await log.append("s", [e, e])


async def test_append_inside_callers_transaction_rolls_back_with_it(log: EventLog) -> None:
    async with log.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await log.append("s-tx", [Noted(text="a")], NO_STREAM, conn=conn)
        await log.append("s-tx-2", [Noted(text="b")], NO_STREAM, conn=conn)
        await tx.rollback()
    assert await log.read_all(START) == []
    async with log.pool.acquire() as conn, conn.transaction():
        await log.append("s-tx", [Noted(text="a")], NO_STREAM, conn=conn)
        await log.append("s-tx-2", [Noted(text="b")], NO_STREAM, conn=conn)
    assert len(await log.read_all(START)) == 2


async def test_upcasting_on_read_never_rewrites_the_stored_event(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    old = EventRegistry()

    @old.register
    class RenamedV1(Event, tag="test.renamed"):
        __auto_register__ = False
        full_name: str

    await log.append("s-up", [RenamedV1(full_name="Ada Lovelace")], NO_STREAM)

    current = EventRegistry()

    @current.register
    class RenamedV3(Event, tag="test.renamed"):
        __auto_register__ = False
        __schema_version__ = 3
        first: str
        last: str
        title: str = ""

    @current.upcaster("test.renamed", from_version=1)
    def split(doc: dict[str, object]) -> dict[str, object]:
        first, _, last = str(doc.pop("full_name")).partition(" ")
        return {**doc, "first": first, "last": last}

    @current.upcaster("test.renamed", from_version=2)
    def titled(doc: dict[str, object]) -> dict[str, object]:
        return {**doc, "title": "Countess"}

    reader = EventLog(log.pool, schema=log.schema, registry=current)
    (event,) = await reader.read_stream("s-up")
    assert event.body == RenamedV3(first="Ada", last="Lovelace", title="Countess")
    assert event.schema_version == 1  # the envelope still says what was stored
    stored = await admin.fetchval(f'SELECT data::text FROM "{log.schema}".events')
    assert "full_name" in stored and "first" not in stored
    # The old registry still reads it as written.
    (raw,) = await EventLog(log.pool, schema=log.schema, registry=old).read_stream("s-up")
    assert raw.body == RenamedV1(full_name="Ada Lovelace")


async def test_writers_of_different_streams_do_not_wait_for_each_other(log: EventLog) -> None:
    """The hash chain links within a stream only: no global critical section."""
    async with log.pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        await log.append("s-held", [Noted(text="open")], NO_STREAM, conn=holder)
        # Another stream appends while that transaction is still open...
        other = await asyncio.wait_for(log.append("s-free", [Noted(text="x")], NO_STREAM), 5)
        assert other.inserted
        # ...while the same stream waits for it, then loses the version race.
        same = asyncio.create_task(log.append("s-held", [Noted(text="late")], NO_STREAM))
        await asyncio.sleep(0.3)
        assert not same.done()
        await tx.commit()
    with pytest.raises(ConcurrencyConflict):
        await asyncio.wait_for(same, 5)


# Large batches take the COPY path (runtime.log.COPY_THRESHOLD); the contract is the same.
BIG = 100


async def test_large_batch_append_read_and_conflict(log: EventLog) -> None:
    batch = [NewEvent(body=Noted(text=str(i), n=i)) for i in range(BIG)]
    result = await log.append("s-big", batch, NO_STREAM)
    assert result.stream_version == BIG
    assert result.inserted
    stored = await log.read_stream("s-big")
    assert [e.event_id for e in stored] == [e.event_id for e in batch]
    assert [e.log_position for e in stored] == result.positions
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append("s-big", [NewEvent(body=Noted(text="x")) for _ in range(BIG)], 3)
    assert info.value.actual == BIG
    more = await log.append("s-big", [Noted(text="y") for _ in range(BIG)], BIG)
    assert more.stream_version == 2 * BIG
    assert len(await log.read_all(START, limit=10_000)) == 2 * BIG


async def test_large_batch_reappend_and_partial_duplicate(log: EventLog) -> None:
    batch = [NewEvent(body=Noted(text=str(i))) for i in range(BIG)]
    first = await log.append("s-big2", batch, NO_STREAM)
    for expected in (NO_STREAM, None, BIG):
        again = await log.append("s-big2", batch, expected)
        assert again.positions == first.positions
        assert not again.inserted
    with pytest.raises(DuplicateEventMismatch):
        await log.append(
            "s-big2", [*batch[:10], *(NewEvent(body=Noted(text="n")) for _ in range(BIG))]
        )
    assert await log.stream_version("s-big2") == BIG


async def test_large_batches_racing_for_any_version(log: EventLog) -> None:
    batches = [[NewEvent(body=Noted(text=f"{w}-{i}")) for i in range(BIG)] for w in range(4)]
    await asyncio.gather(*(log.append("s-bigrace", b) for b in batches))
    stored = await log.read_stream("s-bigrace")
    assert [e.stream_version for e in stored] == list(range(1, 4 * BIG + 1))
    # Each batch stayed contiguous.
    ids = [e.event_id for e in stored]
    for b in batches:
        start = ids.index(b[0].event_id)
        assert ids[start : start + BIG] == [e.event_id for e in b]


async def test_large_batch_inside_callers_transaction(log: EventLog) -> None:
    async with log.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await log.append("s-bigtx", [Noted(text="a") for _ in range(BIG)], NO_STREAM, conn=conn)
        await tx.rollback()
    assert await log.stream_version("s-bigtx") == 0


async def test_a_stale_remembered_head_still_gives_a_typed_conflict(log: EventLog) -> None:
    """A log that remembers a stream's head from its own append, while another moved it."""
    other = EventLog(log.pool, schema=log.schema)
    await log.append("s-stale", [Noted(text="mine")], NO_STREAM)  # log remembers version 1
    await other.append("s-stale", [Noted(text="theirs")], 1)
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append("s-stale", [Noted(text="late")], 1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    await log.append("s-stale", [Noted(text="fits")], 2)
    assert [e.body.text for e in await log.read_stream("s-stale")] == ["mine", "theirs", "fits"]  # type: ignore[attr-defined]
