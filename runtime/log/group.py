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
queue).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import asyncpg
import structlog

from runtime.errors import InvalidAppend
from runtime.events.model import LogPosition, NewEvent, RecordedEvent
from runtime.log import chain
from runtime.log.store import EventLog

log = structlog.get_logger(__name__)

#: How often a flush is tried when the connection drops under it.
FLUSH_ATTEMPTS = 5


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


@dataclasses.dataclass(slots=True)
class _Pending:
    stream_id: str
    version: int
    row: tuple[Any, ...]
    event_id: Any
    hash: bytes
    done: asyncio.Future[Written]


class GroupWriter:
    """Appends single events at known versions, many per statement (see the module doc)."""

    def __init__(
        self,
        log: EventLog,
        *,
        max_batch: int = 256,
        max_waiting: int = 4096,
        attempts: int = FLUSH_ATTEMPTS,
    ) -> None:
        if max_batch < 1 or max_waiting < 1 or attempts < 1:
            raise ValueError("max_batch, max_waiting and attempts must be at least 1")
        self.log = log
        self.max_batch = max_batch
        self.attempts = attempts
        self._room = asyncio.Semaphore(max_waiting)
        self._waiting: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
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
            "SELECT position, tx_id, event_id, stream_id, stream_version, event_type, "
            "schema_version, run_id, causation_id, producer, recorded_at, trace, data, "
            f"prev_hash, hash FROM {q}.events e JOIN unnest($1::text[], $2::bigint[]) "
            "AS w(s, v) ON e.stream_id = w.s AND e.stream_version = w.v"
        )
        #: Flushes done and rows written (for the benchmark and tests).
        self.flushes = 0
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
        async with self._room:
            self._waiting.append(item)
            if self._flusher is None:
                self._flusher = asyncio.create_task(self._flush_all(), name="group-writer")
            return await asyncio.shield(item.done)

    async def drain(self) -> None:
        """Wait until the appends in hand are written (or have failed)."""
        task = self._flusher
        if task is not None:
            await asyncio.shield(task)

    async def _flush_all(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: self.max_batch]
                try:
                    await self._flush(batch)
                except BaseException as exc:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                        raise
        finally:
            self._flusher = None
            if self._waiting:
                # Cancelled with appends still waiting: they are told, not left hanging.
                for item in self._waiting:
                    if not item.done.done():
                        item.done.set_exception(RuntimeError("the group writer stopped"))
                self._waiting.clear()

    async def _flush(self, batch: list[_Pending]) -> None:
        delay = 0.05
        for attempt in range(1, self.attempts + 1):
            try:
                await self._write(batch)
                return
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
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
            self.flushes += 1
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
