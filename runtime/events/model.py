"""Event bodies, their registry and upcasters, and the envelopes the log stores."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar
from uuid import UUID

import msgspec
import uuid_utils.compat as _uuid

from runtime.errors import EventDecodeError, UnknownEventType

_TAG = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")

E = TypeVar("E", bound="Event")
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def new_event_id() -> UUID:
    """A UUIDv7: time-ordered, so ids sort roughly by creation time."""
    uid: UUID = _uuid.uuid7()
    return uid


def utcnow() -> datetime:
    """Now, in UTC, at the microsecond precision PostgreSQL stores."""
    return datetime.now(UTC)


if TYPE_CHECKING:
    # mypy's dataclass_transform support would make every subclass repeat
    # frozen=True; bodies are frozen at run time all the same (tested).
    _Base = msgspec.Struct
else:

    class _Base(msgspec.Struct, frozen=True):
        pass


class Event(_Base, kw_only=True, tag_field="type"):
    """Base of every event body.

    Subclass it with a stable dotted tag and, when the schema changes in a way
    old readers cannot absorb, bump ``__schema_version__`` and register an
    upcaster for the previous version::

        class EmailReceived(Event, tag="email.received"):
            __schema_version__ = 2
            message_id: str
            subject: str = ""

    Evolution rules (msgspec's): new fields get defaults, existing field types
    never change, tags never change.
    """

    __schema_version__: ClassVar[int] = 1
    #: Set to False in a class body to keep that class out of the default
    #: registry (for a type that only an explicit EventRegistry should know).
    __auto_register__: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The tag is only known once msgspec has finished the class, so the
        # registry picks pending classes up lazily (see EventRegistry._sync).
        if cls.__dict__.get("__auto_register__", True):
            _PENDING.append(cls)


_PENDING: list[type[Event]] = []


class UnknownEvent(Event, tag="agentrt.unknown"):
    """Stands in for a stored event whose type this process does not know.

    Readers such as ``agentrt log tail`` and audit keep working across
    deployments that add event types; strict readers raise instead.
    """

    __auto_register__ = False

    event_type: str
    schema_version: int
    data: msgspec.Raw


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes ``²`` and other digits ``int()`` refuses."""
    return text.isascii() and text.isdigit()


class LogPosition(NamedTuple):
    """Where an event sits in the log's one stable order.

    The order is (transaction id, position). A bigserial position alone can
    commit out of order, so a reader that advanced by position would pass
    over a lower position still to be committed. Ordering by the writing
    transaction's id first, and reading only below the oldest transaction
    still running, gives an order in which nothing can appear behind a reader.
    """

    tx: int
    position: int

    def __str__(self) -> str:
        return f"{self.tx}:{self.position}"

    @classmethod
    def parse(cls, text: str) -> LogPosition:
        tx, sep, position = text.partition(":")
        if not sep or not _digits(tx) or not _digits(position):
            raise ValueError(f"{text!r} is not a log position (expected TX:POSITION)")
        return cls(int(tx), int(position))


START = LogPosition(0, 0)


class Cursor(NamedTuple):
    """A saved place in the log: a position and the id of the event read there.

    A server that loses its last commits (``synchronous_commit=off``, or a
    failover to an asynchronous standby) hands their transaction ids and
    positions out again, so a bare position saved before the loss can point
    past the new events. The event id lets a reader check on resume that the
    position still holds what it read (:meth:`EventLog.confirm
    <runtime.log.store.EventLog.confirm>`). Written ``TX:POSITION:EVENT_ID``;
    a bare ``TX:POSITION`` parses too (its event is then only checked to exist).
    """

    position: LogPosition
    event_id: UUID | None = None

    def __str__(self) -> str:
        if self.event_id is None:
            return str(self.position)
        return f"{self.position}:{self.event_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        tx, sep, rest = text.partition(":")
        position, _, event_id = rest.partition(":")
        try:
            where = LogPosition.parse(f"{tx}{sep}{position}")
            return cls(where, UUID(event_id) if event_id else None)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a log cursor (expected TX:POSITION or TX:POSITION:EVENT_ID)"
            ) from None

    @classmethod
    def of(cls, event: RecordedEvent) -> Cursor:
        """The cursor just past ``event`` (resuming there reads what follows it)."""
        return cls(LogPosition(event.tx, event.position), event.event_id)


#: The beginning of the log: nothing to check.
START_CURSOR = Cursor(START)


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event on its way into the log: a body plus the writer's metadata."""

    body: Event
    event_id: UUID = msgspec.field(default_factory=new_event_id)
    run_id: UUID | None = None
    causation_id: UUID | None = None
    producer: str | None = None
    #: W3C ``traceparent`` of the span that produced the event.
    trace: str | None = None
    recorded_at: datetime = msgspec.field(default_factory=utcnow)


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as the log holds it: envelope, typed body and hash-chain fields.

    Fields are in the order the log selects its columns, so the read path
    builds one positionally (five times faster than by keyword).
    """

    position: int
    tx: int
    event_id: UUID
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    run_id: UUID | None
    causation_id: UUID | None
    producer: str | None
    recorded_at: datetime
    trace: str | None
    body: Event
    prev_hash: bytes
    hash: bytes

    @property
    def log_position(self) -> LogPosition:
        return LogPosition(self.tx, self.position)


class EventRegistry:
    """Maps dotted tags to body types and turns stored bytes back into bodies.

    Decoders are built once per type. A stored body older than its type's
    current schema version runs through the registered upcasters, one version
    at a time, before it is converted; the stored bytes are never rewritten.
    """

    def __init__(self, types: Iterable[type[Event]] = (), *, auto: bool = False) -> None:
        self._types: dict[str, type[Event]] = {}
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        #: tag -> (decoder, current schema version): the read path's one lookup.
        self._fast: dict[str, tuple[msgspec.json.Decoder[Any], int]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._auto = auto
        self._seen_pending = 0
        for cls in types:
            self.register(cls)

    def register(self, cls: type[E]) -> type[E]:
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise ValueError(
                f"{cls.__qualname__}: event tag must be dotted lower case, got {tag!r}"
            )
        version = cls.__schema_version__
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{cls.__qualname__}: __schema_version__ must be an int >= 1")
        existing = self._types.get(tag)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"event tag {tag!r} is taken by {existing.__module__}.{existing.__qualname__}"
            )
        self._types[tag] = cls
        self._decoders[tag] = msgspec.json.Decoder(cls)
        self._fast[tag] = (self._decoders[tag], version)
        return cls

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register ``fn`` to turn ``event_type`` v``from_version`` into v``from_version+1``."""

        def decorate(fn: Upcaster) -> Upcaster:
            key = (event_type, from_version)
            if key in self._upcasters:
                raise ValueError(f"an upcaster for {event_type} v{from_version} exists already")
            self._upcasters[key] = fn
            return fn

        return decorate

    def _sync(self) -> None:
        if self._auto and self._seen_pending < len(_PENDING):
            for cls in _PENDING[self._seen_pending :]:
                if cls.__struct_config__.tag is not None:
                    self.register(cls)
            self._seen_pending = len(_PENDING)

    def type_for(self, event_type: str) -> type[Event]:
        self._sync()
        try:
            return self._types[event_type]
        except KeyError:
            raise UnknownEventType(event_type) from None

    def __contains__(self, event_type: str) -> bool:
        self._sync()
        return event_type in self._types

    def types(self) -> dict[str, type[Event]]:
        self._sync()
        return dict(self._types)

    def decode(
        self, event_type: str, schema_version: int, data: bytes | str, *, strict: bool = False
    ) -> Event:
        """Decode a stored body, upcasting it first if it is older than its type."""
        fast = self._fast.get(event_type)
        if fast is not None and fast[1] == schema_version:
            try:
                return fast[0].decode(data)  # type: ignore[no-any-return]
            except msgspec.ValidationError as exc:
                raise EventDecodeError(event_type, schema_version, str(exc)) from exc
            except msgspec.DecodeError as exc:
                raise EventDecodeError(event_type, schema_version, str(exc)) from exc
        decoder = self._decoders.get(event_type)
        if decoder is None:
            self._sync()
            decoder = self._decoders.get(event_type)
            if decoder is None:
                if strict:
                    raise UnknownEventType(event_type)
                raw = data.encode() if isinstance(data, str) else data
                return UnknownEvent(
                    event_type=event_type, schema_version=schema_version, data=msgspec.Raw(raw)
                )
        cls = self._types[event_type]
        try:
            if schema_version == cls.__schema_version__:
                return decoder.decode(data)  # type: ignore[no-any-return]
            if schema_version > cls.__schema_version__:
                # Written by a newer deployment: msgspec ignores fields it does
                # not know, so this succeeds whenever the evolution rules held.
                return decoder.decode(data)  # type: ignore[no-any-return]
            doc = msgspec.json.decode(data)
            if not isinstance(doc, dict):
                raise EventDecodeError(event_type, schema_version, "body is not an object")
            for version in range(schema_version, cls.__schema_version__):
                upcast = self._upcasters.get((event_type, version))
                if upcast is None:
                    raise EventDecodeError(
                        event_type, schema_version, f"no upcaster from v{version}"
                    )
                doc = upcast(doc)
            doc["type"] = event_type
            return msgspec.convert(doc, cls)
        except msgspec.ValidationError as exc:
            raise EventDecodeError(event_type, schema_version, str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise EventDecodeError(event_type, schema_version, str(exc)) from exc


#: Every ``Event`` subclass with a tag joins this registry when first looked up.
registry = EventRegistry(auto=True)

_encoder = msgspec.json.Encoder()


def encode_body(body: Event) -> bytes:
    """The stored bytes of a body (JSON, its tag included)."""
    return _encoder.encode(body)


def event_type_of(body: Event) -> str:
    tag = body.__struct_config__.tag
    assert isinstance(tag, str)
    return tag
