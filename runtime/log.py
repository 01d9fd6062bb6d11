"""The event log: append with optimistic concurrency, read by stream or in commit order, tail."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import structlog

from runtime import chain
from runtime.errors import (
    ConcurrencyConflict,
    DuplicateEventMismatch,
    InvalidAppend,
)
from runtime.events import (
    START,
    Event,
    EventRegistry,
    LogPosition,
    NewEvent,
    RecordedEvent,
    encode_body,
    event_type_of,
)
from runtime.events import (
    registry as default_registry,
)

log = structlog.get_logger(__name__)

#: ``expected_version`` for "whatever the stream's version is".
ANY_VERSION: None = None
#: ``expected_version`` for "the stream must not exist yet".
NO_STREAM = 0

_COLUMNS = (
    "position, tx_id, event_id, stream_id, stream_version, event_type, schema_version, run_id, "
    "causation_id, producer, recorded_at, trace, data, prev_hash, hash"
)
#: How often append retries a lost race when the caller accepts any version.
_ANY_VERSION_RETRIES = 10


class AppendResult(msgspec.Struct, frozen=True):
    stream_id: str
    #: The stream's version after the append (the version of its last event).
    stream_version: int
    positions: list[LogPosition]
    #: False when every event was already in the log (an idempotent re-append).
    inserted: bool


class EventLog:
    """Append-only event log in PostgreSQL.

    The log holds no connections of its own: it borrows from the pool it is
    given, or uses the connection passed to a call (so an activation can
    append inside its own transaction).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str = "agentrt",
        registry: EventRegistry = default_registry,
        notify: bool = True,
    ) -> None:
        self._pool = pool
        self.schema = schema
        self.registry = registry
        self.channel = f"agentrt_log_{schema}"
        self._notify = notify
        q = f'"{schema}"'
        self._sql_append = (
            f"SELECT * FROM {q}.append_events("
            "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        )
        self._sql_head = f"SELECT max(stream_version) FROM {q}.events WHERE stream_id = $1"
        self._sql_stream = (
            f"SELECT {_COLUMNS} FROM {q}.events WHERE stream_id = $1 AND stream_version >= $2 "
            "ORDER BY stream_version LIMIT $3"
        )
        # Only below the oldest transaction still running is the log final:
        # see LogPosition for why the order is (tx_id, position).
        self._sql_all = (
            f"SELECT {_COLUMNS} FROM {q}.events "
            "WHERE (tx_id, position) > ($1::xid8, $2::bigint) "
            "AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY tx_id, position LIMIT $3"
        )

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    # -- writing -----------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent | Event],
        expected_version: int | None = ANY_VERSION,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` in one round trip.

        ``expected_version`` is the number of events the stream must hold
        (``NO_STREAM`` for a new one, ``ANY_VERSION`` to skip the check);
        otherwise :class:`ConcurrencyConflict`. Appending events that are all
        in the log already returns their original positions. Passing ``conn``
        appends inside the caller's transaction, where a lost race is raised
        rather than retried (the transaction is aborted by then).
        """
        if not events:
            raise InvalidAppend(f"append to {stream_id!r}: no events given")
        if not stream_id or len(stream_id) > 200:
            raise InvalidAppend(f"stream id must be 1..200 characters, got {stream_id!r}")
        if expected_version is not None and expected_version < 0:
            raise InvalidAppend(f"expected_version must be >= 0, got {expected_version}")
        args = self._encode(stream_id, events, expected_version)
        if conn is not None:
            return await self._append_once(conn, stream_id, expected_version, args)
        attempts = _ANY_VERSION_RETRIES if expected_version is None else 2
        async with self._pool.acquire() as c:
            for attempt in range(attempts):
                try:
                    return await self._append_once(c, stream_id, expected_version, args)
                except asyncpg.UniqueViolationError:
                    # Another writer committed first: either the very same
                    # events (the retry returns them) or the same version.
                    if attempt == attempts - 1:
                        break
            actual = await c.fetchval(self._sql_head, stream_id) or 0
        raise ConcurrencyConflict(stream_id, expected_version, actual)

    async def _append_once(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        expected_version: int | None,
        args: tuple[Any, ...],
    ) -> AppendResult:
        try:
            rows = await conn.fetch(self._sql_append, *args)
        except asyncpg.PostgresError as exc:
            self._raise_typed(exc, stream_id, expected_version)
            raise
        return AppendResult(
            stream_id,
            rows[-1]["r_stream_version"],
            [LogPosition(r["r_tx_id"], r["r_position"]) for r in rows],
            bool(rows[0]["r_inserted"]),
        )

    @staticmethod
    def _raise_typed(exc: asyncpg.PostgresError, stream_id: str, expected: int | None) -> None:
        state = getattr(exc, "sqlstate", None)
        if state == "AR001":
            raise ConcurrencyConflict(stream_id, expected, int(exc.detail)) from None
        if state == "AR002":
            raise DuplicateEventMismatch(
                UUID(exc.detail),
                "a batch may be re-appended only as a whole",
            ) from None

    def _encode(
        self, stream_id: str, events: Sequence[NewEvent | Event], expected: int | None
    ) -> tuple[Any, ...]:
        n = len(events)
        ids: list[Any] = [None] * n
        types: list[str] = [""] * n
        versions: list[int] = [0] * n
        runs: list[Any] = [None] * n
        causes: list[Any] = [None] * n
        producers: list[str | None] = [None] * n
        recorded: list[Any] = [None] * n
        traces: list[str | None] = [None] * n
        datas: list[str] = [""] * n
        contents: list[bytes] = [b""] * n
        seen: set[Any] = set()
        for i, item in enumerate(events):
            ev = item if isinstance(item, NewEvent) else NewEvent(body=item)
            if not isinstance(ev.body, Event):
                raise InvalidAppend(f"event {i} of the batch is not an agentrt Event: {ev.body!r}")
            if ev.event_id in seen:
                raise InvalidAppend(f"event id {ev.event_id} appears twice in one batch")
            seen.add(ev.event_id)
            if ev.recorded_at.tzinfo is None:
                raise InvalidAppend(f"event {ev.event_id}: recorded_at must be timezone-aware")
            body = ev.body
            etype = event_type_of(body)
            version = type(body).__schema_version__
            data = encode_body(body)
            ids[i] = ev.event_id
            types[i] = etype
            versions[i] = version
            runs[i] = ev.run_id
            causes[i] = ev.causation_id
            producers[i] = ev.producer
            recorded[i] = ev.recorded_at
            traces[i] = ev.trace
            datas[i] = data.decode()
            contents[i] = chain.content_hash(
                event_id=ev.event_id,
                event_type=etype,
                schema_version=version,
                run_id=ev.run_id,
                causation_id=ev.causation_id,
                producer=ev.producer,
                recorded_at=ev.recorded_at,
                trace=ev.trace,
                data=data,
            )
        channel = self.channel if self._notify else None
        return (
            stream_id,
            expected,
            channel,
            ids,
            types,
            versions,
            runs,
            causes,
            producers,
            recorded,
            traces,
            datas,
            contents,
        )

    # -- reading -----------------------------------------------------------------

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (0 if it has no events)."""
        return int(await self._pool.fetchval(self._sql_head, stream_id) or 0)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, *, limit: int | None = None
    ) -> list[RecordedEvent]:
        """The stream's events from ``from_version`` on, in version order."""
        rows = await self._pool.fetch(self._sql_stream, stream_id, from_version, limit)
        return [self._decode(r) for r in rows]

    async def read_all(self, after: LogPosition = START, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events after ``after``, in the log's one stable order.

        Only events no running transaction can still precede are returned, so a
        reader that continues from the last event's ``log_position`` never
        skips one and never sees one twice.
        """
        rows = await self._pool.fetch(self._sql_all, after[0], after[1], limit)
        return [self._decode(r) for r in rows]

    async def read_last(self, n: int) -> list[RecordedEvent]:
        """The last ``n`` readable events, in log order (where ``tail`` starts)."""
        q = f'"{self.schema}"'
        rows = await self._pool.fetch(
            f"SELECT * FROM (SELECT {_COLUMNS} FROM {q}.events "
            "WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY tx_id DESC, position DESC LIMIT $1) last ORDER BY tx_id, position",
            n,
        )
        return [self._decode(r) for r in rows]

    async def subscribe(
        self,
        after: LogPosition = START,
        *,
        batch: int = 500,
        poll_interval: float = 0.5,
    ) -> AsyncIterator[RecordedEvent]:
        """Catch up from ``after``, then follow the log live.

        Appends NOTIFY the log's channel; a dedicated connection LISTENs and
        wakes the reader. A wake-up can be missed (a dropped connection, or
        events that become readable only when an older transaction ends), so
        the reader also polls every ``poll_interval`` seconds.
        """
        wake = asyncio.Event()
        listener: asyncpg.Connection | None = None

        def on_notify(*_: object) -> None:
            wake.set()

        try:
            listener = await self._pool.acquire()
            await listener.add_listener(self.channel, on_notify)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("log.listen_failed", error=str(exc), fallback="polling")
            if listener is not None:
                await self._pool.release(listener)
                listener = None
        position = after
        try:
            while True:
                wake.clear()
                events = await self.read_all(position, batch)
                for event in events:
                    position = event.log_position
                    yield event
                if len(events) == batch:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll_interval)
        finally:
            if listener is not None:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await listener.remove_listener(self.channel, on_notify)
                await self._pool.release(listener)

    def _decode(self, r: asyncpg.Record) -> RecordedEvent:
        event_type = r[5]
        schema_version = r[6]
        return RecordedEvent(
            position=r[0],
            tx=r[1],
            event_id=r[2],
            stream_id=r[3],
            stream_version=r[4],
            event_type=event_type,
            schema_version=schema_version,
            run_id=r[7],
            causation_id=r[8],
            producer=r[9],
            recorded_at=r[10],
            trace=r[11],
            body=self.registry.decode(event_type, schema_version, r[12]),
            prev_hash=r[13],
            hash=r[14],
        )
