"""Group commit: single-event appends from many tasks, written together in one statement.

A worker runs many activations at once, and each durable step must be in the
log before its handler goes on (promise 3). Written one by one, every step
is its own transaction: a round trip and a WAL flush each. The
:class:`GroupWriter` takes the appends that are waiting, writes them in ONE
``INSERT ... ON CONFLICT DO NOTHING`` (one transaction, one flush), and then
releases each waiting task once its own row is durable. While a flush is in
flight the next appends gather behind it; the next flush starts as soon as
the writer is free, so a lone append pays no added wait.

Each append names the version its event takes in its stream and the hash of
the event before it (the caller knows both: a step is appended right after
the steps it read or wrote), so the chain is computed here and no row waits
on another stream's lock. A row that meets another event at its version
(another worker recorded that step first) is answered to its own caller
alone, with the event the log holds; its neighbours in the batch are written
regardless. A row found already in place with its own id (a retried flush
whose first try committed) counts as written.

A lost connection is retried (the same rows: a repeat is harmless, see
above); only after ``attempts`` failures is the error raised, to every
caller of that flush, none of which goes on believing its event durable.
Back-pressure: at most ``max_waiting`` appends wait at once; further callers
wait for room (a slow database slows the activations, it does not grow this
queue). With room, an append is queued before its caller first yields, so a
caller cancelled while it waits (a handler's timeout, a stop) still leaves
its row to be written: the result it paid for is not lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
import structlog

from runtime.errors import ConcurrencyConflict, DuplicateEventMismatch, InvalidAppend
from runtime.events.model import LogPosition, NewEvent, RecordedEvent
from runtime.log import chain
from runtime.log.store import EVENT_COLUMNS, EventLog
from runtime.ops import metrics

log = structlog.get_logger(__name__)

#: How often a flush is tried when the connection drops under it.
FLUSH_ATTEMPTS = 5
#: The errors of a connection lost (the statement may or may not have committed).
LOST_CONNECTION = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


@dataclasses.dataclass(frozen=True, slots=True)
class Written:
    """What the log holds at the version an append asked for."""

    #: The event at that version: the caller's own (``ours``) or the one another writer put there.
    position: LogPosition
    #: The hash at that version (the next append of the stream links to it).
    hash: bytes
    #: True when it is the caller's event.
    ours: bool
    #: The other writer's event, when ``ours`` is False.
    winner: RecordedEvent | None = None


class _Waits(Protocol):
    done: asyncio.Future[Any]


P = TypeVar("P", bound=_Waits)


@dataclasses.dataclass(slots=True)
class _Pending:
    stream_id: str
    version: int
    row: tuple[Any, ...]
    event_id: Any
    hash: bytes
    done: asyncio.Future[Written]


class Batcher(Generic[P]):
    """One writer for many waiting tasks: what is waiting goes out together.

    The first item finds the writer idle and starts a flush at once; items
    arriving meanwhile wait behind it and go out together in the next one
    (at most ``max_batch`` per flush). At most ``max_waiting`` items wait at
    once; further callers wait for room. A subclass writes a batch and
    answers every item's ``done`` (:meth:`_write`). A lost connection out of
    :meth:`_flush` is given to every item of the batch still unanswered; any
    other error has the batch written again one item at a time, so it
    reaches only the item that caused it.
    """

    #: Errors that fail the whole batch (the rest are retried one item at a time).
    lost: tuple[type[BaseException], ...] = LOST_CONNECTION

    def __init__(self, *, max_batch: int, max_waiting: int) -> None:
        if max_batch < 1 or max_waiting < 1:
            raise ValueError("max_batch and max_waiting must be at least 1")
        self.max_batch = max_batch
        self._room = asyncio.Semaphore(max_waiting)
        self._waiting: list[P] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Flushes done (for the benchmark and tests).
        self.flushes = 0
        self._sizes = metrics.GROUP_FLUSH_SIZE.labels(type(self).__name__)

    async def _submit(self, item: P) -> Any:
        # Returns at once unless max_waiting items wait (then the caller waits here).
        await self._room.acquire()
        self._waiting.append(item)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_all(), name=type(self).__name__)
        # A cancelled caller cancels only its own answer; the item is written
        # with its batch, and its room given back when it is answered.
        return await item.done

    async def drain(self) -> None:
        """Wait until the items in hand are written (or have failed)."""
        task = self._flusher
        if task is not None:
            await asyncio.shield(task)

    async def _flush_all(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: self.max_batch]
                self._sizes.observe(len(batch))
                try:
                    await self._flush(batch)
                    self.flushes += 1
                except Exception as exc:
                    if len(batch) > 1 and not isinstance(exc, self.lost):
                        # One item's fault (data the database refuses, a type this
                        # process cannot decode): each alone, so only its owner hears.
                        await self._one_by_one(batch)
                    else:
                        self._fail(batch, exc)
                except BaseException as exc:
                    self._fail(batch, exc)
                    raise
                finally:
                    for _ in batch:
                        self._room.release()
        finally:
            self._flusher = None
            # Cancelled with items still waiting: they are told, not left hanging.
            for item in self._waiting:
                if not item.done.done():
                    item.done.set_exception(RuntimeError(f"{type(self).__name__} stopped"))
                self._room.release()
            self._waiting.clear()

    async def _one_by_one(self, batch: list[P]) -> None:
        for item in batch:
            if item.done.done():
                continue
            try:
                await self._flush([item])
            except Exception as exc:
                self._fail([item], exc)

    @staticmethod
    def _fail(batch: list[P], exc: BaseException) -> None:
        for item in batch:
            if not item.done.done():
                item.done.set_exception(exc)

    async def _flush(self, batch: list[P]) -> None:
        await self._write(batch)

    async def _write(self, batch: list[P]) -> None:
        raise NotImplementedError


@dataclasses.dataclass(slots=True)
class _Read:
    stream_id: str
    done: asyncio.Future[list[RecordedEvent]]


class StreamReads(Batcher[_Read]):
    """Whole short streams (an activation's steps) read for many callers in one query."""

    def __init__(self, log: EventLog, *, max_batch: int = 256, max_waiting: int = 4096) -> None:
        super().__init__(max_batch=max_batch, max_waiting=max_waiting)
        self.log = log
        self._sql = (
            f'SELECT {EVENT_COLUMNS} FROM "{log.schema}".events '
            "WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, stream_version"
        )

    async def read(self, stream_id: str) -> list[RecordedEvent]:
        """Every event of ``stream_id``, in version order."""
        done: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        events: list[RecordedEvent] = await self._submit(_Read(stream_id, done))
        return events

    async def _write(self, batch: list[_Read]) -> None:
        rows = await self.log.pool.fetch(self._sql, list({r.stream_id for r in batch}))
        by_stream: dict[str, list[RecordedEvent]] = {}
        for event in self.log._decode_all(rows):
            by_stream.setdefault(event.stream_id, []).append(event)
        for r in batch:
            if not r.done.done():
                r.done.set_result(by_stream.get(r.stream_id, []))


class GroupWriter(Batcher[_Pending]):
    """Appends single events at known versions, many per statement (see the module doc)."""

    def __init__(
        self,
        log: EventLog,
        *,
        max_batch: int = 256,
        max_waiting: int = 4096,
        attempts: int = FLUSH_ATTEMPTS,
    ) -> None:
        super().__init__(max_batch=max_batch, max_waiting=max_waiting)
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.log = log
        self.attempts = attempts
        #: Reads of the activations' recorded steps, batched the same way.
        self.reads = StreamReads(log)
        q = f'"{log.schema}"'
        self._sql_insert = (
            f"INSERT INTO {q}.events (event_id, stream_id, stream_version, event_type, "
            "schema_version, run_id, causation_id, producer, recorded_at, trace, data, "
            "prev_hash, hash) SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], "
            "$4::text[], $5::int[], $6::uuid[], $7::uuid[], $8::text[], $9::timestamptz[], "
            "$10::text[], $11::json[], $12::bytea[], $13::bytea[]) "
            "ON CONFLICT DO NOTHING RETURNING event_id, tx_id, position"
        )
        self._sql_at = (
            f"SELECT {EVENT_COLUMNS} FROM {q}.events JOIN unnest($1::text[], $2::bigint[]) "
            "AS w(s, v) ON stream_id = w.s AND stream_version = w.v"
        )
        #: Rows written (for the benchmark and tests).
        self.rows = 0

    async def append(
        self, stream_id: str, event: NewEvent, version: int, prev_hash: bytes
    ) -> Written:
        """Append ``event`` as version ``version`` of ``stream_id``, whose version
        ``version - 1`` has hash ``prev_hash`` (:data:`chain.GENESIS` for the first).

        Returns once the row is durable, or once the log is known to hold
        another event at that version (``Written.ours`` False). Cancelling the
        caller does not take the row out of its flush: shield the call if the
        caller must learn the outcome.
        """
        if version < 1 or len(prev_hash) != 32:
            raise InvalidAppend(f"append to {stream_id!r}: version {version} / prev hash invalid")
        batch = self.log._encode(stream_id, [event], None)
        hash_ = chain.link(prev_hash, version, batch.contents[0], stream_id)
        row = batch.row(0, version, prev_hash, hash_)
        done: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        item = _Pending(stream_id, version, row, batch.ids[0], hash_, done)
        written: Written = await self._submit(item)
        return written

    async def _flush(self, batch: list[_Pending]) -> None:
        delay = 0.05
        for attempt in range(1, self.attempts + 1):
            try:
                await self._write(batch)
                return
            except LOST_CONNECTION as exc:
                if attempt == self.attempts:
                    raise
                log.warning("group_writer.retry", rows=len(batch), attempt=attempt,
                            error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _write(self, batch: list[_Pending]) -> None:
        columns = list(zip(*(item.row for item in batch), strict=True))
        pool = self.log.pool
        async with pool.acquire() as conn:
            rows = await conn.fetch(self._sql_insert, *columns)
            self.rows += len(rows)
            written = {r[0]: LogPosition(r[1], r[2]) for r in rows}
            missed = [item for item in batch if item.event_id not in written]
            found: dict[tuple[str, int], RecordedEvent] = {}
            if missed:
                # Someone else's event at that version, or ours from an earlier try.
                at = await conn.fetch(self._sql_at, [m.stream_id for m in missed],
                                      [m.version for m in missed])  # fmt: skip
                found = {(e.stream_id, e.stream_version): e for e in self.log._decode_all(at)}
        for item in batch:
            position = written.get(item.event_id)
            if position is not None:
                result = Written(position, item.hash, True)
            else:
                there = found.get((item.stream_id, item.version))
                if there is None:
                    # Not at its version, yet refused: its event id is taken by
                    # another event (a caller bug, never a race).
                    item.done.set_exception(InvalidAppend(
                        f"event {item.event_id} is in the log already, elsewhere than "
                        f"{item.stream_id!r} version {item.version}"
                    ))  # fmt: skip
                    continue
                ours = there.event_id == item.event_id
                result = Written(there.log_position, there.hash, ours, None if ours else there)
            if not item.done.done():
                item.done.set_result(result)


@dataclasses.dataclass(slots=True)
class _Commit:
    stream_id: str
    expected: int | None
    marker: tuple[Any, ...]
    events: list[NewEvent]
    done: asyncio.Future[str]


class MarkedAppends(Batcher[_Commit]):
    """:meth:`EventLog.append_marked` for many callers at once: each caller's events and
    inbox row, several callers per transaction (``commit_activations`` in the
    migrations), each one's outcome reported to it alone.

    ``append`` answers ``committed``, ``duplicate`` (the inbox row was there:
    nothing of this caller's was written) or ``conflict`` (its append lost a
    race: nothing of its was written; the caller retries on its own path).
    Errors (a lost connection) go to every caller of the flush, none of whose
    rows may be assumed written or not: the caller's retry finds out (the
    inbox row says). Not retried here for that reason.
    """

    def __init__(self, log: EventLog, *, max_batch: int = 64, max_waiting: int = 4096) -> None:
        # 64: each activation is a subtransaction, and PostgreSQL keeps the ids of
        # 64 per transaction in shared memory before it spills (subxid overflow).
        super().__init__(max_batch=max_batch, max_waiting=max_waiting)
        self.log = log
        self._sql = (
            f'SELECT * FROM "{log.schema}".commit_activations($1, $2, $3, $4, $5, $6, $7, $8, '
            "$9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
        )

    async def append(
        self,
        stream_id: str,
        events: list[NewEvent],
        marker: tuple[Any, ...],
        expected: int | None,
    ) -> str:
        """Append ``events`` and insert the inbox row ``marker`` (consumer, event id,
        activation id, outcome, run id) atomically, in the next shared transaction."""
        if not events:
            raise InvalidAppend(f"append to {stream_id!r}: no events given")
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        outcome: str = await self._submit(_Commit(stream_id, expected, marker, events, done))
        return outcome

    async def _write(self, batch: list[_Commit]) -> None:
        if len(batch) == 1:
            # Alone: the single statement of append_marked (rows straight in when
            # the head is known) is quicker than the function's subtransaction.
            c = batch[0]
            outcome = await self._alone(c)
            if not c.done.done():  # its caller may have been cancelled meanwhile
                c.done.set_result(outcome)
            return
        # Streams in one order in every batch: two batches never wait on each other
        # in a cycle.
        ordered = sorted(batch, key=lambda c: c.stream_id)
        encoded = [self.log._encode(c.stream_id, c.events, c.expected) for c in ordered]
        ids: list[Any] = []
        types: list[Any] = []
        versions: list[Any] = []
        runs: list[Any] = []
        causes: list[Any] = []
        producers: list[Any] = []
        recorded: list[Any] = []
        traces: list[Any] = []
        datas: list[Any] = []
        contents: list[Any] = []
        for b in encoded:
            n = len(b.ids)
            ids += b.ids
            types += b.types
            versions += b.versions
            runs += b.runs if b.runs is not None else [None] * n
            causes += b.causes if b.causes is not None else [None] * n
            producers += b.producers if b.producers is not None else [None] * n
            recorded += b.recorded
            traces += b.traces if b.traces is not None else [None] * n
            datas += b.datas
            contents += b.contents
        markers = list(zip(*(c.marker for c in ordered), strict=True))
        rows = await self.log.pool.fetch(
            self._sql,
            [c.stream_id for c in ordered],
            [c.expected for c in ordered],
            [len(b.ids) for b in encoded],
            *markers,
            ids, types, versions, runs, causes, producers, recorded, traces, datas, contents,
        )  # fmt: skip
        for index, outcome, first, last_hash in rows:
            c = ordered[index - 1]
            if outcome == "committed":
                self.log._remember_head(c.stream_id, first + len(c.events) - 1, last_hash)
            if not c.done.done():
                c.done.set_result(outcome)

    async def _alone(self, c: _Commit) -> str:
        try:
            await self.log.append_marked(c.stream_id, c.events, c.marker, c.expected)
        except asyncpg.UniqueViolationError as exc:
            return "duplicate" if exc.constraint_name == "inbox_pkey" else "conflict"
        except (ConcurrencyConflict, DuplicateEventMismatch):
            return "conflict"
        return "committed"
