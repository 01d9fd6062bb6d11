"""Moving a run between installations: export it as JSON lines, import it with its chain verified.

An export holds every column of every event of the run (its run stream and its
activations' step streams, and any other event that carries its run id) as the
log stores them: the body is the stored JSON text, byte for byte (read raw from
PostgreSQL, never re-encoded), so the importer can recompute each event's content
hash and each stream's chain and refuse a file that was altered, reordered or cut.
An import appends the very same events (ids, times, causation, bodies) and so
produces the very same chain, which it checks before it commits.

Import needs none of the app's event classes: bodies travel as stored bytes
(:meth:`EventLog.append_raw <runtime.log.store.EventLog.append_raw>`). What it
does not carry: inbox rows. A relay of the importing installation publishes the
imported events like any others, so its workers may handle them again; import
into an installation whose agents you mean to replay with, not one serving live.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from uuid import UUID

import asyncpg
import msgspec

from projections.errors import ImportRefused, UnknownRun
from runtime.errors import ConcurrencyConflict, DuplicateEventMismatch
from runtime.events.ids import run_stream
from runtime.log import chain
from runtime.log.store import EventLog, RawEvent

FORMAT = "agentrt.run-export"
VERSION = 1

_COLUMNS = (
    "position, tx_id, event_id, stream_id, stream_version, event_type, schema_version, run_id, "
    "causation_id, producer, recorded_at, trace, data, prev_hash, hash"
)


class StreamSummary(msgspec.Struct, frozen=True):
    """One stream in an export: how many of its events it holds and the last one's hash."""

    events: int
    head: str


class ExportHeader(msgspec.Struct, frozen=True):
    """The first line of an export."""

    format: str
    version: int
    run_id: UUID
    events: int
    streams: dict[str, StreamSummary]
    chain_format: int
    exported_at: str
    agentrt: str


class ExportedEvent(msgspec.Struct, frozen=True):
    """One event as exported: every column the log stores. ``data`` is the stored JSON
    body as a string (its exact text); hashes are hex; ``recorded_at`` is ISO 8601 in
    UTC with microseconds; ``position`` and ``tx`` say where it was in the source log."""

    event_id: UUID
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    run_id: UUID | None
    causation_id: UUID | None
    producer: str | None
    recorded_at: str
    trace: str | None
    data: str
    prev_hash: str
    hash: str
    position: int
    tx: int


class Export(msgspec.Struct, frozen=True):
    """A verified export: its header and events in file (log) order."""

    header: ExportHeader
    events: list[ExportedEvent]
    #: Streams that are only partly the run's (a circuit breaker's): verified, not imported.
    partial: dict[str, int]


class ImportReport(msgspec.Struct, frozen=True):
    run_id: UUID
    #: Events appended by this import (0 when the run was already present).
    imported: int
    already_present: bool
    #: Streams imported, with their event counts.
    streams: dict[str, int]
    #: Streams skipped (not the run's own), with the events the file held of them.
    skipped: dict[str, int]


def _agentrt_version() -> str:
    try:
        return version("agentrt")
    except PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
        return "unknown"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _owned(stream_id: str, run_id: UUID) -> bool:
    """Whether a stream belongs to the run as a whole (its run stream, its step streams)."""
    return stream_id == run_stream(run_id) or stream_id.startswith("act-")


# -- export ------------------------------------------------------------------------


async def export_run(log: EventLog, run_id: UUID) -> list[bytes]:
    """The run as JSON lines (each ending in a newline): the header, then its events in
    log order. :class:`UnknownRun` if the log has no event of that run."""
    rows = await log.pool.fetch(
        f'SELECT {_COLUMNS} FROM "{log.schema}".events WHERE run_id = $1 ORDER BY tx_id, position',
        run_id,
    )
    if not rows:
        raise UnknownRun(f"no run {run_id} in this log")
    events = [
        ExportedEvent(
            event_id=r[2],
            stream_id=r[3],
            stream_version=r[4],
            event_type=r[5],
            schema_version=r[6],
            run_id=r[7],
            causation_id=r[8],
            producer=r[9],
            recorded_at=_iso(r[10]),
            trace=r[11],
            data=r[12],
            prev_hash=r[13].hex(),
            hash=r[14].hex(),
            position=r[0],
            tx=r[1],
        )
        for r in rows
    ]
    streams: dict[str, StreamSummary] = {}
    for e in events:
        seen = streams.get(e.stream_id)
        streams[e.stream_id] = StreamSummary((seen.events if seen else 0) + 1, e.hash)
    header = ExportHeader(
        format=FORMAT,
        version=VERSION,
        run_id=run_id,
        events=len(events),
        streams=streams,
        chain_format=chain.CHAIN_FORMAT,
        exported_at=_iso(datetime.now(UTC)),
        agentrt=_agentrt_version(),
    )
    encode = msgspec.json.encode
    return [encode(header) + b"\n", *(encode(e) + b"\n" for e in events)]


# -- verification --------------------------------------------------------------------


def _header(line: bytes) -> ExportHeader:
    try:
        raw = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise ImportRefused(f"line 1: not JSON ({exc}): not an agentrt run export") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ImportRefused(
            f"line 1: not an agentrt run export (format {found!r}, expected {FORMAT!r})"
        )
    if raw.get("version") != VERSION:
        raise ImportRefused(
            f"line 1: export version {raw.get('version')!r} is not supported "
            f"(this agentrt reads version {VERSION})"
        )
    try:
        header = msgspec.convert(raw, ExportHeader)
    except msgspec.ValidationError as exc:
        raise ImportRefused(f"line 1: a malformed export header: {exc}") from None
    if header.chain_format != chain.CHAIN_FORMAT:
        raise ImportRefused(
            f"line 1: chain format {header.chain_format} is not this log's ({chain.CHAIN_FORMAT})"
        )
    return header


_event_decoder = msgspec.json.Decoder(ExportedEvent)


def _unhex(text: str, what: str, where: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 32:
        raise ImportRefused(f"{where}: {what} is not a 32-byte hex hash")
    return value


def _recorded(text: str, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ImportRefused(f"{where}: recorded_at {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ImportRefused(f"{where}: recorded_at {text!r} has no time zone")
    return moment


def parse_export(lines: Iterable[bytes | str]) -> Export:
    """Read and verify an export; :class:`ImportRefused` naming the first problem.

    Checked: the header (format, version, chain format), that every line is an
    event of the exported run and appears once, the event count and each
    stream's count and head, that lines are in log order, each event's content
    hash and chain link, that each stream's versions follow each other with
    each ``prev_hash`` equal to the previous event's hash, and that the run's
    own streams start at version 1 from the genesis hash. Nothing is written.
    """
    it = iter(lines)
    first = next(it, None)
    if first is None or not first.strip():
        raise ImportRefused("the file is empty: not an agentrt run export")
    header = _header(first.encode() if isinstance(first, str) else first)
    events: list[ExportedEvent] = []
    seen: set[UUID] = set()
    last: dict[str, tuple[int, int, str]] = {}  # stream -> (version, line, hash)
    counts: dict[str, int] = {}
    order: tuple[int, int] | None = None
    for number, line in enumerate(it, start=2):
        if isinstance(line, str):
            line = line.encode()
        if not line.strip():
            continue
        try:
            e = _event_decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ImportRefused(f"line {number}: not an exported event: {exc}") from None
        where = f"event {e.event_id} (line {number})"
        if e.run_id != header.run_id:
            raise ImportRefused(
                f"{where} belongs to run {e.run_id}, not to the exported run {header.run_id}"
            )
        if e.event_id in seen:
            raise ImportRefused(f"{where} appears twice in the file")
        seen.add(e.event_id)
        prev, own = _unhex(e.prev_hash, "prev_hash", where), _unhex(e.hash, "hash", where)
        content = chain.content_hash_raw(
            e.event_id,
            e.event_type,
            e.schema_version,
            e.run_id,
            e.causation_id,
            e.producer,
            _recorded(e.recorded_at, where),
            e.trace,
            e.data.encode(),
        )
        if chain.link(prev, e.stream_version, content, e.stream_id) != own:
            raise ImportRefused(f"altered: the hash of {where} does not match its content")
        if order is not None and (e.tx, e.position) <= order:
            raise ImportRefused(
                f"{where} is out of log order (its position is not after the "
                "previous line's): lines were moved"
            )
        order = (e.tx, e.position)
        _check_link(e, last.get(e.stream_id), where, _owned(e.stream_id, header.run_id))
        last[e.stream_id] = (e.stream_version, number, e.hash)
        counts[e.stream_id] = counts.get(e.stream_id, 0) + 1
        events.append(e)
    if len(events) != header.events:
        raise ImportRefused(
            f"the header says {header.events} events, the file holds "
            f"{len(events)}: a line was removed or added"
        )
    for stream_id, summary in header.streams.items():
        tail = last.get(stream_id)
        if counts.get(stream_id, 0) != summary.events or tail is None or tail[2] != summary.head:
            raise ImportRefused(
                f"stream {stream_id} does not end where the header says "
                f"({summary.events} events, head {summary.head[:12]}...): "
                "its last events were removed or changed"
            )
    if set(counts) != set(header.streams):
        extra = sorted(set(counts) - set(header.streams))
        raise ImportRefused(f"streams {extra} are not in the header")
    partial = {s: n for s, n in counts.items() if not _owned(s, header.run_id)}
    return Export(header, events, partial)


def _check_link(
    e: ExportedEvent, before: tuple[int, int, str] | None, where: str, owned: bool
) -> None:
    """The event follows the stream's previous event in the file (or starts the stream)."""
    if before is None:
        if not owned:
            return  # a stream the run only passes through: verified from here on
        if e.stream_version != 1 or e.prev_hash != chain.GENESIS.hex():
            raise ImportRefused(
                f"{where}: the run's stream {e.stream_id} does not start at "
                f"version 1 from the genesis hash (found version "
                f"{e.stream_version}): its first events are missing"
            )
        return
    version, line, hash_ = before
    if e.stream_version <= version or (owned and e.stream_version != version + 1):
        raise ImportRefused(
            f"{where} is version {e.stream_version} of {e.stream_id}, after "
            f"version {version} (line {line}): an event of the stream was "
            "removed or moved"
        )
    if e.stream_version == version + 1 and e.prev_hash != hash_:
        raise ImportRefused(
            f"broken chain: {where} does not link to the previous event of "
            f"{e.stream_id} (its prev_hash is not the hash of line {line})"
        )


# -- import ----------------------------------------------------------------------


def _raw(e: ExportedEvent) -> RawEvent:
    return RawEvent(
        event_id=e.event_id,
        event_type=e.event_type,
        schema_version=e.schema_version,
        data=e.data.encode(),
        run_id=e.run_id,
        causation_id=e.causation_id,
        producer=e.producer,
        trace=e.trace,
        recorded_at=datetime.fromisoformat(e.recorded_at),
    )


async def import_run(log: EventLog, export: Export) -> ImportReport:
    """Append a verified export's run to ``log``, in the order it was logged, in one
    transaction; then check that the stored chain equals the exported one (else
    :class:`ImportRefused` and nothing is kept). A run already present with the same
    hashes is reported ``already_present``; anything else under its ids is refused."""
    run_id = export.header.run_id
    own = [e for e in export.events if e.stream_id not in export.partial]
    streams: dict[str, int] = {}
    for e in own:
        streams[e.stream_id] = streams.get(e.stream_id, 0) + 1
    ids = [e.event_id for e in own]
    q = f'"{log.schema}"'
    async with log.pool.acquire() as conn, conn.transaction():
        stored = await _stored(conn, q, ids)
        if stored:
            _same_or_refuse(own, stored)
            return ImportReport(run_id, 0, True, streams, dict(export.partial))
        # Consecutive events of one stream go in one append, in file order, so the
        # imported log keeps the source's order (a run's first steps before its trigger).
        for stream_id, group in itertools.groupby(own, key=lambda e: e.stream_id):
            batch = list(group)
            expected = batch[0].stream_version - 1
            try:
                await log.append_raw(stream_id, [_raw(e) for e in batch], expected, conn=conn)
            except (ConcurrencyConflict, DuplicateEventMismatch):
                raise ImportRefused(
                    f"stream {stream_id} already holds other events in this log: "
                    f"a different run is there; nothing was imported"
                ) from None
        stored = await _stored(conn, q, ids)
        differs = [e for e in own if stored.get(e.event_id) != bytes.fromhex(e.hash)]
        if differs:
            raise ImportRefused(
                f"the imported chain does not come out identical: event {differs[0].event_id} "
                f"of {differs[0].stream_id} was stored with another hash than exported "
                f"({len(differs)} event(s) differ); nothing was imported"
            )
    return ImportReport(run_id, len(own), False, streams, dict(export.partial))


async def _stored(conn: asyncpg.Connection, q: str, ids: Sequence[UUID]) -> dict[UUID, bytes]:
    rows = await conn.fetch(
        f"SELECT event_id, hash FROM {q}.events WHERE event_id = ANY($1::uuid[])", list(ids)
    )
    return {r[0]: r[1] for r in rows}


def _same_or_refuse(own: Sequence[ExportedEvent], stored: dict[UUID, bytes]) -> None:
    """The run is there already: every event, with the exported hash, or a refusal."""
    for e in own:
        have = stored.get(e.event_id)
        if have is None:
            raise ImportRefused(
                f"{len(stored)} of the run's {len(own)} events are in this log already, but "
                f"not event {e.event_id}: a different run is there under these ids"
            )
        if have != bytes.fromhex(e.hash):
            raise ImportRefused(
                f"event {e.event_id} is in this log already with another hash: a different "
                "run is there under these ids"
            )
