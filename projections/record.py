"""A past run as the log recorded it: its events, and its activations in the order they ran.

Replay, fork, diff and time travel all start here. Everything is read from the
log (one query: :meth:`EventLog.read_run`); nothing is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from uuid import UUID

from projections.errors import StepOutOfRange, UnknownRun
from runtime.events.builtin import ActivationCompleted, ActivationDeadLettered, StepRecorded
from runtime.events.model import RecordedEvent
from runtime.log.store import EventLog


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedActivation:
    """One activation of the run: its trigger, the steps it took, what it emitted."""

    agent: str
    activation_id: UUID
    trigger: RecordedEvent
    #: step number -> the recorded step (numbered 1.. within the activation).
    steps: dict[int, StepRecorded]
    #: The events it emitted, in the order it emitted them.
    emitted: list[RecordedEvent]
    #: Its ``activation.completed`` (None for an activation that was dead-lettered).
    completed: ActivationCompleted | None
    #: Its ``activation.dead_lettered`` (None unless it was).
    dead_lettered: ActivationDeadLettered | None
    #: The event that ends it in the log (completion or dead letter): the order activations ran in.
    end: RecordedEvent
    #: Run-level number of its first step (1-based, in replay order).
    first_step: int

    @property
    def outcome(self) -> str:
        if self.completed is not None:
            return self.completed.outcome
        return "dead_lettered"

    @property
    def step_count(self) -> int:
        if self.completed is not None:
            return self.completed.steps
        return len(self.steps)


@dataclasses.dataclass(frozen=True, slots=True)
class RunRecord:
    """A run's events in log order and its activations in the order they committed."""

    run_id: UUID
    events: list[RecordedEvent]
    activations: list[RecordedActivation]

    @property
    def root(self) -> RecordedEvent:
        """The run's first event: its trigger (its id is the run id)."""
        for e in self.events:
            if e.event_id == self.run_id:
                return e
        return self.events[0]

    @property
    def step_total(self) -> int:
        return sum(a.step_count for a in self.activations)

    def history_before(self, trigger: RecordedEvent) -> list[RecordedEvent]:
        """The events ``ctx.state`` folds for an activation of ``trigger``.

        The worker's rule (``Worker._history``): nothing for the run's root
        event, otherwise the run's events committed before the trigger.
        """
        if trigger.event_id == self.run_id:
            return []
        at = trigger.log_position
        return [e for e in self.events if e.log_position < at]

    def locate(self, step: int) -> tuple[RecordedActivation, int]:
        """The activation holding run-level ``step`` and the step's number within it."""
        total = self.step_total
        if total == 0:
            raise StepOutOfRange(f"run {self.run_id} took no steps")
        if not 1 <= step <= total:
            raise StepOutOfRange(
                f"run {self.run_id} has steps 1..{total}; step {step} is outside them"
            )
        for a in self.activations:
            if a.first_step <= step < a.first_step + a.step_count:
                return a, step - a.first_step + 1
        raise StepOutOfRange(f"step {step} of run {self.run_id} belongs to no activation")


def build_record(run_id: UUID, events: Sequence[RecordedEvent]) -> RunRecord:
    """Group a run's events (log order) into activations, ordered by their commits."""
    if not events:
        raise UnknownRun(f"no run {run_id} in the log")
    by_id = {e.event_id: e for e in events}
    steps: dict[UUID, dict[int, StepRecorded]] = {}
    for e in events:
        if isinstance(e.body, StepRecorded):
            steps.setdefault(e.body.activation_id, {}).setdefault(e.body.step, e.body)
    activations: list[RecordedActivation] = []
    seen: set[UUID] = set()
    first = 1
    for e in events:
        body = e.body
        if isinstance(body, ActivationCompleted):
            completed: ActivationCompleted | None = body
            dead: ActivationDeadLettered | None = None
        elif isinstance(body, ActivationDeadLettered):
            completed, dead = None, body
        else:
            continue
        if body.activation_id in seen:
            continue
        trigger = by_id.get(body.trigger_id)
        if trigger is None:
            continue  # a dead letter whose trigger never reached the log: nothing to re-run
        seen.add(body.activation_id)
        emitted = (
            [by_id[i] for i in completed.emitted if i in by_id] if completed is not None else []
        )
        activation = RecordedActivation(
            agent=body.agent,
            activation_id=body.activation_id,
            trigger=trigger,
            steps=steps.get(body.activation_id, {}),
            emitted=emitted,
            completed=completed,
            dead_lettered=dead,
            end=e,
            first_step=first,
        )
        first += activation.step_count
        activations.append(activation)
    return RunRecord(run_id, list(events), activations)


async def load_run(log: EventLog, run_id: UUID) -> RunRecord:
    """The run as the log holds it; :class:`UnknownRun` if it has no events."""
    return build_record(run_id, await log.read_run(run_id))
