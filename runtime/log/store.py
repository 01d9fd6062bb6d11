"""The event log: append with optimistic concurrency, read by stream or in commit order, tail."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from itertools import repeat
from operator import attrgetter
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import structlog

from runtime.errors import (
    ConcurrencyConflict,
    DuplicateEventMismatch,
    InvalidAppend,
)
from runtime.events.model import (
    START,
    START_CURSOR,
    Cursor,
    Event,
    EventRegistry,
    LogPosition,
    NewEvent,
    RecordedEvent,
    event_type_of,
)
from runtime.events.model import registry as default_registry
from runtime.log import chain

log = structlog.get_logger(__name__)

#: ``expected_version`` for "whatever the stream's version is".
ANY_VERSION: None = None
#: ``expected_version`` for "the stream must not exist yet".
NO_STREAM = 0

#: The columns of every read, in RecordedEvent's order.
EVENT_COLUMNS = (
    "position, tx_id, event_id, stream_id, stream_version, event_type, schema_version, run_id, "
    "causation_id, producer, recorded_at, trace, data, prev_hash, hash"
)
#: How often append retries a lost race when the caller accepts any version.
_ANY_VERSION_RETRIES = 10
#: Batches at least this large are written with COPY instead of the function.
COPY_THRESHOLD = 64
_COPY_COLUMNS = [
    "event_id", "stream_id", "stream_version", "event_type", "schema_version", "run_id",
    "causation_id", "producer", "recorded_at", "trace", "data", "prev_hash", "hash",
]  # fmt: skip
#: Batches at least this large are encoded by column (fewer Python calls per event,
#: more per batch).
_BY_COLUMN = 16
#: Streams whose head hash a log remembers (to compute their chain client-side).
_HEAD_CACHE = 4096


_body_encoder = msgspec.json.Encoder()
#: A NewEvent's fields, in the order _encode takes them apart (astuple, which is
#: faster, gives them so while NewEvent declares them in this order).
_NEW_EVENT_FIELDS = (
    "body",
    "event_id",
    "run_id",
    "causation_id",
    "producer",
    "trace",
    "recorded_at",
)
_new_event_fields: Callable[[Any], tuple[Any, ...]] = (
    msgspec.structs.astuple
    if NewEvent.__struct_fields__ == _NEW_EVENT_FIELDS
    else attrgetter(*_NEW_EVENT_FIELDS)
)
_tzinfo = attrgetter("tzinfo")


def _as_new(item: Any, i: int) -> NewEvent:
    if isinstance(item, NewEvent):
        return item
    if not isinstance(item, Event):
        raise InvalidAppend(f"event {i} of the batch is not an agentrt Event: {item!r}")
    return NewEvent(body=item)


class RawEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event already encoded, with every column the writer sets: what
    :meth:`EventLog.append_raw` takes (an import of another log's events, whose body
    types this process need not know). ``data`` is the stored JSON body, byte for
    byte: the content hash covers exactly these bytes."""

    event_id: UUID
    event_type: str
    schema_version: int
    data: bytes
    run_id: UUID | None = None
    causation_id: UUID | None = None
    producer: str | None = None
    trace: str | None = None
    recorded_at: datetime


def _log_positions(tx: int, positions: Sequence[int]) -> list[LogPosition]:
    """``[LogPosition(tx, p) for p in positions]``, without a Python call per position."""
    return list(map(tuple.__new__, repeat(LogPosition), zip(repeat(tx), positions)))


def _first(column: list[Any] | None) -> Any:
    return None if column is None else column[0]


def _nulls(values: list[Any]) -> list[Any] | None:
    """``None`` for a column that is all NULL: less to encode and send."""
    for value in values:
        if value is not None:
            return values
    return None


def _lost_race(
    exc: asyncpg.UniqueViolationError, stream_id: str, expected: int | None
) -> ConcurrencyConflict:
    """Another writer committed the same version, or the same events, first."""
    return ConcurrencyConflict(stream_id, expected, None)


@dataclasses.dataclass(slots=True)
class _Batch:
    """A batch encoded for the log: a list per column (None: a column of NULLs), each
    event's content hash, and, when this log knows the stream's head, the chain links
    (``links[i]`` is event i's previous hash, ``links[i + 1]`` its own)."""

    stream_id: str
    expected: int | None
    ids: list[Any]
    types: list[str]
    versions: list[int]
    runs: list[Any] | None
    causes: list[Any] | None
    producers: list[Any] | None
    recorded: list[Any]
    traces: list[Any] | None
    datas: list[str]
    contents: list[bytes]
    prev: bytes | None
    links: list[bytes] | None

    def args(self) -> tuple[Any, ...]:
        """The parameters of the ``append_events`` function, in its order."""
        return (self.stream_id, self.expected, self.ids, self.types, self.versions, self.runs,
                self.causes, self.producers, self.recorded, self.traces, self.datas,
                self.contents, self.prev, self.links)  # fmt: skip

    def row(self, i: int, version: int, prev_hash: bytes, hash_: bytes) -> tuple[Any, ...]:
        """Event ``i`` as a row of ``events`` (the columns of ``_COPY_COLUMNS``)."""
        return (
            self.ids[i], self.stream_id, version, self.types[i], self.versions[i],
            self.runs[i] if self.runs is not None else None,
            self.causes[i] if self.causes is not None else None,
            self.producers[i] if self.producers is not None else None,
            self.recorded[i],
            self.traces[i] if self.traces is not None else None,
            self.datas[i], prev_hash, hash_,
        )  # fmt: skip

    def rows(self, version: int, links: list[bytes]) -> list[tuple[Any, ...]]:
        """Every event as :meth:`row` gives it, the first at ``version + 1``, chained
        by ``links`` (as :func:`chain.links` returns them): one ``zip``, no call per row."""
        none = repeat(None)
        return list(zip(
            self.ids, repeat(self.stream_id), range(version + 1, version + 1 + len(self.ids)),
            self.types, self.versions,
            none if self.runs is None else self.runs,
            none if self.causes is None else self.causes,
            none if self.producers is None else self.producers,
            self.recorded,
            none if self.traces is None else self.traces,
            self.datas, links, links[1:],
        ))  # fmt: skip


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
    ) -> None:
        self._pool = pool
        self.schema = schema
        self.registry = registry
        self.channel = f"agentrt_log_{schema}"
        self._body = registry.decode
        q = f'"{schema}"'
        self._sql_append = (
            f"SELECT * FROM {q}.append_events("
            "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        )
        # When the writer knows the stream's head (its own last append, or a
        # new stream) the rows go straight in: versions head+1.. collide at the
        # unique (stream_id, stream_version) index with any writer that moved
        # the head meanwhile, and the head can never be below what this log
        # itself wrote, so no version check is needed.
        self._sql_append_marked = (
            f"WITH marked AS (INSERT INTO {q}.inbox "
            "(consumer, event_id, activation_id, outcome, run_id) "
            "VALUES ($15, $16, $17, $18, $19)) "
            f"SELECT * FROM {q}.append_events("
            "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        )
        self._sql_insert = (
            f"INSERT INTO {q}.events (event_id, stream_id, stream_version, event_type, "
            "schema_version, run_id, causation_id, producer, recorded_at, trace, data, "
            "prev_hash, hash) "
            "SELECT u.id, $1, $2 + u.ord, u.typ, u.ver, u.run, u.cause, u.producer, u.recorded, "
            "u.trace, u.data, u.prev, u.hash FROM unnest($3::uuid[], $4::text[], $5::int[], "
            "$6::uuid[], $7::uuid[], $8::text[], $9::timestamptz[], $10::text[], $11::json[], "
            "$12::bytea[], $13::bytea[]) WITH ORDINALITY "
            "AS u(id, typ, ver, run, cause, producer, recorded, trace, data, prev, hash, ord) "
            "RETURNING tx_id, position, stream_version"
        )
        #: n -> the marked INSERT of n rows (see _marked_values).
        self._marked_sql: dict[int, str] = {}
        self._sql_insert_one = (
            f"INSERT INTO {q}.events (event_id, stream_id, stream_version, event_type, "
            "schema_version, run_id, causation_id, producer, recorded_at, trace, data, "
            "prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
            "RETURNING tx_id, position, stream_version"
        )
        self._sql_existing = f"SELECT * FROM {q}.existing_events($1)"
        self._sql_head_row = (
            f"SELECT stream_version, hash FROM {q}.events WHERE stream_id = $1 "
            "ORDER BY stream_version DESC LIMIT 1"
        )
        # The first and last rows of a COPY: positions come from one sequence, row
        # by row in the order sent, so when they span exactly n they are every
        # position in between, in stream order.
        self._sql_ends = (
            f"SELECT f.tx_id, f.position, l.position FROM {q}.events f, {q}.events l "
            "WHERE f.stream_id = $1 AND f.stream_version = $2 "
            "AND l.stream_id = $1 AND l.stream_version = $3"
        )
        self._sql_positions = (
            "SELECT (array_agg(tx_id))[1], array_agg(position ORDER BY stream_version) "
            f"FROM {q}.events WHERE stream_id = $1 AND stream_version > $2 "
            "AND stream_version <= $3"
        )
        #: stream -> (version, hash) of the last event this log appended there.
        self._heads: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._sql_head = f"SELECT max(stream_version) FROM {q}.events WHERE stream_id = $1"
        self._sql_stream = (
            f"SELECT {EVENT_COLUMNS} FROM {q}.events WHERE stream_id = $1 AND stream_version >= $2 "
            "ORDER BY stream_version LIMIT $3"
        )
        self._sql_run = (
            f"SELECT {EVENT_COLUMNS} FROM {q}.events WHERE run_id = $1 ORDER BY tx_id, position"
        )
        # Which of the given cursors still hold the event they name (c.id NULL: a
        # bare position, only checked to exist).
        self._sql_confirm = (
            "SELECT c.i FROM unnest($1::text[], $2::bigint[], $3::uuid[]) "
            "WITH ORDINALITY AS c(tx, pos, id, i) "
            f"JOIN {q}.events e ON e.tx_id = c.tx::xid8 AND e.position = c.pos "
            "AND (c.id IS NULL OR e.event_id = c.id)"
        )
        # Only below the oldest transaction still running is the log final:
        # see LogPosition for why the order is (tx_id, position).
        self._sql_all = (
            f"SELECT {EVENT_COLUMNS} FROM {q}.events "
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
        self._check_append(stream_id, events, expected_version)
        batch = self._encode(stream_id, events, expected_version)
        return await self._append_batch(stream_id, batch, expected_version, conn)

    async def append_raw(
        self,
        stream_id: str,
        events: Sequence[RawEvent],
        expected_version: int | None = ANY_VERSION,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> AppendResult:
        """:meth:`append` for events whose bodies are encoded already (an import).

        The body bytes are stored as given and the chain is computed over them as
        :meth:`append` computes it, so events exported from another log come out
        with the very hashes they had there. The same contract otherwise:
        ``expected_version``, idempotent re-appends, ``conn``. The bytes must be
        one JSON value (PostgreSQL's ``json`` type checks it); nothing else is
        checked here, so a caller that did not verify what it appends gets a
        chain over whatever it sent.
        """
        self._check_append(stream_id, events, expected_version)
        batch = self._encode_raw(stream_id, events, expected_version)
        return await self._append_batch(stream_id, batch, expected_version, conn)

    @staticmethod
    def _check_append(stream_id: str, events: Sequence[Any], expected_version: int | None) -> None:
        if not events:
            raise InvalidAppend(f"append to {stream_id!r}: no events given")
        if not stream_id or len(stream_id) > 200:
            raise InvalidAppend(f"stream id must be 1..200 characters, got {stream_id!r}")
        if expected_version is not None and expected_version < 0:
            raise InvalidAppend(f"expected_version must be >= 0, got {expected_version}")

    async def _append_batch(
        self,
        stream_id: str,
        batch: _Batch,
        expected_version: int | None,
        conn: asyncpg.Connection | None,
    ) -> AppendResult:
        if conn is not None:
            try:
                return await self._append_once(conn, stream_id, expected_version, batch, False)
            except asyncpg.UniqueViolationError as exc:
                # The caller's transaction is aborted: its owner retries it.
                raise _lost_race(exc, stream_id, expected_version) from exc
            finally:
                # The caller's transaction may still roll back: a head
                # remembered from it could let a later append skip a version.
                self._heads.pop(stream_id, None)
        attempts = _ANY_VERSION_RETRIES if expected_version is None else 2
        async with self._pool.acquire() as c:
            for attempt in range(attempts):
                try:
                    return await self._append_once(
                        c, stream_id, expected_version, batch, attempt == 0
                    )
                except asyncpg.UniqueViolationError:
                    # Another writer got there first: with these very events (a
                    # re-append, or a concurrent writer of the same batch), or
                    # with the same versions. Which one, the log itself says.
                    try:
                        row = await c.fetchrow(self._sql_existing, batch.ids)
                    except asyncpg.PostgresError as lookup:
                        self._raise_typed(lookup, stream_id, expected_version)
                        raise
                    if row is not None:
                        return self._result(stream_id, row)
                    # Not ours: try again, which fits the new head or is a
                    # typed conflict.
            actual = await c.fetchval(self._sql_head, stream_id) or 0
        raise ConcurrencyConflict(stream_id, expected_version, actual)

    async def append_marked(
        self,
        stream_id: str,
        events: Sequence[NewEvent | Event],
        marker: Sequence[Any],
        expected_version: int | None = ANY_VERSION,
    ) -> AppendResult:
        """Append (any version) and insert the inbox row ``marker`` in ONE statement.

        ``marker`` is (consumer, event id, activation id, outcome, run id). One
        statement is one atomic transaction and one round trip: the worker's
        commit. Errors are raised as they come (a unique violation on
        ``inbox_pkey`` means the activation was committed already; on the
        events table, a lost race): the caller decides.
        """
        if not events:
            raise InvalidAppend(f"append to {stream_id!r}: no events given")
        batch = self._encode(stream_id, events, expected_version)
        links = batch.links
        if links is None or batch.expected is None or len(batch.ids) >= COPY_THRESHOLD:
            try:
                row = await self._pool.fetchrow(self._sql_append_marked, *batch.args(), *marker)
            except asyncpg.PostgresError as exc:
                self._raise_typed(exc, stream_id, expected_version)
                raise
            return self._result(stream_id, row)
        # The head is known (a new stream, or this log's last append to it): the
        # chain was computed here and the rows go straight in, as in
        # _insert_known_head; a writer that moved the head meets the unique index.
        expected = batch.expected
        n = len(batch.ids)
        # Scalars for a few rows (an activation's usual batch): asyncpg encodes
        # them faster than the unnest arrays, which pay a type check per element.
        params: list[Any] = []
        for i in range(n):
            params += batch.row(i, expected + i + 1, links[i], links[i + 1])
        rows = await self._pool.fetch(self._marked_values(n), *params, *marker)
        rows.sort(key=lambda r: r[2])
        version = expected + n
        self._remember_head(stream_id, version, links[-1])
        return AppendResult(stream_id, version, [LogPosition(r[0], r[1]) for r in rows], True)

    def _marked_values(self, n: int) -> str:
        """``INSERT ... VALUES`` of ``n`` rows with the inbox row in a CTE (built once per n)."""
        sql = self._marked_sql.get(n)
        if sql is None:
            rows = ", ".join(
                "(" + ", ".join(f"${13 * i + c}" for c in range(1, 14)) + ")" for i in range(n)
            )
            m = 13 * n
            q = f'"{self.schema}"'
            sql = self._marked_sql[n] = (
                f"WITH marked AS (INSERT INTO {q}.inbox "
                "(consumer, event_id, activation_id, outcome, run_id) "
                f"VALUES (${m + 1}, ${m + 2}, ${m + 3}, ${m + 4}, ${m + 5})) "
                f"INSERT INTO {q}.events (event_id, stream_id, stream_version, event_type, "
                "schema_version, run_id, causation_id, producer, recorded_at, trace, data, "
                f"prev_hash, hash) VALUES {rows} RETURNING tx_id, position, stream_version"
            )
        return sql

    async def _append_once(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        expected_version: int | None,
        batch: _Batch,
        trust_head: bool,
    ) -> AppendResult:
        """One try. ``trust_head``: a large batch whose chain was computed on the head
        this log knows goes straight in (the first try on the log's own connection)."""
        if len(batch.ids) >= COPY_THRESHOLD:
            return await self._append_copy(conn, stream_id, expected_version, batch, trust_head)
        if batch.links is not None:
            return await self._insert_known_head(conn, stream_id, batch)
        try:
            row = await conn.fetchrow(self._sql_append, *batch.args())
        except asyncpg.PostgresError as exc:
            self._raise_typed(exc, stream_id, expected_version)
            raise
        return self._result(stream_id, row)

    async def _insert_known_head(
        self, conn: asyncpg.Connection, stream_id: str, b: _Batch
    ) -> AppendResult:
        expected, links = b.expected, b.links
        assert expected is not None and links is not None
        ids, types, versions, runs, causes, producers, recorded, traces, datas = (
            b.ids, b.types, b.versions, b.runs, b.causes, b.producers, b.recorded, b.traces,
            b.datas,
        )  # fmt: skip
        if len(ids) == 1:
            rows = [await conn.fetchrow(
                self._sql_insert_one, ids[0], stream_id, expected + 1, types[0], versions[0],
                _first(runs), _first(causes), _first(producers), recorded[0], _first(traces),
                datas[0], links[0], links[1],
            )]  # fmt: skip
        else:
            rows = await conn.fetch(
                self._sql_insert, stream_id, expected, ids, types, versions, runs, causes,
                producers, recorded, traces, datas, links[:-1], links[1:],
            )  # fmt: skip
            rows.sort(key=lambda r: r[2])
        version = expected + len(ids)
        self._remember_head(stream_id, version, links[-1])
        return AppendResult(stream_id, version, [LogPosition(r[0], r[1]) for r in rows], True)

    async def _append_copy(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        expected: int | None,
        batch: _Batch,
        trust_head: bool,
    ) -> AppendResult:
        """A large batch: check the head, COPY the rows, read their positions back.

        The same contract as ``append_events``, which costs an array per column
        and an unnest: about twice COPY's time for a thousand events. No
        transaction is needed around the check: the rows take versions
        head+1.., so a writer that moved the head meanwhile took those very
        versions and the COPY meets the unique (stream_id, stream_version)
        index; and COPY itself is all or nothing. For the same reason the head
        need not be read when this log knows it (a new stream, or its own last
        append there: ``batch.links``) and ``trust_head``: a COPY that meets
        the index is answered by the caller's retry, which reads the head.
        """
        ids, contents = batch.ids, batch.contents
        n = len(ids)
        if trust_head and batch.links is not None:
            assert expected is not None
            version, links = expected, batch.links
        else:
            head = await conn.fetchrow(self._sql_head_row, stream_id)
            version, h = (head[0], head[1]) if head is not None else (0, chain.GENESIS)
            if expected is not None and version != expected:
                try:
                    row = await conn.fetchrow(self._sql_existing, ids)
                except asyncpg.PostgresError as exc:
                    self._raise_typed(exc, stream_id, expected)
                    raise
                if row is not None:
                    return self._result(stream_id, row)
                raise ConcurrencyConflict(stream_id, expected, version)
            known = batch.links
            links = (
                known
                if known is not None and batch.prev == h and batch.expected == version
                else chain.links(h, version, contents, stream_id)
            )
        await conn.copy_records_to_table(
            "events", schema_name=self.schema, columns=_COPY_COLUMNS,
            records=batch.rows(version, links),
        )  # fmt: skip
        tx, first, last = await conn.fetchrow(self._sql_ends, stream_id, version + 1, version + n)
        if last - first + 1 == n:
            positions: Sequence[int] = range(first, last + 1)
        else:  # another writer took positions in between
            tx, positions = await conn.fetchrow(
                self._sql_positions, stream_id, version, version + n
            )
        self._remember_head(stream_id, version + n, links[-1])
        return AppendResult(stream_id, version + n, _log_positions(tx, positions), True)

    def _result(self, stream_id: str, row: asyncpg.Record) -> AppendResult:
        tx, first, positions, inserted, last_hash = row
        version = first + len(positions) - 1
        if inserted:
            self._remember_head(stream_id, version, last_hash)
        return AppendResult(stream_id, version, [LogPosition(tx, p) for p in positions], inserted)

    def _remember_head(self, stream_id: str, version: int, head_hash: bytes) -> None:
        heads = self._heads
        heads[stream_id] = (version, head_hash)
        heads.move_to_end(stream_id)
        if len(heads) > _HEAD_CACHE:
            heads.popitem(last=False)

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
    ) -> _Batch:
        """The batch for the log: its columns, content hashes and, when the head is
        known, its chain. A few events one at a time; more by column."""
        if len(events) < _BY_COLUMN:
            return self._encode_each(stream_id, events, expected)
        return self._encode_columns(stream_id, events, expected)

    def _encode_each(
        self, stream_id: str, events: Sequence[NewEvent | Event], expected: int | None
    ) -> _Batch:
        if not events:
            raise InvalidAppend(f"append to {stream_id!r}: no events given")
        ids: list[Any] = []
        types: list[str] = []
        versions: list[int] = []
        runs: list[Any] = []
        causes: list[Any] = []
        producers: list[str | None] = []
        recorded: list[Any] = []
        traces: list[str | None] = []
        datas: list[str] = []
        contents: list[bytes] = []
        tags: dict[type, tuple[str, int]] = {}
        content_hash = chain.content_hash_raw
        encode = _body_encoder.encode
        for i, item in enumerate(events):
            ev = item if type(item) is NewEvent else _as_new(item, i)
            body = ev.body
            cls = type(body)
            tag = tags.get(cls)
            if tag is None:
                if not isinstance(body, Event):
                    raise InvalidAppend(f"event {i} of the batch is not an agentrt Event: {body!r}")
                tag = tags[cls] = (event_type_of(body), body.__schema_version__)
            etype, version = tag
            event_id, run_id, cause, producer, at, trace = (
                ev.event_id, ev.run_id, ev.causation_id, ev.producer, ev.recorded_at, ev.trace
            )  # fmt: skip
            if at.tzinfo is None:
                raise InvalidAppend(f"event {event_id}: recorded_at must be timezone-aware")
            data = encode(body)
            ids.append(event_id)
            types.append(etype)
            versions.append(version)
            runs.append(run_id)
            causes.append(cause)
            producers.append(producer)
            recorded.append(at)
            traces.append(trace)
            datas.append(data.decode())
            contents.append(
                content_hash(event_id, etype, version, run_id, cause, producer, at, trace, data)
            )
        return self._batch(stream_id, expected, ids, types, versions, runs, causes, producers,
                           recorded, traces, datas, contents)  # fmt: skip

    def _encode_columns(
        self, stream_id: str, events: Sequence[NewEvent | Event], expected: int | None
    ) -> _Batch:
        """The batch, column by column: the body encoder and the chain's header
        encoder run once for the whole batch, the content hashes in one pass."""
        if not events:
            raise InvalidAppend(f"append to {stream_id!r}: no events given")
        if set(map(type, events)) != {NewEvent}:
            events = [_as_new(item, i) for i, item in enumerate(events)]
        bodies, ids, runs, causes, producers, traces, recorded = map(
            list, zip(*map(_new_event_fields, events), strict=True)
        )
        n = len(bodies)
        classes = list(map(type, bodies))
        tags: dict[type, tuple[str, int]] = {}
        for cls, body in dict(zip(classes, bodies, strict=True)).items():
            if not isinstance(body, Event):
                i = next(i for i, b in enumerate(bodies) if not isinstance(b, Event))
                raise InvalidAppend(
                    f"event {i} of the batch is not an agentrt Event: {bodies[i]!r}"
                )
            tags[cls] = (event_type_of(body), body.__schema_version__)
        if len(tags) == 1:
            ((etype, version),) = tags.values()
            types, versions = [etype] * n, [version] * n
        else:
            pairs = [tags[cls] for cls in classes]
            types, versions = [p[0] for p in pairs], [p[1] for p in pairs]
        if None in set(map(_tzinfo, recorded)):
            i = next(i for i, at in enumerate(recorded) if at.tzinfo is None)
            raise InvalidAppend(f"event {ids[i]}: recorded_at must be timezone-aware")
        # One JSON body per line: JSON text escapes the line breaks in its strings,
        # so the lines are the bodies, unless one holds a raw value with a line
        # break of its own (msgspec.Raw), which is then encoded on its own.
        blob = _body_encoder.encode_lines(bodies)
        raw = blob.split(b"\n")
        if len(raw) == n + 1:
            raw.pop()
            datas = blob.decode().split("\n")
            datas.pop()
        else:
            raw = [_body_encoder.encode(body) for body in bodies]
            datas = [data.decode() for data in raw]
        contents = chain.content_hashes(
            ids, types, versions, runs, causes, producers, recorded, traces, raw
        )
        return self._batch(stream_id, expected, ids, types, versions, runs, causes, producers,
                           recorded, traces, datas, contents)  # fmt: skip

    def _encode_raw(
        self, stream_id: str, events: Sequence[RawEvent], expected: int | None
    ) -> _Batch:
        for i, ev in enumerate(events):
            if type(ev) is not RawEvent:
                raise InvalidAppend(f"event {i} of the batch is not a RawEvent: {ev!r}")
            if ev.recorded_at.tzinfo is None:
                raise InvalidAppend(f"event {ev.event_id}: recorded_at must be timezone-aware")
        ids, types, versions, runs, causes, producers, recorded, traces = (
            [e.event_id for e in events], [e.event_type for e in events],
            [e.schema_version for e in events], [e.run_id for e in events],
            [e.causation_id for e in events], [e.producer for e in events],
            [e.recorded_at for e in events], [e.trace for e in events],
        )  # fmt: skip
        raw = [e.data for e in events]
        contents = chain.content_hashes(
            ids, types, versions, runs, causes, producers, recorded, traces, raw
        )
        return self._batch(stream_id, expected, ids, types, versions, runs, causes, producers,
                           recorded, traces, [d.decode() for d in raw], contents)  # fmt: skip

    def _batch(
        self,
        stream_id: str,
        expected: int | None,
        ids: list[Any],
        types: list[str],
        versions: list[int],
        runs: list[Any],
        causes: list[Any],
        producers: list[Any],
        recorded: list[Any],
        traces: list[Any],
        datas: list[str],
        contents: list[bytes],
    ) -> _Batch:
        n = len(ids)
        if len({e.int for e in ids}) != n:
            raise InvalidAppend("an event id appears twice in one batch")
        prev, links = self._chain(stream_id, expected, contents)
        return _Batch(stream_id, expected, ids, types, versions, _nulls(runs), _nulls(causes),
                      _nulls(producers), recorded, _nulls(traces), datas, contents, prev,
                      links)  # fmt: skip

    def _chain(
        self, stream_id: str, expected: int | None, contents: list[bytes]
    ) -> tuple[bytes | None, list[bytes] | None]:
        """The chain, computed here when the stream's head hash is known.

        A new stream's head is all zeroes; otherwise the head this log last
        wrote to the stream, if the caller expects that very version. The
        database uses it only if it matches the head it reads, and computes
        the chain itself otherwise.
        """
        if expected is None:
            return None, None
        if expected == 0:
            prev = chain.GENESIS
        else:
            head = self._heads.get(stream_id)
            if head is None or head[0] != expected:
                return None, None
            prev = head[1]
        return prev, chain.links(prev, expected, contents, stream_id)

    # -- reading -----------------------------------------------------------------

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (0 if it has no events)."""
        return int(await self._pool.fetchval(self._sql_head, stream_id) or 0)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, *, limit: int | None = None
    ) -> list[RecordedEvent]:
        """The stream's events from ``from_version`` on, in version order."""
        rows = await self._pool.fetch(self._sql_stream, stream_id, from_version, limit)
        return self._decode_all(rows)

    async def read_all(self, after: LogPosition = START, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events after ``after``, in the log's one stable order.

        Only events no running transaction can still precede are returned, so a
        reader that continues from the last event's ``log_position`` never
        skips one and never sees one twice.
        """
        rows = await self._pool.fetch(self._sql_all, after[0], after[1], limit)
        return self._decode_all(rows)

    async def read_run(
        self, run_id: UUID, *, conn: asyncpg.Connection | None = None
    ) -> list[RecordedEvent]:
        """Every event of a run (all streams), in log order."""
        rows = await (conn or self._pool).fetch(self._sql_run, run_id)
        return self._decode_all(rows)

    async def read_run_between(
        self, run_id: UUID, after: LogPosition | None, before: LogPosition | None
    ) -> list[RecordedEvent]:
        """The run's events after ``after`` and before ``before`` (None: no bound), in log
        order: what a fold reads on top of a snapshot."""
        lo = after or START
        hi = before or LogPosition(2**63 - 1, 2**63 - 1)
        q = f'"{self.schema}"'
        rows = await self._pool.fetch(
            f"SELECT {EVENT_COLUMNS} FROM {q}.events WHERE run_id = $1 "
            "AND (tx_id, position) > ($2::text::xid8, $3::bigint) "
            "AND (tx_id, position) < ($4::text::xid8, $5::bigint) ORDER BY tx_id, position",
            run_id, str(lo.tx), lo.position, str(hi.tx), hi.position,
        )  # fmt: skip
        return self._decode_all(rows)

    async def read_last(self, n: int) -> list[RecordedEvent]:
        """The last ``n`` readable events, in log order (where ``tail`` starts)."""
        q = f'"{self.schema}"'
        rows = await self._pool.fetch(
            f"SELECT * FROM (SELECT {EVENT_COLUMNS} FROM {q}.events "
            "WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY tx_id DESC, position DESC LIMIT $1) last ORDER BY tx_id, position",
            n,
        )
        return self._decode_all(rows)

    async def confirm(self, cursors: Sequence[Cursor]) -> Cursor:
        """The newest of ``cursors`` whose event is still where it was read.

        A server that lost its last commits (asynchronous commit, a failover
        to an asynchronous standby) reuses their transaction ids and
        positions: resuming after a lost event could skip the new events
        written at or below its position. Every event kept by the server was
        written before any it lost, and every transaction id and position
        handed out after the loss is above those of the kept events; so
        resuming after a cursor whose event is still in place skips nothing.
        Cursors older than the loss are what a reader rewinds to (START when
        none is); the events read again are duplicates, which the inbox and
        the activation claim absorb. One query, whatever the number of cursors.
        """
        given = [c for c in cursors if c.position != START]
        if not given:
            return START_CURSOR
        rows = await self._pool.fetch(
            self._sql_confirm,
            [str(c.position.tx) for c in given],
            [c.position.position for c in given],
            [c.event_id for c in given],
        )
        kept = [given[r[0] - 1] for r in rows]
        return max(kept, key=lambda c: c.position, default=START_CURSOR)

    async def subscribe(
        self,
        after: LogPosition | Cursor = START,
        *,
        batch: int = 500,
        poll_interval: float = 0.5,
    ) -> AsyncIterator[RecordedEvent]:
        """Catch up from ``after``, then follow the log live, one event at a time
        (a :class:`Cursor` is checked first, as in :meth:`follow`)."""
        pages = self.follow(after, batch=batch, poll_interval=poll_interval)
        try:
            async for page in pages:
                for event in page:
                    yield event
        finally:
            await pages.aclose()

    async def follow(
        self,
        after: LogPosition | Cursor = START,
        *,
        batch: int = 500,
        poll_interval: float = 0.5,
        wake: asyncio.Event | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        """Catch up from ``after``, then follow the log live, a page at a time.

        Appends NOTIFY the log's channel; a dedicated connection LISTENs and
        wakes the reader. A wake-up can be missed (a dropped connection, or
        events that become readable only when an older transaction ends), so
        the reader also polls every ``poll_interval`` seconds. A caller with
        wake-ups of its own passes ``wake`` (the relay uses Redis messages from
        the workers); no LISTEN connection is held then. With ``stop``, the
        generator ends once it is set (noticed between reads, and at once when
        the caller also sets ``wake``), so a reader stops without cancelling a
        query in flight.

        A :class:`Cursor` is confirmed first (:meth:`confirm`): if the server
        lost the event it names, the reader starts over from the beginning
        (pass several cursors to :meth:`confirm` yourself to rewind less far).
        """
        if isinstance(after, Cursor):
            confirmed = await self.confirm([after])
            if confirmed != after:
                log.warning("log.cursor_rewound", cursor=str(after), to=str(confirmed),
                            reason="its event is no longer at its position")  # fmt: skip
            after = confirmed.position
        listener: asyncpg.Connection | None = None
        if wake is None:
            wake = asyncio.Event()

            def on_notify(*_: object) -> None:
                assert wake is not None
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
            while stop is None or not stop.is_set():
                wake.clear()
                events = await self.read_all(position, batch)
                if events:
                    position = events[-1].log_position
                    yield events
                if len(events) == batch:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll_interval)
        finally:
            if listener is not None:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await listener.remove_listener(self.channel, on_notify)
                await self._pool.release(listener)

    def _decode_all(self, rows: list[asyncpg.Record]) -> list[RecordedEvent]:
        """Decode a page: the hot loop of every tail reader, so kept flat.

        Bodies of a registered type at its current schema version go straight
        to their prebuilt decoder; anything else (upcasts, unknown types,
        errors) takes the registry's full path.
        """
        fast = self.registry._fast
        slow = self._body
        make = RecordedEvent
        out: list[RecordedEvent] = []
        append = out.append
        for r in rows:
            (position, tx, event_id, stream_id, stream_version, event_type, schema_version,
             run_id, causation_id, producer, recorded_at, trace, data, prev_hash,
             hash_) = r  # fmt: skip
            known = fast.get(event_type)
            if known is not None and known[1] == schema_version:
                try:
                    body = known[0].decode(data)
                except msgspec.MsgspecError:
                    body = slow(event_type, schema_version, data)  # raises, typed
            else:
                body = slow(event_type, schema_version, data)
            append(make(
                position, tx, event_id, stream_id, stream_version, event_type, schema_version,
                run_id, causation_id, producer, recorded_at, trace, body, prev_hash, hash_,
            ))  # fmt: skip
        return out
