"""agentrt's core: events, the PostgreSQL event log, agents and their workers, settings."""

from __future__ import annotations

from runtime.agents.agent import Agent, Budget
from runtime.agents.context import Context
from runtime.effects.tools import ToolContext, tool
from runtime.errors import (
    AgentrtError,
    BudgetExceeded,
    CircuitOpen,
    ConcurrencyConflict,
    DuplicateEventMismatch,
    ErrorCode,
    EventDecodeError,
    InvalidAppend,
    ServiceUnavailable,
    SettingsError,
    StepDivergence,
    StepFailed,
    UnknownEventType,
)
from runtime.events.builtin import ApprovalDecided, ApprovalRequested, TimerFired
from runtime.events.model import (
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
from runtime.log.store import ANY_VERSION, NO_STREAM, AppendResult, EventLog
from runtime.settings import Settings
from runtime.worker.worker import Worker, WorkerOptions

__all__ = [
    "ANY_VERSION",
    "NO_STREAM",
    "START",
    "Agent",
    "AgentrtError",
    "AppendResult",
    "ApprovalDecided",
    "ApprovalRequested",
    "Budget",
    "BudgetExceeded",
    "CircuitOpen",
    "ConcurrencyConflict",
    "Context",
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
    "StepDivergence",
    "StepFailed",
    "TimerFired",
    "ToolContext",
    "UnknownEvent",
    "UnknownEventType",
    "Worker",
    "WorkerOptions",
    "new_event_id",
    "registry",
    "tool",
]
