"""Reads of the log's tables beyond the event streams: the inbox, a run's spend, run
summaries. With ``store.py``, ``approvals.py`` and ``audit.py`` the only SQL on them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import msgspec

from runtime.log.store import EventLog

#: Tokens of a step's usage, summed in SQL (mirrors ``Usage.tokens``).
_USAGE_TOKENS = (
    "coalesce((data->'usage'->>'input_tokens')::bigint, 0) "
    "+ coalesce((data->'usage'->>'output_tokens')::bigint, 0) "
    "+ coalesce((data->'usage'->>'cache_creation_input_tokens')::bigint, 0) "
    "+ coalesce((data->'usage'->>'cache_read_input_tokens')::bigint, 0)"
)


class ActivationState(msgspec.Struct, frozen=True):
    """What the log knows of an activation before a redelivery runs it again."""

    #: The inbox holds (agent, event): it committed; acknowledge and skip.
    handled: bool
    #: The trigger event is in the log already.
    trigger_in_log: bool
    #: Earlier attempts recorded steps.
    has_steps: bool


class InboxRow(msgspec.Struct, frozen=True):
    """An agent's committed activation of an event."""

    activation_id: UUID
    outcome: str
    committed_at: datetime


class RunSummary(msgspec.Struct, frozen=True):
    steps: int
    tokens: int
    activations: int


class LogQueries:
    """The statements, built once per schema; every method is one round trip."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        q = f'"{log.schema}"'
        self._state = (
            f"SELECT EXISTS (SELECT 1 FROM {q}.inbox WHERE consumer = $1 AND event_id = $2), "
            f"EXISTS (SELECT 1 FROM {q}.events WHERE event_id = $3), "
            f"EXISTS (SELECT 1 FROM {q}.events WHERE stream_id = $4)"
        )
        self._inbox_row = (
            f"SELECT activation_id, outcome, committed_at FROM {q}.inbox "
            "WHERE consumer = $1 AND event_id = $2"
        )
        self._handled = (
            f"SELECT EXISTS (SELECT 1 FROM {q}.inbox WHERE consumer = $1 AND event_id = $2)"
        )
        self._has_event = f"SELECT EXISTS (SELECT 1 FROM {q}.events WHERE event_id = $1)"
        self._spend = (
            f"SELECT coalesce(sum({_USAGE_TOKENS}), 0), "
            "coalesce(sum((data->'usage'->>'cost_usd')::float8), 0) "
            f"FROM {q}.events WHERE run_id = $1 AND event_type = 'step.recorded' "
            "AND stream_id <> $2"
        )
        self._inbox_rows = f"SELECT count(*) FROM {q}.inbox WHERE run_id = ANY($1::uuid[])"
        # A run's root event is the one whose id is the run id; an agent took part
        # when the run holds its completion or dead letter (events_run index).
        self._runs_between = (
            f"SELECT e.run_id FROM {q}.events e WHERE e.event_id = e.run_id "
            "AND e.recorded_at >= $1 AND ($2::timestamptz IS NULL OR e.recorded_at < $2) "
            f"AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM {q}.events a "
            "WHERE a.run_id = e.run_id AND a.event_type IN "
            "('activation.completed', 'activation.dead_lettered') AND a.data->>'agent' = $3)) "
            "ORDER BY e.recorded_at, e.position"
        )
        self._summary = (
            "SELECT count(*) FILTER (WHERE event_type = 'step.recorded'), "
            f"coalesce(sum({_USAGE_TOKENS}), 0), "
            "count(*) FILTER (WHERE event_type = 'activation.completed') "
            f"FROM {q}.events WHERE run_id = ANY($1::uuid[])"
        )

    async def activation_state(
        self, agent: str, inbox_id: UUID, event_id: UUID, steps_stream: str
    ) -> ActivationState:
        """``inbox_id`` keys the inbox row (the event id but for a forced redrive)."""
        row = await self.log.pool.fetchrow(self._state, agent, inbox_id, event_id, steps_stream)
        return ActivationState(bool(row[0]), bool(row[1]), bool(row[2]))

    async def inbox_row(self, agent: str, event_id: UUID) -> InboxRow | None:
        """The committed activation of the event by ``agent``, if any."""
        row = await self.log.pool.fetchrow(self._inbox_row, agent, event_id)
        return None if row is None else InboxRow(row[0], row[1], row[2])

    async def handled(self, agent: str, event_id: UUID) -> bool:
        """Whether ``agent``'s activation of the event committed (its inbox row exists)."""
        return bool(await self.log.pool.fetchval(self._handled, agent, event_id))

    async def has_event(self, event_id: UUID) -> bool:
        return bool(await self.log.pool.fetchval(self._has_event, event_id))

    async def run_spend(self, run_id: UUID, *, excluding_stream: str) -> tuple[int, float]:
        """Tokens and dollars the run's model steps cost, outside one activation's stream."""
        tokens, usd = await self.log.pool.fetchrow(self._spend, run_id, excluding_stream)
        return int(tokens), float(usd)

    async def activations_handled(self, run_ids: Sequence[UUID]) -> int:
        """Inbox rows (committed activations) of these runs."""
        return int(await self.log.pool.fetchval(self._inbox_rows, list(run_ids)))

    async def runs_between(
        self, since: datetime, until: datetime | None = None, agent: str | None = None
    ) -> list[UUID]:
        """Runs whose root event was recorded in [since, until), oldest first; with
        ``agent``, only those in which that agent was activated (replay --since)."""
        rows = await self.log.pool.fetch(self._runs_between, since, until, agent)
        return [r[0] for r in rows]

    async def run_summary(self, run_ids: Sequence[UUID]) -> RunSummary:
        steps, tokens, activations = await self.log.pool.fetchrow(self._summary, list(run_ids))
        return RunSummary(int(steps), int(tokens), int(activations))
