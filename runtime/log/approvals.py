"""Human approval: answering an ``approval.requested`` so that its run goes on.

An approval has one decision: the ``approval.decided`` event's id is derived
from the approval id, so the log's unique event id makes the first decision the
only one, whoever makes it (a human through ``agentrt approve`` or the API, or
the deadline's default applied by the relay's timer). A later answer is
refused with :class:`~runtime.errors.AlreadyDecided`, naming the first.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from runtime.errors import AlreadyDecided, ApprovalNotFound
from runtime.events.builtin import ApprovalDecided, ApprovalEscalated, ApprovalRequested
from runtime.events.model import NewEvent, RecordedEvent
from runtime.log.store import EVENT_COLUMNS, EventLog

#: ``by`` of a decision the deadline made (the request's default).
DEADLINE = "deadline"


def decision_id(approval_id: UUID) -> UUID:
    """The event id of the approval's one ``approval.decided``."""
    return UUID(int=approval_id.int ^ 1)


def escalation_id(approval_id: UUID) -> UUID:
    """The event id of the approval's one ``approval.escalated``."""
    return UUID(int=approval_id.int ^ 2)


async def pending_requests(log: EventLog, limit: int | None = None) -> list[RecordedEvent]:
    """The ``approval.requested`` events without a decision, oldest first (``limit``: at
    most that many), read in one query."""
    q = f'"{log.schema}"'
    rows = await log.pool.fetch(
        f"SELECT {EVENT_COLUMNS} FROM {q}.events r "
        "WHERE r.event_type = 'approval.requested' "
        f"AND NOT EXISTS (SELECT 1 FROM {q}.events d WHERE d.event_type = 'approval.decided' "
        "AND d.run_id = r.run_id AND d.data->>'approval_id' = r.data->>'approval_id') "
        "ORDER BY r.position LIMIT $1",
        limit,
    )
    events = log._decode_all(rows)
    assert all(isinstance(e.body, ApprovalRequested) for e in events)
    return events


async def pending_approvals(log: EventLog) -> list[tuple[UUID, UUID | None, ApprovalRequested]]:
    """(approval id, run id, request) of every request without a decision, oldest first."""
    out = []
    for event in await pending_requests(log):
        assert isinstance(event.body, ApprovalRequested)
        out.append((event.body.approval_id, event.run_id, event.body))
    return out


async def request_of(log: EventLog, approval_id: UUID) -> RecordedEvent:
    """The ``approval.requested`` event with this id (:class:`ApprovalNotFound` if none)."""
    q = f'"{log.schema}"'
    row = await log.pool.fetchrow(
        f"SELECT stream_id, stream_version FROM {q}.events "
        "WHERE event_type = 'approval.requested' AND data->>'approval_id' = $1",
        str(approval_id),
    )
    if row is None:
        raise ApprovalNotFound(approval_id)
    [event] = await log.read_stream(row[0], row[1], limit=1)
    return event


async def decision_of(log: EventLog, approval_id: UUID) -> ApprovalDecided | None:
    """The approval's decision, if it has one."""
    q = f'"{log.schema}"'
    row = await log.pool.fetchrow(
        f"SELECT stream_id, stream_version FROM {q}.events WHERE event_id = $1",
        decision_id(approval_id),
    )
    if row is None:
        return None
    [event] = await log.read_stream(row[0], row[1], limit=1)
    assert isinstance(event.body, ApprovalDecided)
    return event.body


async def decide(
    log: EventLog,
    approval_id: UUID,
    *,
    approved: bool,
    by: str = "",
    comment: str = "",
    run_id: UUID | None = None,
    producer: str | None = None,
) -> UUID:
    """Append ``approval.decided`` to the request's run (once); the decision's event id.

    The relay delivers it to the agents subscribed to ``approval.decided``.
    ``run_id``: the run the caller believes the approval belongs to (another
    run's approval is :class:`ApprovalNotFound`, as an unknown one is).
    ``producer``: the envelope's producer (default ``human:<by>``; an agent's name
    when an agent decides).
    """
    request = await request_of(log, approval_id)
    if run_id is not None and request.run_id != run_id:
        raise ApprovalNotFound(approval_id)
    producer = producer or (f"human:{by}" if by else "human")
    body = ApprovalDecided(approval_id=approval_id, approved=approved, by=by, comment=comment)
    inserted, first = await _decide_once(log, request, body, producer)
    if not inserted:
        raise AlreadyDecided(first.approval_id, approved=first.approved, by=first.by)
    return decision_id(approval_id)


async def _decide_once(
    log: EventLog, request: RecordedEvent, body: ApprovalDecided, producer: str
) -> tuple[bool, ApprovalDecided]:
    """Append the decision unless the approval has one; (whether it did, the decision)."""
    decided = NewEvent(
        body=body,
        # One decision per approval: a second one re-appends the same id, a no-op.
        event_id=decision_id(body.approval_id),
        run_id=request.run_id,
        causation_id=request.event_id,
        producer=producer,
        # The asking activation's span: the run resumes in its trace, however late.
        trace=request.trace,
    )
    result = await log.append(request.stream_id, [decided])
    if result.inserted:
        return True, body
    first = await decision_of(log, body.approval_id)
    assert first is not None
    return False, first


async def apply_deadline(log: EventLog, approval_id: UUID, *, fired_by: UUID) -> str:
    """The request's deadline passed: apply its default unless a decision came first.

    ``approve`` / ``deny`` append the decision (``by="deadline"``) with the
    decision's one event id, so a human answering at the same instant either
    lands first (the deadline's decision is then a no-op) or is refused.
    ``escalate`` appends ``approval.escalated`` to the ``escalate_to`` agent
    (once; the approval stays open). Idempotent: the relay may fire a timer
    twice. Returns what happened: ``approved``, ``denied``, ``escalated`` or
    ``already_decided``.
    """
    request = await request_of(log, approval_id)
    asked = request.body
    assert isinstance(asked, ApprovalRequested)
    when = asked.deadline.isoformat() if asked.deadline else "the deadline"
    if asked.default == "escalate" and asked.escalate_to:
        if await decision_of(log, approval_id) is not None:
            return "already_decided"
        escalated = NewEvent(
            body=ApprovalEscalated(
                approval_id=approval_id,
                to=asked.escalate_to,
                subject=asked.subject,
                details=asked.details,
                deadline=asked.deadline,
            ),
            event_id=escalation_id(approval_id),
            run_id=request.run_id,
            causation_id=fired_by,
            producer=DEADLINE,
            trace=request.trace,
        )
        await log.append(request.stream_id, [escalated])
        return "escalated"
    approved = asked.default == "approve"
    body = ApprovalDecided(approval_id=approval_id, approved=approved, by=DEADLINE,
                           comment=f"no decision by {when}: the default applies")  # fmt: skip
    inserted, _ = await _decide_once(log, request, body, DEADLINE)
    if not inserted:
        return "already_decided"
    return "approved" if approved else "denied"


def describe(
    approval_id: UUID, run_id: UUID | None, request: ApprovalRequested, *, now: datetime
) -> list[str]:
    """What is asked, for people: subject, details, run, agent, deadline and default."""
    lines = [
        f"approval {approval_id}",
        f"  subject:  {request.subject}",
        f"  run:      {run_id}",
        f"  agent:    {request.agent}",
    ]
    if request.details is not None:
        lines.append(f"  details:  {_details(request.details)}")
    if request.deadline is not None:
        left = request.deadline - now
        due = f"in {int(left.total_seconds())} s" if left.total_seconds() >= 0 else "passed"
        default = request.default or "?"
        if request.default == "escalate":
            default = f"escalate to {request.escalate_to}"
        lines.append(f"  deadline: {request.deadline.isoformat()} ({due}); then: {default}")
    else:
        lines.append("  deadline: none (waits until someone decides)")
    return lines


def _details(details: object) -> str:
    return msgspec.json.encode(details).decode()
