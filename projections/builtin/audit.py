"""The ``audit_log`` read model: who did what, when, for every state transition and effect."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import asyncpg
import msgspec

from projections.builtin._common import copy_rows, summary
from projections.engine import Projection, Tables
from runtime.events.builtin import (
    BOOKKEEPING,
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

COLUMNS = (
    "position", "tx", "run_id", "at", "actor", "action", "event_type", "event_id", "subject",
    "summary", "detail",
)  # fmt: skip
_encode = msgspec.json.Encoder().encode


class AuditProjection(Projection):
    """One row per audited event (table ``audit_log``, appended with COPY).

    Audited: every model call (``llm.call``; ``llm.cached`` for a step the agent's
    response cache answered) and tool call (``tool.call``, the
    external effects), every emitted domain event (``event.emitted``; from the
    ingress ``event.received``; non-bookkeeping events with a producer), approvals
    (``approval.requested``, ``approval.decided`` with the approver as actor),
    state machine transitions and refused ones (``state.transitioned``,
    ``state.transition_refused``, subject ``from -> to``), timers, circuit
    transitions (actor ``breaker``), dead letters, redrives, budget
    stops, activation completions and forks. ``actor`` is the agent, the producer
    or the approver; ``subject`` what it was about (the model, the tool, the
    approval's subject, the circuit); ``summary`` is searchable text (a GIN index on
    ``to_tsvector('simple', summary)``: word queries stay index scans at any size,
    where ``ILIKE '%word%'`` reads every row; an index rather than a stored
    ``tsvector`` column, so a rebuild's bulk load does not compute it row by row
    and the index is built once, after the load).
    """

    name: ClassVar[str] = "audit"
    version: ClassVar[int] = 2
    types: ClassVar[frozenset[str] | None] = None
    tables: ClassVar[dict[str, str]] = {
        "audit_log": (
            "(position bigint PRIMARY KEY, tx bigint NOT NULL, run_id uuid,"
            " at timestamptz NOT NULL, actor text NOT NULL, action text NOT NULL,"
            " event_type text NOT NULL, event_id uuid NOT NULL, subject text,"
            " summary text NOT NULL, detail jsonb NOT NULL)"
        )
    }
    indexes: ClassVar[tuple[str, ...]] = (
        "CREATE INDEX ON {audit_log} (tx DESC, position DESC)",
        "CREATE INDEX ON {audit_log} (run_id, tx DESC, position DESC)",
        "CREATE INDEX ON {audit_log} (actor, tx DESC, position DESC)",
        "CREATE INDEX ON {audit_log} (action, tx DESC, position DESC)",
        "CREATE INDEX ON {audit_log} (event_type, tx DESC, position DESC)",
        "CREATE INDEX ON {audit_log} (at)",
        "CREATE INDEX ON {audit_log} USING gin (to_tsvector('simple', summary))",
    )

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        subjects: dict[str, str] = {}  # approval id -> its subject
        asked = [str(e.body.approval_id) for e in events if type(e.body) is ApprovalDecided]
        if asked:  # the request may be in an earlier batch: one query, only then
            rows = await conn.fetch(
                f"SELECT detail->>'approval_id', subject FROM {tables['audit_log']} "
                "WHERE action = 'approval.requested' AND detail->>'approval_id' = ANY($1::text[])",
                asked,
            )
            subjects.update((r[0], r[1]) for r in rows)
        out = []
        for e in events:
            if type(e.body) is ApprovalRequested:
                subjects[str(e.body.approval_id)] = e.body.subject
            row = _row(e, subjects)
            if row is not None:
                out.append(row)
        if out:
            await copy_rows(conn, tables, "audit_log", COLUMNS, out)


def _row(e: RecordedEvent, subjects: dict[str, str]) -> tuple[Any, ...] | None:
    b = e.body
    actor = e.producer
    subject: str | None = None
    detail: dict[str, Any]
    if type(b) is StepRecorded:
        u = b.usage
        action = "llm.call" if b.kind == "llm" else f"{b.kind}.call"
        saved = b.saved if b.cached_from is not None else None
        if b.cached_from is not None:
            action = "llm.cached"  # answered by the agent's response cache: no model call
        actor = b.agent
        model = u.model if u is not None else saved.model if saved is not None else None
        subject = model if b.kind == "llm" and model is not None else b.name
        detail = {
            "activation_id": b.activation_id, "step": b.step, "kind": b.kind, "name": b.name,
            "model": model,
            "input_tokens": u.input_tokens if u else None,
            "output_tokens": u.output_tokens if u else None,
            "cost_usd": u.cost_usd if u else None, "duration_ms": b.duration_ms,
            "attempts": len(b.attempts), "error": b.error,
        }  # fmt: skip
        if b.cached_from is not None:
            detail["cached_from"] = b.cached_from
            detail["saved_tokens"] = saved.tokens if saved is not None else 0
            detail["saved_cost_usd"] = saved.cost_usd if saved is not None else 0.0
    elif type(b) is ActivationCompleted:
        action, actor, subject = "activation.completed", b.agent, b.trigger_type
        detail = {"activation_id": b.activation_id, "trigger_id": b.trigger_id,
                  "steps": b.steps, "emitted": len(b.emitted), "outcome": b.outcome,
                  "duration_ms": b.duration_ms}  # fmt: skip
    elif type(b) is ActivationDeadLettered:
        action, actor, subject = "activation.dead_lettered", b.agent, b.trigger_type
        detail = {"activation_id": b.activation_id, "trigger_id": b.trigger_id,
                  "error_type": b.error_type, "error": b.error, "error_code": b.error_code,
                  "deliveries": b.deliveries}  # fmt: skip
    elif type(b) is DeadLetterRedriven:
        action, subject = "dead_letter.redriven", b.agent
        actor = actor or "operator"
        detail = {"trigger_id": b.trigger_id, "dead_letter_id": b.dead_letter_id,
                  "generation": b.generation, "forced": b.forced}  # fmt: skip
    elif type(b) is RunBudgetExceeded:
        action, actor, subject = "run.budget_exceeded", b.agent, "budget"
        detail = msgspec.to_builtins(b)
    elif type(b) is CircuitTransitioned:
        action, subject = "circuit.transitioned", b.name
        actor = actor or "breaker"
        detail = {"from_state": b.from_state, "to_state": b.to_state, "failures": b.failures,
                  "reason": b.reason}  # fmt: skip
    elif type(b) is RunForked:
        action, subject = "run.forked", str(b.parent_run_id)
        actor = actor or "operator"
        detail = msgspec.to_builtins(b)
    elif type(b) is ApprovalRequested:
        action, subject = "approval.requested", b.subject
        actor = actor or b.agent
        detail = {"approval_id": b.approval_id, "agent": b.agent}
    elif type(b) is ApprovalDecided:
        action = "approval.decided"
        actor = b.by or actor or "human"
        subject = subjects.get(str(b.approval_id))
        detail = {"approval_id": b.approval_id, "approved": b.approved, "comment": b.comment}
    elif isinstance(b, StateTransitioned | StateTransitionRefused):
        action, actor = e.event_type, b.agent
        subject = f"{b.from_state} -> {b.to_state}"
        detail = {"from_state": b.from_state, "to_state": b.to_state, "reason": b.reason,
                  "causation_id": e.causation_id}  # fmt: skip
        if isinstance(b, StateTransitionRefused):
            detail["allowed"] = b.allowed
    elif isinstance(b, TimerScheduled | TimerFired):
        action = e.event_type
        actor, subject = actor or b.agent, b.name
        detail = {"timer_id": b.timer_id, "agent": b.agent, "due_at": b.due_at}
    elif e.event_type in BOOKKEEPING or actor is None:
        return None
    else:
        action = "event.received" if actor.startswith("ingress:") else "event.emitted"
        detail = {"causation_id": e.causation_id, "stream_id": e.stream_id}
    text = summary(e)
    if isinstance(b, ApprovalRequested | ApprovalDecided) and subject:
        text = f"{text} [{subject}]" if subject not in text else text
    return (
        e.position, e.tx, e.run_id, e.recorded_at, actor or "", action, e.event_type,
        e.event_id, subject, text, _encode(detail).decode(),
    )  # fmt: skip
