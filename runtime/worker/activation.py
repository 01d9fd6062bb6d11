"""The activation core: one handler run against its recorded steps. No Redis, no SQL.

Given an agent, its trigger, the run's history (for ``ctx.state``) and the
activation's :class:`~runtime.effects.steps.Steps`, :func:`activate` runs the
handler and returns what the activation produced: the events it emitted and
its ``activation.completed``, ready to commit in one transaction, and the
steps it took. The worker calls it between reading an entry and committing;
replay, fork and time travel call it with the steps the log recorded
(``Steps(None, recorded=...)``), so every one of them runs the same code.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

import structlog

from runtime.agents.agent import Agent
from runtime.agents.context import FROM_START, Context, Services, Trigger
from runtime.effects.steps import Steps
from runtime.errors import BudgetExceeded, InvalidTransition
from runtime.events.builtin import ActivationCompleted
from runtime.events.model import Event, NewEvent, RecordedEvent
from runtime.ops.tracing import current_traceparent

log = structlog.get_logger(__name__)

Spend = tuple[int, float] | Callable[[], Awaitable[tuple[int, float]]]


@dataclasses.dataclass(frozen=True, slots=True)
class Activation:
    """What one run of a handler produced."""

    #: ``completed``, ``budget_exceeded`` when a model call would have gone over budget, or
    #: ``transition_refused`` when an InvalidTransition escaped the handler.
    outcome: str
    #: What the handler emitted (dropped when the budget stopped the run).
    emitted: list[NewEvent]
    #: Everything to commit with the inbox marker: ``emitted``, a budget stop's
    #: ``run.budget_exceeded``, then ``activation.completed``.
    outputs: list[NewEvent]
    #: The steps taken: ``steps.count`` of them, ``steps.reused`` answered from the record.
    steps: Steps


async def activate(
    agent: Agent,
    trigger: Trigger,
    *,
    activation_id: UUID,
    steps: Steps,
    services: Services,
    history: Sequence[RecordedEvent] = (),
    spent: Spend = (0, 0.0),
    state: Any = FROM_START,
) -> Activation:
    """Run ``agent.handle(trigger.body, ctx)`` and collect its outputs.

    The handler's own errors propagate (the caller retries or dead-letters);
    a :class:`~runtime.errors.BudgetExceeded` ends the activation with outcome
    ``budget_exceeded``, keeping the reason and dropping what was emitted (an
    activation commits whole or not at all); an uncaught
    :class:`~runtime.errors.InvalidTransition` likewise, with outcome
    ``transition_refused`` and its ``state.transition_refused``. A handler that no longer takes
    steps the record holds raises :class:`~runtime.errors.StepDivergence`.

    ``ctx.state`` is ``state`` (a snapshot's, when one was loaded; else the
    agent's initial state) with ``history`` folded on top.
    """
    ctx = Context(
        agent=agent,
        trigger=trigger,
        activation_id=activation_id,
        steps=steps,
        services=services,
        history=list(history),
        spent=spent,
        state=state,
    )
    started = time.perf_counter()
    outcome = "completed"
    extra: list[Event] = []
    try:
        await agent.handle(trigger.body, ctx)
        steps.check_complete()
    except BudgetExceeded as stop:
        log.warning("run.budget_exceeded", detail=str(stop))
        outcome = "budget_exceeded"
        ctx.emitted.clear()
        if isinstance(stop.event, Event):
            extra.append(stop.event)
    except InvalidTransition as refused:
        # Deterministic (the state is the log's): retrying would refuse again. The
        # activation ends here and commits the refusal alone, never half its work.
        log.warning("state.transition_refused", detail=str(refused))
        outcome = "transition_refused"
        ctx.emitted.clear()
        if isinstance(refused.event, Event):
            extra.append(refused.event)
    completed = ActivationCompleted(
        agent=agent.name,
        activation_id=activation_id,
        trigger_id=trigger.event_id,
        trigger_type=trigger.type,
        steps=steps.count,
        emitted=[e.event_id for e in ctx.emitted],
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        outcome=outcome,
    )
    trace = current_traceparent()
    outputs = [
        *ctx.emitted,
        *(
            NewEvent(
                body=e,
                run_id=trigger.run_id,
                causation_id=trigger.event_id,
                producer=agent.name,
                trace=trace,
            )
            for e in [*extra, completed]
        ),
    ]
    return Activation(outcome=outcome, emitted=list(ctx.emitted), outputs=outputs, steps=steps)
