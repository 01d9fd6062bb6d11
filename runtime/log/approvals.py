"""Human approval: answering an ``approval.requested`` so that its run goes on."""

from __future__ import annotations

from uuid import UUID

from runtime.errors import AlreadyDecided, ApprovalNotFound
from runtime.events.builtin import ApprovalDecided, ApprovalRequested
from runtime.events.model import NewEvent
from runtime.log.store import EventLog


async def pending_approvals(log: EventLog) -> list[tuple[UUID, UUID | None, ApprovalRequested]]:
    """(approval id, run id, request) of every request without a decision, oldest first."""
    q = f'"{log.schema}"'
    rows = await log.pool.fetch(
        f"SELECT r.stream_id, r.stream_version FROM {q}.events r "
        "WHERE r.event_type = 'approval.requested' "
        f"AND NOT EXISTS (SELECT 1 FROM {q}.events d WHERE d.event_type = 'approval.decided' "
        "AND d.run_id = r.run_id AND d.data->>'approval_id' = r.data->>'approval_id') "
        "ORDER BY r.position"
    )
    out = []
    for row in rows:
        [event] = await log.read_stream(row[0], row[1], limit=1)
        assert isinstance(event.body, ApprovalRequested)
        out.append((event.body.approval_id, event.run_id, event.body))
    return out


async def decide(
    log: EventLog, approval_id: UUID, *, approved: bool, by: str = "", comment: str = ""
) -> UUID:
    """Append ``approval.decided`` to the request's run (once); the decision's event id.

    The relay delivers it to the agents subscribed to ``approval.decided``.
    """
    q = f'"{log.schema}"'
    row = await log.pool.fetchrow(
        f"SELECT event_id, run_id, stream_id FROM {q}.events "
        "WHERE event_type = 'approval.requested' AND data->>'approval_id' = $1",
        str(approval_id),
    )
    if row is None:
        raise ApprovalNotFound(approval_id)
    request_id, run_id, stream = row
    decided = NewEvent(
        body=ApprovalDecided(approval_id=approval_id, approved=approved, by=by, comment=comment),
        # One decision per approval: a second `decide` re-appends the same id, a no-op.
        event_id=UUID(int=approval_id.int ^ 1),
        run_id=run_id,
        causation_id=request_id,
        producer=f"human:{by}" if by else "human",
    )
    result = await log.append(stream, [decided])
    if not result.inserted:
        first = (await log.read_stream(stream, result.stream_version, limit=1))[0].body
        assert isinstance(first, ApprovalDecided)
        raise AlreadyDecided(first.approval_id, approved=first.approved, by=first.by)
    return decided.event_id
