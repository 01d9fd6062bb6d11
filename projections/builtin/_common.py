"""What the built-in projections share: COPY into a projection's table, one-line summaries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from projections.engine import Tables
from runtime.events.builtin import (
    ActivationCompleted,
    ActivationDeadLettered,
    ApprovalDecided,
    ApprovalRequested,
    CircuitTransitioned,
    DeadLetterRedriven,
    RunBudgetExceeded,
    RunForked,
    StateTransitioned,
    StateTransitionRefused,
    StepRecorded,
    TimerFired,
    TimerScheduled,
)
from runtime.events.model import RecordedEvent

#: Dead-letter error types that are a step's final failure (the run failed, as
#: opposed to an infrastructure error a redrive may cure).
FINAL_ERRORS = frozenset({"StepFailed", "OutputInvalid", "RetriesExhausted"})


async def copy_rows(
    conn: asyncpg.Connection,
    tables: Tables,
    table: str,
    columns: Sequence[str],
    records: Iterable[tuple[Any, ...]],
) -> None:
    """Append rows with COPY: the cheapest way to write many new rows."""
    schema, name = tables.parts(table)
    await conn.copy_records_to_table(name, schema_name=schema, columns=list(columns),
                                     records=records)  # fmt: skip


def clip(text: str, limit: int = 160) -> str:
    """One line of at most ``limit`` characters."""
    if len(text) <= limit and text.isprintable() and "  " not in text:
        # The common case, without splitting and joining: the only whitespace is single
        # ASCII spaces (isprintable() is False for every other kind).
        return text.strip(" ")
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


#: event id -> its summary, for the events of the page being folded: the timeline and the
#: audit log both describe every event (a rebuild folds them at once). Bounded.
_summaries: dict[Any, str] = {}
_SUMMARIES_KEPT = 20_000


def summary(e: RecordedEvent) -> str:
    """A one-line description of an event, for timelines and the audit log."""
    text = _summaries.get(e.event_id)
    if text is None:
        if len(_summaries) >= _SUMMARIES_KEPT:
            _summaries.clear()
        text = _summaries[e.event_id] = _summary(e)
    return text


def _summary(e: RecordedEvent) -> str:
    b = e.body
    if type(b) is StepRecorded:
        head = f"{b.kind} {b.name}"
        u = b.usage
        if u is not None:
            head += f" ({u.model}: {u.input_tokens} in, {u.output_tokens} out, ${u.cost_usd:.6f})"
        if b.cached_from is not None:
            saved = b.saved.cost_usd if b.saved is not None else 0.0
            head += (f" cached: repeats step {b.cached_from.step} of activation "
                     f"{b.cached_from.activation_id}, saved ${saved:.6f}")  # fmt: skip
        if b.attempts:
            head += f", {len(b.attempts)} retr{'y' if len(b.attempts) == 1 else 'ies'}"
        if b.error is not None:
            head += f" failed: {b.error.type}: {b.error.message}"
        return clip(f"step {b.step}: {head}")
    if type(b) is ActivationCompleted:
        return clip(f"{b.agent} {b.outcome} {b.trigger_type} in {b.steps} steps, "
                    f"{len(b.emitted)} emitted, {b.duration_ms:.0f} ms")  # fmt: skip
    if type(b) is ActivationDeadLettered:
        return clip(f"{b.agent} dead-lettered {b.trigger_type} after {b.deliveries} "
                    f"deliveries: {b.error_type}: {b.error}")  # fmt: skip
    if type(b) is DeadLetterRedriven:
        forced = " (forced)" if b.forced else ""
        return clip(f"redriven to {b.agent}{forced}, generation {b.generation}")
    if type(b) is RunBudgetExceeded:
        return clip(f"{b.agent} stopped by the run's budget at step {b.step}: spent "
                    f"{b.spent_tokens} tokens ${b.spent_usd:.4f}, asked {b.requested_tokens} "
                    f"tokens ${b.requested_usd:.4f}")  # fmt: skip
    if type(b) is CircuitTransitioned:
        reason = f": {b.reason}" if b.reason else ""
        return clip(f"circuit {b.name} {b.from_state} -> {b.to_state} "
                    f"after {b.failures} failures{reason}")  # fmt: skip
    if type(b) is ApprovalRequested:
        return clip(f"{b.agent} asks for approval: {b.subject}")
    if type(b) is ApprovalDecided:
        verdict = "approved" if b.approved else "rejected"
        by = f" by {b.by}" if b.by else ""
        note = f": {b.comment}" if b.comment else ""
        return clip(f"{verdict}{by}{note}")
    if type(b) is TimerScheduled:
        return clip(f"{b.agent} timer {b.name} due {b.due_at.isoformat()}")
    if type(b) is TimerFired:
        return clip(f"timer {b.name} fired for {b.agent}")
    if type(b) is RunForked:
        changes = [f"{k} {v}" for k, v in (("model", b.model), ("tier", b.tier)) if v]
        if b.prompt:
            changes.append("prompt")
        if b.input_changed:
            changes.append("input")
        what = f" with {', '.join(changes)}" if changes else ""
        return clip(f"forked from {b.parent_run_id} at step {b.at_step}{what}")
    if type(b) is StateTransitioned:
        why = f": {b.reason}" if b.reason else ""
        return clip(f"{b.agent} moved {b.from_state} -> {b.to_state}{why}")
    if type(b) is StateTransitionRefused:
        allowed = ", ".join(b.allowed) or "nowhere"
        return clip(f"{b.agent} refused {b.from_state} -> {b.to_state} "
                    f"(from {b.from_state} only: {allowed})")  # fmt: skip
    by = f" by {e.producer}" if e.producer else ""
    return clip(f"{e.event_type}{by}")
