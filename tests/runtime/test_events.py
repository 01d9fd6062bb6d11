"""Event bodies, the registry, upcasters and positions."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import EventDecodeError, UnknownEventType
from runtime.events.model import (
    Event,
    EventRegistry,
    LogPosition,
    NewEvent,
    UnknownEvent,
    encode_body,
    new_event_id,
    registry,
)
from tests.support.events import Counted, Noted


@given(text=st.text(), n=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_body_round_trips(text: str, n: int) -> None:
    body = Noted(text=text, n=n)
    assert registry.decode("test.noted", 1, encode_body(body)) == body


def test_bodies_are_frozen_and_tagged() -> None:
    body = Counted(writer=1, seq=2)
    with pytest.raises(AttributeError):
        body.seq = 3  # type: ignore[misc]
    assert msgspec.json.decode(encode_body(body))["type"] == "test.counted"


def test_registry_refuses_bad_and_taken_tags() -> None:
    reg = EventRegistry()

    class Upper(Event, tag="Bad.Tag"):
        __auto_register__ = False

    class Undotted(Event, tag="nodot"):
        __auto_register__ = False

    for cls in (Upper, Undotted):
        with pytest.raises(ValueError, match="dotted lower case"):
            reg.register(cls)

    class First(Event, tag="dup.tag"):
        __auto_register__ = False

    class Second(Event, tag="dup.tag"):
        __auto_register__ = False

    reg.register(First)
    with pytest.raises(ValueError, match="taken"):
        reg.register(Second)


def test_default_registry_finds_subclasses_lazily() -> None:
    class LateComer(Event, tag="test.late_comer"):
        x: int

    assert registry.type_for("test.late_comer") is LateComer


def test_unknown_types_decode_to_a_placeholder_or_raise_when_strict() -> None:
    body = registry.decode("nobody.knows", 4, b'{"a":1}')
    assert isinstance(body, UnknownEvent)
    assert (body.event_type, body.schema_version, bytes(body.data)) == (
        "nobody.knows",
        4,
        b'{"a":1}',
    )
    with pytest.raises(UnknownEventType, match=r"nobody\.knows"):
        registry.decode("nobody.knows", 4, b"{}", strict=True)


def test_upcasters_run_in_order_and_missing_ones_are_named() -> None:
    reg = EventRegistry()

    @reg.register
    class Moved(Event, tag="test.moved"):
        __auto_register__ = False
        __schema_version__ = 3
        to: str
        by: str

    @reg.upcaster("test.moved", from_version=1)
    def v1(doc: dict[str, object]) -> dict[str, object]:
        return {"to": doc["dest"]}

    with pytest.raises(EventDecodeError, match="no upcaster from v2"):
        reg.decode("test.moved", 1, b'{"dest":"x"}')

    @reg.upcaster("test.moved", from_version=2)
    def v2(doc: dict[str, object]) -> dict[str, object]:
        return {**doc, "by": "unknown"}

    assert reg.decode("test.moved", 1, b'{"dest":"x"}') == Moved(to="x", by="unknown")
    assert reg.decode("test.moved", 2, b'{"to":"y"}') == Moved(to="y", by="unknown")
    with pytest.raises(ValueError, match="exists already"):
        reg.upcaster("test.moved", from_version=2)(v2)


def test_a_body_that_does_not_fit_its_type_is_a_decode_error() -> None:
    with pytest.raises(EventDecodeError, match=r"test\.noted"):
        registry.decode("test.noted", 1, b'{"type":"test.noted","text":5}')
    with pytest.raises(EventDecodeError):
        registry.decode("test.noted", 1, b"not json")


def test_new_event_defaults() -> None:
    e = NewEvent(body=Noted(text="x"))
    assert e.event_id.version == 7
    assert e.recorded_at.tzinfo is UTC
    assert new_event_id() > e.event_id  # time-ordered
    assert e.recorded_at <= datetime.now(UTC)


@given(tx=st.integers(min_value=0, max_value=2**63), pos=st.integers(min_value=0, max_value=2**63))
def test_log_position_round_trips_through_text(tx: int, pos: int) -> None:
    p = LogPosition(tx, pos)
    assert LogPosition.parse(str(p)) == p


@pytest.mark.parametrize("text", ["", "12", "a:1", "1:b", "1:2:3", "-1:2", "²:1", "1:٣"])
def test_log_position_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a log position"):
        LogPosition.parse(text)
