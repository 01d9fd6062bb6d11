"""agentrt's public API: what an application imports (``from runtime import Agent, ...``).

Names load lazily (PEP 562), so ``import runtime.events`` pulls in neither the
model SDK nor the database and Redis drivers; ``from runtime import Worker``
loads what a worker needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # agents: what users write against
    "Agent": "runtime.agents.agent",
    "Context": "runtime.agents.context",
    "MachineState": "runtime.agents.machine",
    "StateMachine": "runtime.agents.machine",
    "On": "runtime.agents.filters",
    "Where": "runtime.agents.filters",
    "Budget": "runtime.effects.budget",
    "ToolContext": "runtime.effects.tools",
    "tool": "runtime.effects.tools",
    "Plan": "runtime.agents.supervisor",
    "Specialist": "runtime.agents.supervisor",
    "Subtask": "runtime.agents.supervisor",
    "Supervision": "runtime.agents.supervisor",
    "Supervisor": "runtime.agents.supervisor",
    # events and the log
    "START": "runtime.events.model",
    "Event": "runtime.events.model",
    "EventRegistry": "runtime.events.model",
    "LogPosition": "runtime.events.model",
    "NewEvent": "runtime.events.model",
    "RecordedEvent": "runtime.events.model",
    "UnknownEvent": "runtime.events.model",
    "new_event_id": "runtime.events.model",
    "registry": "runtime.events.model",
    "ApprovalDecided": "runtime.events.builtin",
    "ApprovalRequested": "runtime.events.builtin",
    "ApprovalEscalated": "runtime.events.builtin",
    "SupervisionFinished": "runtime.events.builtin",
    "TaskAssigned": "runtime.events.builtin",
    "TaskCompleted": "runtime.events.builtin",
    "TaskFailed": "runtime.events.builtin",
    "TaskOutcome": "runtime.events.builtin",
    "TimerFired": "runtime.events.builtin",
    "TimerCancelled": "runtime.events.builtin",
    "ActivationCompleted": "runtime.events.builtin",
    "StepRecorded": "runtime.events.builtin",
    "RunForked": "runtime.events.builtin",
    "StateTransitioned": "runtime.events.builtin",
    "StateTransitionRefused": "runtime.events.builtin",
    "causation_order": "runtime.events.causation",
    "ANY_VERSION": "runtime.log.store",
    "NO_STREAM": "runtime.log.store",
    "AppendResult": "runtime.log.store",
    "EventLog": "runtime.log.store",
    "LogQueries": "runtime.log.queries",
    "connect_database": "runtime.log.pool:connect",
    "open_runtime_pool": "runtime.log.pool",
    "audit_seal": "runtime.log.audit:seal",
    "audit_verify": "runtime.log.audit:verify",
    # the model layer
    "LLM": "runtime.llm.calls",
    "LLMResult": "runtime.llm.calls",
    "model_client": "runtime.llm.client",
    "Cache": "runtime.llm.cache",
    "Embedder": "runtime.llm.embed",
    "WordLlamaEmbedder": "runtime.llm.embed",
    "StepRef": "runtime.events.values",
    # running agents
    "Relay": "runtime.worker.relay",
    "connect_redis": "runtime.streams.keys",
    "Worker": "runtime.worker.worker",
    "WorkerOptions": "runtime.worker.options",
    "Settings": "runtime.settings",
    "configure_tracing": "runtime.ops.tracing",
    # errors
    "AgentrtError": "runtime.errors",
    "BudgetExceeded": "runtime.errors",
    "CircuitOpen": "runtime.errors",
    "ConcurrencyConflict": "runtime.errors",
    "DuplicateEventMismatch": "runtime.errors",
    "ErrorCode": "runtime.errors",
    "EventDecodeError": "runtime.errors",
    "InvalidAppend": "runtime.errors",
    "InvalidTransition": "runtime.errors",
    "ServiceUnavailable": "runtime.errors",
    "SettingsError": "runtime.errors",
    "StepDivergence": "runtime.errors",
    "StepFailed": "runtime.errors",
    "UnknownEventType": "runtime.errors",
}

__all__ = [
    "ANY_VERSION",
    "LLM",
    "NO_STREAM",
    "START",
    "ActivationCompleted",
    "Agent",
    "AgentrtError",
    "AppendResult",
    "ApprovalDecided",
    "ApprovalEscalated",
    "ApprovalRequested",
    "Budget",
    "BudgetExceeded",
    "Cache",
    "CircuitOpen",
    "ConcurrencyConflict",
    "Context",
    "DuplicateEventMismatch",
    "Embedder",
    "ErrorCode",
    "Event",
    "EventDecodeError",
    "EventLog",
    "EventRegistry",
    "InvalidAppend",
    "InvalidTransition",
    "LLMResult",
    "LogPosition",
    "LogQueries",
    "MachineState",
    "NewEvent",
    "On",
    "Plan",
    "RecordedEvent",
    "Relay",
    "RunForked",
    "ServiceUnavailable",
    "Settings",
    "SettingsError",
    "Specialist",
    "StateMachine",
    "StateTransitionRefused",
    "StateTransitioned",
    "StepDivergence",
    "StepFailed",
    "StepRecorded",
    "StepRef",
    "Subtask",
    "Supervision",
    "SupervisionFinished",
    "Supervisor",
    "TaskAssigned",
    "TaskCompleted",
    "TaskFailed",
    "TaskOutcome",
    "TimerCancelled",
    "TimerFired",
    "ToolContext",
    "UnknownEvent",
    "UnknownEventType",
    "Where",
    "WordLlamaEmbedder",
    "Worker",
    "WorkerOptions",
    "audit_seal",
    "audit_verify",
    "causation_order",
    "configure_tracing",
    "connect_database",
    "connect_redis",
    "model_client",
    "new_event_id",
    "open_runtime_pool",
    "registry",
    "tool",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    module, _, attr = module.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from runtime.agents.agent import Agent
    from runtime.agents.context import Context
    from runtime.agents.filters import On, Where
    from runtime.agents.machine import MachineState, StateMachine
    from runtime.agents.supervisor import Plan, Specialist, Subtask, Supervision, Supervisor
    from runtime.effects.budget import Budget
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
        InvalidTransition,
        ServiceUnavailable,
        SettingsError,
        StepDivergence,
        StepFailed,
        UnknownEventType,
    )
    from runtime.events.builtin import (
        ActivationCompleted,
        ApprovalDecided,
        ApprovalEscalated,
        ApprovalRequested,
        RunForked,
        StateTransitioned,
        StateTransitionRefused,
        StepRecorded,
        SupervisionFinished,
        TaskAssigned,
        TaskCompleted,
        TaskFailed,
        TaskOutcome,
        TimerCancelled,
        TimerFired,
    )
    from runtime.events.causation import causation_order
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
    from runtime.events.values import StepRef
    from runtime.llm.cache import Cache
    from runtime.llm.calls import LLM, LLMResult
    from runtime.llm.client import model_client
    from runtime.llm.embed import Embedder, WordLlamaEmbedder
    from runtime.log.audit import seal as audit_seal
    from runtime.log.audit import verify as audit_verify
    from runtime.log.pool import connect as connect_database
    from runtime.log.pool import open_runtime_pool
    from runtime.log.queries import LogQueries
    from runtime.log.store import ANY_VERSION, NO_STREAM, AppendResult, EventLog
    from runtime.ops.tracing import configure_tracing
    from runtime.settings import Settings
    from runtime.streams.keys import connect_redis
    from runtime.worker.options import WorkerOptions
    from runtime.worker.relay import Relay
    from runtime.worker.worker import Worker
