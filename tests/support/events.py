"""Event types the tests append."""

from __future__ import annotations

from runtime.events.model import Event


class Noted(Event, tag="test.noted"):
    text: str
    n: int = 0


class Counted(Event, tag="test.counted"):
    writer: int
    seq: int
