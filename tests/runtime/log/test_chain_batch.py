"""The batch encoder and the batch chain compute what the per-event functions compute.

``EventLog._encode`` encodes a batch's bodies and chain headers in one encoder
call each (one JSON value per line) and hashes them in one pass;
``chain.links`` chains a batch. They must give the very bytes and hashes of
``encode_body``, ``content_hash_raw`` and ``link`` event by event, whatever
the strings hold.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import asyncpg
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConcurrencyConflict, InvalidAppend
from runtime.events.model import Event, NewEvent, encode_body, event_type_of, new_event_id
from runtime.log import audit, chain
from runtime.log.store import COPY_THRESHOLD, NO_STREAM, EventLog
from tests.support.events import Counted, Noted


class Verbatim(Event, tag="test.verbatim"):
    """A body holding raw JSON, which msgspec writes as given (line breaks too)."""

    raw: msgspec.Raw


def reference(
    stream_id: str, expected: int, events: list[NewEvent]
) -> list[tuple[str, bytes, bytes, bytes]]:
    """Data, content hash, prev hash and hash of each event, one at a time."""
    out = []
    prev = chain.GENESIS if expected == 0 else bytes(range(32))
    for version, ev in enumerate(events, start=expected + 1):
        data = encode_body(ev.body)
        content = chain.content_hash_raw(
            ev.event_id, event_type_of(ev.body), type(ev.body).__schema_version__, ev.run_id,
            ev.causation_id, ev.producer, ev.recorded_at, ev.trace, data,
        )  # fmt: skip
        hash_ = chain.link(prev, version, content, stream_id)
        out.append((data.decode(), content, prev, hash_))
        prev = hash_
    return out


def check(stream_id: str, expected: int, events: list[NewEvent]) -> None:
    log = EventLog(cast(Any, None), schema="unused")
    batch = log._encode(stream_id, events, expected)
    want = reference(stream_id, expected, events)
    assert batch.datas == [w[0] for w in want]
    assert batch.contents == [w[1] for w in want]
    prev = want[0][2]
    links = chain.links(prev, expected, batch.contents, stream_id)
    assert links == [prev] + [w[3] for w in want]
    rows = batch.rows(expected, links)
    assert rows == [batch.row(i, expected + i + 1, w[2], w[3]) for i, w in enumerate(want)]


text = st.text(
    st.characters(codec="utf-8") | st.sampled_from('\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"\\')
)
maybe_text = st.none() | text
moments = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
) | st.datetimes(
    min_value=datetime(1900, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([timezone(timedelta(hours=5, minutes=30)), UTC]),
)
new_events = st.builds(
    NewEvent,
    body=st.one_of(
        st.builds(Noted, text=text, n=st.integers(-(2**63), 2**63 - 1)),
        st.builds(Counted, writer=st.integers(0, 9), seq=st.integers(0, 10**9)),
    ),
    event_id=st.uuids(),
    run_id=st.none() | st.uuids(),
    causation_id=st.none() | st.uuids(),
    producer=maybe_text,
    trace=maybe_text,
    recorded_at=moments,
)


@settings(max_examples=200, deadline=None)
@given(
    stream_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
    expected=st.sampled_from([0, 3]),
    events=st.lists(new_events, min_size=1, max_size=80, unique_by=lambda e: e.event_id),
)
def test_batch_encoding_equals_event_by_event(
    stream_id: str, expected: int, events: list[NewEvent]
) -> None:
    check(stream_id, expected, events)


@pytest.mark.parametrize("n", [4, 40])
def test_raw_bodies_with_line_breaks_are_encoded_one_by_one(n: int) -> None:
    """Small batches are encoded event by event anyway; large ones fall back to it."""
    events = [
        NewEvent(body=Noted(text="a\nb")),
        NewEvent(body=Verbatim(raw=msgspec.Raw(b'{\n  "pretty": [1,\n 2]\n}'))),
        NewEvent(body=Verbatim(raw=msgspec.Raw(b"\n7\n"))),
        *(NewEvent(body=Noted(text=str(i))) for i in range(n - 3)),
    ]
    check("s-raw", 0, events)


@pytest.mark.parametrize("pad", [0, 30])
def test_bare_bodies_and_errors_name_the_event(pad: int) -> None:
    """The same answers event by event (a small batch) and by column (a large one)."""
    log = EventLog(cast(Any, None), schema="unused")
    more = [Noted(text=str(i)) for i in range(pad)]
    bare: list[Any] = [Noted(text="x"), NewEvent(body=Counted(writer=1, seq=2)), Noted(text="y")]
    batch = log._encode("s", [*bare, *more], 0)
    assert batch.types[:3] == ["test.noted", "test.counted", "test.noted"]
    assert batch.versions == [1] * (3 + pad)
    with pytest.raises(InvalidAppend, match="event 1 of the batch is not an agentrt Event"):
        log._encode("s", [Noted(text="x"), cast(Any, "nope"), *more], 0)
    with pytest.raises(InvalidAppend, match="event 1 of the batch is not an agentrt Event"):
        log._encode("s", [Noted(text="x"), NewEvent(body=cast(Any, "nope")), *more], 0)
    naive = NewEvent(body=Noted(text="x"), recorded_at=datetime(2020, 1, 1))
    with pytest.raises(InvalidAppend, match=f"event {naive.event_id}: recorded_at"):
        log._encode("s", [Noted(text="x"), naive, *more], 0)
    with pytest.raises(InvalidAppend, match="no events"):
        log._encode("s", [], 0)


def test_epoch_micros_is_exact() -> None:
    for moment in (
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1900, 1, 1, tzinfo=UTC),
        datetime(2262, 4, 11, 23, 47, 16, 854_775, tzinfo=UTC),
        datetime(2024, 2, 29, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=-7))),
    ):
        delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
        assert chain.epoch_micros(moment) == (
            (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        )


async def test_large_mixed_batch_verifies(log: EventLog, admin: asyncpg.Connection) -> None:
    """A COPY-sized batch of mixed types and raw bodies: stored hashes are the reference's,
    and ``audit verify`` recomputes them from the stored columns."""
    run = new_event_id()
    events = [
        NewEvent(
            body=(
                Verbatim(raw=msgspec.Raw(b'{"k":\n%d}' % i))
                if i % 7 == 0
                else Counted(writer=i, seq=i)
                if i % 2
                else Noted(text=f"line\r\n{i}\u2028")
            ),
            run_id=run if i % 3 else None,
            producer=None if i % 5 else "p\n",
            recorded_at=datetime.now(UTC) - timedelta(days=i),
        )
        for i in range(COPY_THRESHOLD * 2)
    ]
    result = await log.append("s-mixed", events, NO_STREAM)
    assert result.stream_version == len(events)
    want = reference("s-mixed", 0, events)
    rows = await admin.fetch(
        f'SELECT data::text, prev_hash, hash, position FROM "{log.schema}".events '
        "WHERE stream_id = $1 ORDER BY stream_version",
        "s-mixed",
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [(w[0], w[2], w[3]) for w in want]
    assert [p.position for p in result.positions] == [r[3] for r in rows]
    # A second batch on the remembered head, then the whole log verified.
    more = [NewEvent(body=Noted(text=str(i))) for i in range(COPY_THRESHOLD)]
    again = await log.append("s-mixed", more, len(events))
    assert again.stream_version == len(events) + len(more)
    report = await audit.verify(admin, log.schema)
    assert report.ok, report.problems
    assert report.events == len(events) + len(more)


# The COPY path reads positions back as the first and last rows' when they span the
# batch exactly, and writes on a head it knows without reading it first.
BIG = COPY_THRESHOLD + 36


async def test_copy_positions_with_gaps_are_read_one_by_one(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    """Positions that do not follow each other (another writer took some in between)
    come back as stored, in stream order."""
    await admin.execute(
        f'ALTER TABLE "{log.schema}".events ALTER COLUMN position SET INCREMENT BY 3'
    )
    result = await log.append("s-gaps", [Noted(text=str(i)) for i in range(BIG)], NO_STREAM)
    stored = await log.read_stream("s-gaps")
    assert [e.log_position for e in stored] == result.positions
    assert result.positions[1].position - result.positions[0].position == 3
    await admin.execute(
        f'ALTER TABLE "{log.schema}".events ALTER COLUMN position SET INCREMENT BY 1'
    )
    more = await log.append("s-gaps", [Noted(text=str(i)) for i in range(BIG)], BIG)
    stored = await log.read_stream("s-gaps", BIG + 1)
    assert [e.log_position for e in stored] == more.positions
    assert len({p.tx for p in more.positions}) == 1


async def test_copy_on_a_known_head_that_moved(log: EventLog, admin: asyncpg.Connection) -> None:
    """A new stream that exists already, and a remembered head another writer moved:
    typed conflicts with the actual version, nothing written; the chain intact."""
    other = EventLog(log.pool, schema=log.schema)
    await other.append("s-taken", [Noted(text="first")], NO_STREAM)
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append("s-taken", [Noted(text=str(i)) for i in range(BIG)], NO_STREAM)
    assert (info.value.expected, info.value.actual) == (NO_STREAM, 1)

    await log.append("s-moved", [Noted(text=str(i)) for i in range(BIG)], NO_STREAM)
    await other.append("s-moved", [Noted(text="theirs")], BIG)
    late = [NewEvent(body=Noted(text=str(i))) for i in range(BIG)]
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append("s-moved", late, BIG)
    assert (info.value.expected, info.value.actual) == (BIG, BIG + 1)
    fits = await log.append("s-moved", late, BIG + 1)
    assert fits.stream_version == 2 * BIG + 1
    stored = await log.read_stream("s-moved")
    assert [e.stream_version for e in stored] == list(range(1, 2 * BIG + 2))
    assert [e.log_position for e in stored[BIG + 1 :]] == fits.positions
    # Re-appending the same large batch, with its head remembered, is idempotent.
    again = await log.append("s-moved", late, BIG + 1)
    assert (again.inserted, again.positions) == (False, fits.positions)
    assert await log.stream_version("s-taken") == 1
    report = await audit.verify(admin, log.schema)
    assert report.ok, report.problems
    assert report.events == 2 * BIG + 2
