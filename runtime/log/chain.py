"""The hash chain: canonical bytes of an event and how each hash links to the last.

Each event's hash covers its content and the hash of the previous event of
its stream::

    content = sha256(canonical header JSON + b"\\n" + stored body bytes)
    hash    = sha256(prev_hash || int8(stream_version) || content || utf8(stream_id))

The writer computes ``content`` (so the database does no JSON work); the
append function links it to the stream's head inside the writing transaction
(so chains of different streams never wait for each other); ``agentrt audit
verify`` recomputes both from the stored columns. Field order and encodings
here are a storage format: change them only behind a new ``CHAIN_FORMAT``.

Seals chain to each other. A format 1 seal's digest covers the heads of the
streams it seals (:func:`heads_digest`); a format 2 seal's digest also covers
the commit order of every event it seals (:func:`seal_digest`,
:class:`OrderDigest`), so moving an event to another ``tx_id`` or
``position`` shows. The database computes seals (``seal_log()`` in the
migrations); ``audit verify`` recomputes them here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from uuid import UUID

import msgspec

CHAIN_FORMAT = 1
#: The format of the seals ``seal_log()`` writes.
SEAL_FORMAT = 2
#: Rows per chunk of :class:`OrderDigest` (bounds the SQL side's memory).
ORDER_CHUNK = 65536
GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_header = msgspec.json.Encoder()
_sha256 = hashlib.sha256
#: int8, big-endian: a stream version as :func:`link` hashes it.
_int8 = struct.Struct(">q").pack


def epoch_micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("recorded_at must be timezone-aware")
    return (moment - _EPOCH) // _MICROSECOND


def content_hash(
    *,
    event_id: UUID,
    event_type: str,
    schema_version: int,
    run_id: UUID | None,
    causation_id: UUID | None,
    producer: str | None,
    recorded_at: datetime,
    trace: str | None,
    data: bytes,
) -> bytes:
    """sha256 of the canonical header JSON, a newline, and the stored body bytes."""
    return content_hash_raw(
        event_id, event_type, schema_version, run_id, causation_id, producer, recorded_at,
        trace, data,
    )  # fmt: skip


def content_hash_raw(
    event_id: UUID,
    event_type: str,
    schema_version: int,
    run_id: UUID | None,
    causation_id: UUID | None,
    producer: str | None,
    recorded_at: datetime,
    trace: str | None,
    data: bytes,
) -> bytes:
    """:func:`content_hash` with positional arguments, for the append hot path."""
    h = _sha256(
        _header.encode(
            (CHAIN_FORMAT, event_id, event_type, schema_version, run_id, causation_id,
             producer, epoch_micros(recorded_at), trace)
        )
    )  # fmt: skip
    h.update(b"\n")
    h.update(data)
    return h.digest()


def content_hashes(
    ids: Sequence[UUID],
    types: Sequence[str],
    versions: Sequence[int],
    runs: Sequence[UUID | None],
    causes: Sequence[UUID | None],
    producers: Sequence[str | None],
    recorded: Sequence[datetime],
    traces: Sequence[str | None],
    datas: Sequence[bytes],
) -> list[bytes]:
    """:func:`content_hash_raw` of each event of a batch, given by column: the same
    hashes in fewer Python calls (one encoder call for every header).

    Every ``recorded`` must be timezone-aware (the caller checks; a naive one
    raises ``TypeError`` here).
    """
    micros = [(at - _EPOCH) // _MICROSECOND for at in recorded]
    headers = list(
        zip(repeat(CHAIN_FORMAT), ids, types, versions, runs, causes, producers, micros, traces)
    )
    # One JSON value per line, each ending in the newline the format puts between
    # header and body: JSON text escapes every line break inside its strings.
    lines = _header.encode_lines(headers).splitlines(keepends=True)
    if len(lines) != len(headers):  # pragma: no cover - JSON has no raw line breaks
        raise AssertionError("a chain header spans more than one line")
    sha256 = _sha256
    return [sha256(line + data).digest() for line, data in zip(lines, datas, strict=True)]


def link(prev_hash: bytes, stream_version: int, content: bytes, stream_id: str) -> bytes:
    """The chained hash; mirrored in SQL by the append function (see migrations)."""
    return _sha256(prev_hash + _int8(stream_version) + content + stream_id.encode()).digest()


def links(prev_hash: bytes, version: int, contents: Sequence[bytes], stream_id: str) -> list[bytes]:
    """The chain along a batch whose first event takes ``version + 1``: ``prev_hash``
    then :func:`link` of each event in turn (``len(contents) + 1`` hashes)."""
    sid = stream_id.encode()
    out = [prev_hash]
    append = out.append
    sha256, int8 = _sha256, _int8
    h = prev_hash
    for v, content in enumerate(contents, version + 1):
        h = sha256(h + int8(v) + content + sid).digest()
        append(h)
    return out


def heads_digest(prev_digest: bytes, heads: list[tuple[str, int, bytes]]) -> bytes:
    """Digest of a seal: the previous seal's digest and the sorted stream heads it covers."""
    h = hashlib.sha256(prev_digest)
    for stream_id, version, head_hash in sorted(heads):
        encoded = stream_id.encode()
        h.update(len(encoded).to_bytes(4, "big") + encoded)
        h.update(version.to_bytes(8, "big", signed=True) + head_hash)
    return h.digest()


class OrderDigest:
    """The commit order of a seal's events: sha256 over the sha256 of each run of
    :data:`ORDER_CHUNK` rows ``int8(tx_id) || int8(position) || event id``, fed
    in ``(tx_id, position)`` order. No rows: sha256 of nothing. (The event id,
    not the hash: an altered event is reported as altered, not reordered.)"""

    __slots__ = ("_chunk", "_chunks", "_n")

    def __init__(self) -> None:
        self._chunks = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._n = 0

    def add(self, tx_id: int, position: int, event_id: UUID) -> None:
        self._chunk.update(
            tx_id.to_bytes(8, "big", signed=True)
            + position.to_bytes(8, "big", signed=True)
            + event_id.bytes
        )
        self._n += 1
        if self._n % ORDER_CHUNK == 0:
            self._chunks.update(self._chunk.digest())
            self._chunk = hashlib.sha256()

    def digest(self) -> bytes:
        chunks = self._chunks.copy()
        if self._n % ORDER_CHUNK:
            chunks.update(self._chunk.digest())
        return chunks.digest()


def seal_digest(
    prev_digest: bytes, heads: list[tuple[str, int, bytes]], order_digest: bytes | None
) -> bytes:
    """A seal's digest: format 1 (``order_digest`` None) covers the heads only."""
    digest = heads_digest(prev_digest, heads)
    if order_digest is None:
        return digest
    return hashlib.sha256(digest + order_digest).digest()
