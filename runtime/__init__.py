"""agentrt's core: events, the PostgreSQL event log, settings and embedded servers."""

from __future__ import annotations

from runtime.errors import (
    AgentrtError,
    ConcurrencyConflict,
    DuplicateEventMismatch,
    ErrorCode,
    EventDecodeError,
    InvalidAppend,
    ServiceUnavailable,
    SettingsError,
    UnknownEventType,
)
from runtime.events import (
    START,
    Event,
    EventRegistry,
    LogPosition,
    NewEvent,
    RecordedEvent,
    UnknownEvent,
    new_event_id,
    registry,
)
from runtime.log import ANY_VERSION, NO_STREAM, AppendResult, EventLog
from runtime.settings import Settings

__all__ = [
    "ANY_VERSION",
    "NO_STREAM",
    "START",
    "AgentrtError",
    "AppendResult",
    "ConcurrencyConflict",
    "DuplicateEventMismatch",
    "ErrorCode",
    "Event",
    "EventDecodeError",
    "EventLog",
    "EventRegistry",
    "InvalidAppend",
    "LogPosition",
    "NewEvent",
    "RecordedEvent",
    "ServiceUnavailable",
    "Settings",
    "SettingsError",
    "UnknownEvent",
    "UnknownEventType",
    "new_event_id",
    "registry",
]
