"""Row changes from change-data-capture sources: Debezium and Supabase Database Webhooks.

Both decode into one :class:`webhooks.events.RowChanged` per delivery.

Debezium (``decode_debezium``)
    The value of one Debezium change event, as Debezium Server's HTTP sink
    posts it (``Content-Type: application/json``; ``application/vnd.debezium+json``
    is accepted too). Three shapes are taken:

    * the JSON converter's wrapper, ``{"schema": {...}, "payload": {...}}``;
    * the payload alone (``schemas.enable=false``);
    * ``{"key": <key>, "value": <either of the above>}``, for bridges that
      forward the Kafka record key as well (the key may itself be wrapped).

    Error fields are paths in the body as sent: ``payload.op`` for a wrapped
    event, ``op`` for a bare one, ``value.payload.op`` inside a key/value pair.

    Only row changes are taken: ``op`` ``c``, ``u``, ``d`` and ``r``. A truncate
    (``t``) names a table but no row, and a logical decoding message (``m``)
    names neither, so both are refused with a 422 on ``op`` rather than
    stretched into a ``RowChanged`` (Debezium skips truncates by default:
    ``skipped.operations=t``). Tombstones (an empty body, ``null``, or a null
    ``payload``/``value``), transaction metadata (``status`` BEGIN/END) and
    schema change events (``ddl``) are refused the same way, each with a
    message saying what it was.

    ``key``: Debezium puts the row's primary key in the Kafka record *key*,
    which an HTTP sink does not post. So the key is the envelope's ``key`` when
    there is one; else ``{"id": ...}`` when the row (``after``, or ``before``
    for a delete or when ``after`` is absent) has an ``id`` column; else
    ``{"_id": ...}`` for a MongoDB document; else ``{}``. Columns merely ending
    in ``_id`` are foreign keys as often as not, so they are never guessed at.

    ``source_position`` is the change's place in the database's own log, as
    ``name:value`` pairs joined by ``;`` in the manner of Debezium's CloudEvents
    ids: ``lsn:24023128;txId:555`` (PostgreSQL), ``file:mysql-bin.000003;pos:805;row:0``
    (MySQL), ``change_lsn``/``commit_lsn``/``event_serial_no`` (SQL Server),
    ``scn``/``commit_scn`` (Oracle), ``ts_ms:...;ord:...`` (MongoDB), else
    ``ts_ms:...`` alone.

    ``delivery_id`` is ``{connector name}:{source_position}:{schema.table}:{op}:{key}``.
    A redelivery carries the same source block and so the same id. Changes at
    one position are told apart by the rest: snapshot reads share a position
    and differ by key, MySQL rows of one binlog event differ by ``row``, the
    delete and create of a primary key update differ by op and key. When the
    key is ``{}`` a digest of ``before`` and ``after`` stands in for it. With no
    position at all the id is None (the HTTP layer then falls back to its own).

Supabase (``decode_supabase``)
    A Database Webhooks payload, ``{"type", "table", "schema", "record",
    "old_record"}``: INSERT, UPDATE and DELETE become ``c``, ``u`` and ``d``,
    ``record`` is ``after`` and ``old_record`` is ``before``. The key is
    ``{"id": ...}`` from the row when it has an ``id`` column, else ``{}``.
    Supabase sends no id or log position of its own, so ``delivery_id`` is
    None.

In both, ``partition_key`` is ``{schema}.{table}:{canonical JSON of key}``, so
the changes of one row share it and stay in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn

import msgspec

from webhooks.errors import InvalidPayload, UnsupportedMediaType
from webhooks.events import RowChanged
from webhooks.formats import Decoded, media_type

__all__ = ["DEBEZIUM_MEDIA_TYPES", "SUPABASE_MEDIA_TYPES", "decode_debezium", "decode_supabase"]

DEBEZIUM_MEDIA_TYPES = frozenset({"application/json", "application/vnd.debezium+json"})
SUPABASE_MEDIA_TYPES = frozenset({"application/json"})

#: Longer keys are replaced by a digest in delivery ids and partition keys.
_MAX_KEY_TEXT = 200

Row = dict[str, Any] | str | None


# -- Debezium wire structs ----------------------------------------------------


class _Source(msgspec.Struct, frozen=True):
    """The ``source`` block, which each connector shapes its own way.

    Only the fields used here are declared, all optional: the rest (version,
    snapshot, sequence, xmin, server_id, gtid, thread, query, rs, ...) are
    skipped unread, so a connector that types them differently is no error.
    """

    connector: str | None = None
    #: The connector's logical name (``topic.prefix``).
    name: str | None = None
    #: When the change was committed (or, for a snapshot read, read).
    ts_ms: int | None = None
    ts_us: int | None = None
    db: str | None = None
    schema: str | None = None
    table: str | None = None
    #: MongoDB names a collection instead of a table.
    collection: str | None = None
    # PostgreSQL: an int64 LSN and txId (txId is a string on Oracle).
    lsn: int | str | None = None
    tx_id: int | str | None = msgspec.field(default=None, name="txId")
    # MySQL: binlog coordinates, row within the binlog event.
    file: str | None = None
    pos: int | None = None
    row: int | None = None
    # SQL Server and Db2.
    change_lsn: str | None = None
    commit_lsn: str | None = None
    event_serial_no: int | None = None
    # Oracle.
    scn: str | None = None
    commit_scn: str | None = None
    # MongoDB: the oplog entry's order within its second (ts_ms).
    ord: int | None = None


class _Payload(msgspec.Struct, frozen=True):
    """A change event's payload (the Envelope); ``ts_ms`` (processing time) and
    ``transaction`` are skipped unread.

    ``op`` and ``source`` are optional here and checked in code, so that a body
    without them can be told for what it is (transaction metadata, a schema
    change) rather than just "missing field".
    """

    op: Literal["c", "u", "d", "r", "t", "m"] | None = None
    source: _Source | None = None
    before: Row = None
    after: Row = None
    # Present on the other kinds of Debezium message, never on a row change.
    status: str | None = None
    ddl: str | None = None


# -- Supabase wire struct -----------------------------------------------------


class _SupabasePayload(msgspec.Struct, frozen=True):
    type: Literal["INSERT", "UPDATE", "DELETE"]
    table: str
    schema: str | None = None
    record: dict[str, Any] | None = None
    old_record: dict[str, Any] | None = None


_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])
_PAYLOAD = msgspec.json.Decoder(_Payload)
_SUPABASE = msgspec.json.Decoder(_SupabasePayload)
_ANY = msgspec.json.Decoder()

_SUPABASE_OPS = {"INSERT": "c", "UPDATE": "u", "DELETE": "d"}

#: Source fields that place a change in the database's log, in output order.
_POSITION_FIELDS = (
    ("lsn", "lsn"),
    ("txId", "tx_id"),
    ("file", "file"),
    ("pos", "pos"),
    ("row", "row"),
    ("change_lsn", "change_lsn"),
    ("commit_lsn", "commit_lsn"),
    ("event_serial_no", "event_serial_no"),
    ("scn", "scn"),
    ("commit_scn", "commit_scn"),
)

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`")


# -- errors --------------------------------------------------------------------


def _join(prefix: str, path: str) -> str | None:
    """``"payload."`` + ``"op"`` -> ``"payload.op"``; an empty result is None."""
    joined = (prefix.rstrip(".") if path.startswith("[") else prefix) + path
    return joined.rstrip(".") or None


def _invalid(message: str, prefix: str, path: str = "") -> NoReturn:
    raise InvalidPayload(message, field=_join(prefix, path))


def _from_msgspec(exc: msgspec.DecodeError, what: str, prefix: str) -> InvalidPayload:
    """msgspec's ``... - at `$.a.b``` as ``InvalidPayload(field=prefix + "a.b")``."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return InvalidPayload(f"the body is not valid JSON: {text}", field=_join(prefix, ""))
    at = _AT.search(text)
    path = at["path"].removeprefix(".") if at else ""
    base = text[: at.start()] if at else text
    missing = _MISSING.match(base)
    if missing:
        path = f"{path}.{missing['name']}" if path else missing["name"]
    field = _join(prefix, path)
    if field is None:
        return InvalidPayload(f"{what}: {base}", field=None)
    if field.rpartition(".")[2] == "op" and base.startswith("Invalid enum value"):
        base += " (a row change's op is c, u, d or r)"
    return InvalidPayload(f"{field}: {base}", field=field)


def _check_media_type(content_type: str, accepted: frozenset[str], provider: str) -> None:
    if media_type(content_type) not in accepted:
        raise UnsupportedMediaType(
            f"{provider} sends {' or '.join(sorted(accepted))}, got {content_type!r}"
        )


# -- shared helpers ------------------------------------------------------------


def _canonical(value: Any) -> str:
    return msgspec.json.encode(value, order="sorted").decode()


def _bounded(text: str) -> str:
    if len(text) <= _MAX_KEY_TEXT:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _qualified(schema: str | None, table: str) -> str:
    return f"{schema}.{table}" if schema else table


def _key_from_row(row: dict[str, Any] | None) -> dict[str, Any]:
    if row:
        for column in ("id", "_id"):
            if column in row:
                return {column: row[column]}
    return {}


def _is_null(raw: bytes | msgspec.Raw) -> bool:
    return bytes(raw).strip() in (b"", b"null")


# -- Debezium ------------------------------------------------------------------

_TOMBSTONE = (
    "a Debezium tombstone (the null value that follows a delete for Kafka log "
    "compaction) carries no change; set tombstones.on.delete=false"
)


def _locate(body: bytes) -> tuple[bytes, str, Any]:
    """Find the change event payload: its bytes, its path prefix, and the key if sent."""
    if _is_null(body):
        _invalid(f"the body is empty or null: {_TOMBSTONE}", "")
    level = body
    prefix = ""
    key: Any = None
    try:
        top = _TOP.decode(level)
        if "value" in top and not {"op", "source", "payload"} & top.keys():
            if "key" in top:
                key = _ANY.decode(top["key"])
            prefix = "value."
            if _is_null(top["value"]):
                _invalid(f"value is null: {_TOMBSTONE}", prefix)
            level = bytes(top["value"])
            top = _TOP.decode(level)
        if "payload" in top and not {"op", "source"} & top.keys():
            prefix += "payload."
            if _is_null(top["payload"]):
                _invalid(f"payload is null: {_TOMBSTONE}", prefix)
            level = bytes(top["payload"])
    except msgspec.DecodeError as exc:
        raise _from_msgspec(exc, "a Debezium change event", prefix) from None
    except RecursionError:
        raise InvalidPayload("the body is nested too deeply") from None
    return level, prefix, key


def _explicit_key(key: Any) -> dict[str, Any] | None:
    """The envelope's key, unwrapped from the JSON converter's schema wrapper."""
    if key is None:
        return None
    if isinstance(key, dict) and set(key) == {"schema", "payload"}:
        key = key["payload"]
        if key is None:
            return None
    if not isinstance(key, dict):
        raise InvalidPayload("key must be a JSON object (the row's key columns)", field="key")
    return key


def _row(value: Row, prefix: str, name: str) -> dict[str, Any] | None:
    """A row image; MongoDB sends it as a string of (extended) JSON."""
    if not isinstance(value, str):
        return value
    decoded: Any = None
    with contextlib.suppress(msgspec.DecodeError, RecursionError):
        decoded = _ANY.decode(value)
    if not isinstance(decoded, dict):
        _invalid(
            f"{prefix}{name} must be a JSON object, a JSON document string or null", prefix, name
        )
    return decoded


def _position(source: _Source) -> str | None:
    parts = [
        f"{wire}:{value}"
        for wire, attr in _POSITION_FIELDS
        if (value := getattr(source, attr)) is not None
    ]
    if (source.ord is not None or not parts) and source.ts_ms is not None:
        # A MongoDB oplog position is (seconds, ordinal); elsewhere the commit
        # time is the last resort.
        parts.append(f"ts_ms:{source.ts_ms}")
    if source.ord is not None:
        parts.append(f"ord:{source.ord}")
    return ";".join(parts) or None


def _committed_at(source: _Source, prefix: str) -> datetime | None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    try:
        if source.ts_us is not None:
            return epoch + timedelta(microseconds=source.ts_us)
        if source.ts_ms is not None:
            return epoch + timedelta(milliseconds=source.ts_ms)
    except (OverflowError, ValueError):
        name = "ts_us" if source.ts_us is not None else "ts_ms"
        _invalid(f"{prefix}source.{name} is not a usable timestamp", prefix, f"source.{name}")
    return None


def decode_debezium(body: bytes, content_type: str, source: str) -> Decoded:
    """One Debezium change event (see the module docstring for the choices made)."""
    _check_media_type(content_type, DEBEZIUM_MEDIA_TYPES, "Debezium")
    payload_bytes, prefix, envelope_key = _locate(body)
    try:
        payload = _PAYLOAD.decode(payload_bytes)
    except msgspec.DecodeError as exc:
        raise _from_msgspec(exc, "a Debezium change event", prefix) from None
    except RecursionError:
        raise InvalidPayload("the body is nested too deeply") from None

    op = payload.op
    if op is None:
        if payload.status is not None:
            _invalid(
                f"a Debezium transaction metadata event (status {payload.status}) is not a row "
                "change; send only the data change events",
                prefix,
                "op",
            )
        if payload.ddl is not None:
            _invalid("a Debezium schema change event is not a row change", prefix, "op")
        _invalid(f"{prefix}op is missing: not a Debezium change event", prefix, "op")
    if op in ("t", "m"):
        kind = "a truncate" if op == "t" else "a logical decoding message"
        _invalid(
            f"{prefix}op is {op!r}: {kind} is not a row change (only c, u, d and r are taken)",
            prefix,
            "op",
        )
    src = payload.source
    if src is None:
        _invalid(f"{prefix}source is missing: not a Debezium change event", prefix, "source")
    table = src.table or src.collection
    if not table:
        _invalid(f"{prefix}source.table is missing or empty", prefix, "source.table")

    before = _row(payload.before, prefix, "before")
    after = _row(payload.after, prefix, "after")
    if after is None and op in ("c", "r"):
        _invalid(f"{prefix}after is null: a {op!r} event must carry the new row", prefix, "after")

    key = _explicit_key(envelope_key)
    if key is None:
        key = _key_from_row(before if op == "d" or after is None else after)

    schema = src.schema or src.db
    qualified = _qualified(schema, table)
    key_text = _bounded(_canonical(key))
    position = _position(src)

    delivery_id: str | None = None
    if position is not None:
        row_id = key_text
        if not key:
            digest = hashlib.sha256(_canonical([before, after]).encode()).hexdigest()[:32]
            row_id = f"row:{digest}"
        delivery_id = f"{src.name or src.connector or ''}:{position}:{qualified}:{op}:{row_id}"

    event = RowChanged(
        source=source,
        provider="debezium",
        table=table,
        op=op,
        schema=schema,
        key=key,
        before=before,
        after=after,
        source_position=position,
        committed_at=_committed_at(src, prefix),
    )
    return Decoded(body=event, delivery_id=delivery_id, partition_key=f"{qualified}:{key_text}")


# -- Supabase ------------------------------------------------------------------


def decode_supabase(body: bytes, content_type: str, source: str) -> Decoded:
    """One Supabase Database Webhooks payload (see the module docstring)."""
    _check_media_type(content_type, SUPABASE_MEDIA_TYPES, "Supabase")
    try:
        payload = _SUPABASE.decode(body)
    except msgspec.DecodeError as exc:
        raise _from_msgspec(exc, "a Supabase webhook", "") from None
    except RecursionError:
        raise InvalidPayload("the body is nested too deeply") from None

    if not payload.table:
        _invalid("table is empty", "", "table")
    if payload.type == "DELETE":
        if payload.old_record is None:
            _invalid("old_record is null: a DELETE must carry the deleted row", "", "old_record")
    elif payload.record is None:
        _invalid(f"record is null: an {payload.type} must carry the new row", "", "record")

    row = payload.old_record if payload.type == "DELETE" else payload.record
    key = {"id": row["id"]} if row is not None and "id" in row else {}
    qualified = _qualified(payload.schema, payload.table)
    event = RowChanged(
        source=source,
        provider="supabase",
        table=payload.table,
        op=_SUPABASE_OPS[payload.type],
        schema=payload.schema,
        key=key,
        before=payload.old_record,
        after=payload.record,
    )
    return Decoded(
        body=event,
        delivery_id=None,
        partition_key=f"{qualified}:{_bounded(_canonical(key))}",
    )
