"""A stream entry as an event: what the ingress, the relay, timers and redrives write."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from runtime.errors import InvalidDelivery
from runtime.events.model import LogPosition


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A stream entry as an event: written by the ingress, the relay, timers or a redrive."""

    stream: str
    entry_id: str
    event_id: UUID
    type: str
    schema_version: int
    body: bytes
    run_id: UUID
    causation_id: UUID | None = None
    producer: str | None = None
    recorded_at: datetime | None = None
    #: Where the event sits in the log, for events relayed from it (None: ingress).
    position: LogPosition | None = None
    #: Bumped by each redrive: a fresh activation (fresh steps) for the same event.
    generation: int = 0
    #: A redrive forced past the inbox (``agentrt dlq redrive --force`` of an event
    #: its agent had handled): a second activation with an inbox row of its own.
    forced: bool = False
    #: The W3C ``traceparent`` of the span that produced the event (the entry's
    #: ``traceparent`` field): its activation's span continues that trace.
    trace: str | None = None

    @property
    def in_log(self) -> bool:
        return self.position is not None

    @property
    def inbox_id(self) -> UUID:
        """The id the inbox row and the activation claim are keyed by (:func:`inbox_id`)."""
        return inbox_id(self.event_id, self.generation, forced=self.forced)


def inbox_id(event_id: UUID, generation: int, *, forced: bool) -> UUID:
    """The event's id, or for a forced redrive one of its own (so it commits once more, once)."""
    if not forced:
        return event_id
    return uuid.uuid5(event_id, f"forced-redrive/{generation}")


def text(value: Any) -> str:
    """A Redis reply's bytes as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_delivery(stream: str, entry_id: str, fields: dict[Any, Any]) -> Delivery:
    """The entry's event, or :class:`InvalidDelivery` naming what is wrong with it."""
    f = {text(k): v for k, v in fields.items()}
    try:
        event_id = UUID(text(f["event_id"]))
        run_raw = f.get("run_id")
        cause = f.get("causation_id")
        at = f.get("recorded_at") or f.get("received_at")
        body = f["body"]
        return Delivery(
            stream=stream,
            entry_id=entry_id,
            event_id=event_id,
            type=text(f["type"]),
            schema_version=int(text(f.get("schema_version", b"1"))),
            body=body if isinstance(body, bytes) else str(body).encode(),
            run_id=UUID(text(run_raw)) if run_raw else event_id,
            causation_id=UUID(text(cause)) if cause else None,
            producer=text(f["producer"]) if f.get("producer") else (
                f"ingress:{text(f['source'])}" if f.get("source") else None),
            recorded_at=datetime.fromisoformat(text(at)) if at else None,
            position=LogPosition.parse(text(f["position"])) if f.get("position") else None,
            generation=int(text(f.get("generation", b"0"))),
            forced=text(f.get("forced", b"")) == "1",
            trace=text(f["traceparent"]) if f.get("traceparent") else None,
        )  # fmt: skip
    except KeyError as exc:
        raise InvalidDelivery(stream, entry_id, f"field {exc.args[0]!r} is missing") from None
    except ValueError as exc:
        raise InvalidDelivery(stream, entry_id, str(exc)) from None


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
