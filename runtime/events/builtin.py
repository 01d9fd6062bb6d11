"""The events the agent runtime writes into the log about what agents did."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from runtime.events.model import Event
from runtime.events.values import AttemptRecord, StepError, StepRef, Usage


class StepRecorded(Event, tag="step.recorded"):
    """One durable step of an activation: an LLM call or a tool call, and what it returned.

    Stored in the stream ``act-<activation id>`` at version = step number, so the
    unique (stream, version) index makes a step's result single: a second worker
    that ran the same step loses the append and takes the recorded result.
    """

    activation_id: UUID
    agent: str
    step: int
    kind: str
    name: str
    #: sha256 of the canonical request; a different request at this step is a divergence.
    request_hash: str
    request: Any
    result: Any = None
    error: StepError | None = None
    #: The failed attempts before the result (retries, with their reasons and delays).
    attempts: list[AttemptRecord] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    duration_ms: float = 0.0
    #: A model step answered by the agent's response cache (``Agent.cache``): the step whose
    #: recorded result this one repeats (no model was called, ``usage`` is None).
    cached_from: StepRef | None = None
    #: What the cached answer would have cost to ask again: the original step's usage.
    saved: Usage | None = None


class ActivationCompleted(Event, tag="activation.completed"):
    """An activation committed: its trigger, steps and emitted events are in the log."""

    agent: str
    activation_id: UUID
    trigger_id: UUID
    trigger_type: str
    steps: int
    emitted: list[UUID] = msgspec.field(default_factory=list)
    duration_ms: float = 0.0
    outcome: str = "completed"


class ActivationDeadLettered(Event, tag="activation.dead_lettered"):
    """An event whose activation failed too often went to the dead-letter stream."""

    agent: str
    activation_id: UUID
    trigger_id: UUID
    trigger_type: str
    stream: str
    entry_id: str
    deliveries: int
    error_type: str
    error: str
    error_code: str | None = None


class DeadLetterRedriven(Event, tag="dead_letter.redriven"):
    """An operator sent a dead letter back to its agent (a fresh activation)."""

    agent: str
    trigger_id: UUID
    dead_letter_id: str
    generation: int
    to_stream: str
    #: Redriven with ``--force`` although the agent had handled the event.
    forced: bool = False


class RunBudgetExceeded(Event, tag="run.budget_exceeded"):
    """A model call would have taken the run past its budget, so it was not made."""

    agent: str
    activation_id: UUID
    step: int
    spent_tokens: int
    spent_usd: float
    requested_tokens: int
    requested_usd: float
    budget_tokens: int | None = None
    budget_usd: float | None = None


class CircuitTransitioned(Event, tag="circuit.transitioned"):
    """A tool's circuit breaker changed state (shared by every worker through Redis)."""

    name: str
    from_state: str
    to_state: str
    failures: int = 0
    reason: str = ""


class TimerScheduled(Event, tag="timer.scheduled"):
    """``ctx.sleep_until``: a ``timer.fired`` is due for ``agent`` at ``due_at``."""

    timer_id: UUID
    agent: str
    name: str
    due_at: datetime
    payload: Any = None


class TimerCancelled(Event, tag="timer.cancelled"):
    """``ctx.cancel_timer``: a scheduled timer that is no longer wanted (a subtask's timeout
    once it is settled). It does not fire; if it fired already, this changes nothing."""

    timer_id: UUID
    agent: str


class TimerFired(Event, tag="timer.fired"):
    """A durable timer came due; delivered to the agent that scheduled it."""

    timer_id: UUID
    agent: str
    name: str
    due_at: datetime
    payload: Any = None


#: The name of the timer that applies an approval's default at its deadline.
APPROVAL_DEADLINE = "approval.deadline"


class ApprovalRequested(Event, tag="approval.requested"):
    """A run waits for a human: an ``approval.decided`` with this id resumes it."""

    approval_id: UUID
    agent: str
    subject: str
    details: Any = None
    #: When the ``default`` applies if nobody decided (None: the request waits for ever).
    deadline: datetime | None = None
    #: What happens at the deadline: ``approve``, ``deny`` (an ``approval.decided`` by
    #: ``deadline``) or ``escalate`` (an ``approval.escalated`` to ``escalate_to``).
    default: str | None = None
    escalate_to: str | None = None


class ApprovalDecided(Event, tag="approval.decided"):
    """The answer to an ``approval.requested``: a human's, or the default at its deadline
    (``by == "deadline"``). There is one per approval: the first one stands."""

    approval_id: UUID
    approved: bool
    by: str = ""
    comment: str = ""


class ApprovalEscalated(Event, tag="approval.escalated"):
    """Nobody decided by the deadline: the request goes to the agent ``to`` (it stays open)."""

    approval_id: UUID
    to: str
    subject: str
    details: Any = None
    deadline: datetime | None = None


class TaskAssigned(Event, tag="task.assigned"):
    """A supervisor gave a subtask to one specialist agent (delivered to ``worker`` only)."""

    task_id: UUID
    supervisor: str
    worker: str
    description: str
    priority: int = 0
    #: Seconds the supervisor waits for the result before giving the subtask up.
    timeout: float = 0.0
    #: The request the plan was made for (context for the specialist).
    request: str = ""


class TaskCompleted(Event, tag="task.completed"):
    """A specialist's result for a subtask (delivered to its ``supervisor`` only)."""

    task_id: UUID
    supervisor: str
    worker: str
    result: Any = None


class TaskFailed(Event, tag="task.failed"):
    """A subtask that could not be done (delivered to its ``supervisor`` only)."""

    task_id: UUID
    supervisor: str
    worker: str
    error: str
    error_type: str = ""


class TaskOutcome(msgspec.Struct, kw_only=True):
    """One subtask of a supervised request, as it ended (or ``pending``, while it runs)."""

    task_id: UUID
    worker: str
    description: str
    priority: int = 0
    timeout: float = 0.0
    #: ``pending``, ``completed``, ``failed`` or ``timed_out``.
    status: str = "pending"
    result: Any = None
    error: str | None = None
    #: The durable timer that gives it up (cancelled once the supervision finishes).
    timer_id: UUID | None = None


class SupervisionFinished(Event, tag="supervision.finished"):
    """A supervisor's synthesis: every subtask's outcome (completed, failed or timed out,
    none hidden) and what the supervisor made of them."""

    supervisor: str
    request: str
    outcomes: list[TaskOutcome]
    result: Any = None
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    #: Why there are no subtasks at all (the plan could not be made), else None.
    error: str | None = None


def addressed_to(body: Event) -> str | None:
    """The one agent an addressed event goes to (a timer's, a task's, an escalation's),
    else None (every agent subscribed to its type)."""
    if isinstance(body, TimerFired):
        return body.agent
    if isinstance(body, TaskAssigned):
        return body.worker
    if isinstance(body, TaskCompleted | TaskFailed):
        return body.supervisor
    if isinstance(body, ApprovalEscalated):
        return body.to
    return None


class RunForked(Event, tag="run.forked"):
    """The first event of a run forked from another (``agentrt fork``): where it branched
    and what it changed. The parent run is untouched."""

    parent_run_id: UUID
    #: The run-level step (1-based, in replay order) from which the fork ran live.
    at_step: int
    #: The forked run's trigger: a copy of the parent's, or the ``--input-file`` body.
    trigger_id: UUID
    model: str | None = None
    tier: str | None = None
    #: The system prompt given with ``--prompt-file`` (its text), used from ``at_step`` on.
    prompt: str | None = None
    input_changed: bool = False


class StateTransitioned(Event, tag="state.transitioned"):
    """A state machine agent moved its run from one declared state to another
    (``ctx.transition``); committed with the activation, ahead of what it emitted."""

    agent: str
    from_state: str
    to_state: str
    reason: str = ""


class StateTransitionRefused(Event, tag="state.transition_refused"):
    """``ctx.transition`` asked for a transition the agent does not declare: refused
    (:class:`~runtime.errors.InvalidTransition`), the run's state unchanged."""

    agent: str
    from_state: str
    to_state: str
    #: The states the machine may go to from ``from_state``.
    allowed: list[str] = msgspec.field(default_factory=list)
    reason: str = ""


#: Event types that only record what happened and are never delivered to agents.
BOOKKEEPING = frozenset(
    {
        "step.recorded",
        "activation.completed",
        "activation.dead_lettered",
        "dead_letter.redriven",
        "circuit.transitioned",
        "run.forked",
    }
)
