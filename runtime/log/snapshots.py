"""Snapshots of runs' folded agent state: a cache, so a long run's state is not refolded.

Every ``snapshot_every`` events of a run, the agent-state projection saves each
agent's folded state (``Agent.evolve``) here, keyed by the fold's version.
``ctx.state``, time travel and replay load the nearest snapshot at or before
where they need the state and fold only the events after it. Nothing ever
depends on a snapshot being there: dropping them all changes no answer, only
its cost; a snapshot of another fold version is never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import structlog

from runtime.events.model import LogPosition

log = structlog.get_logger(__name__)

_encoder = msgspec.json.Encoder()


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's state in a run after folding the run's events up to ``position``."""

    run_id: UUID
    agent: str
    fold_version: str
    position: LogPosition
    event_id: UUID
    #: How many of the run's events were folded into it.
    event_count: int
    #: The state, JSON-encoded (:func:`encode_state`).
    state: bytes


def encode_state(state: Any, state_type: Any) -> bytes | None:
    """The state's bytes, or None when they would not decode back to an equal state
    (a state msgspec cannot round-trip is folded every time instead of cached)."""
    try:
        data = _encoder.encode(state)
        if decode_state(data, state_type) != state:
            return None
    except (TypeError, msgspec.MsgspecError):
        return None
    return data


def decode_state(data: bytes, state_type: Any) -> Any:
    return msgspec.json.decode(data, type=state_type)


class SnapshotStore:
    """Reads and writes ``<schema>.snapshots``; one statement per call."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool = pool
        q = f'"{schema}"'
        self._sql_nearest = (
            "SELECT tx_id, position, event_id, event_count, state "
            f"FROM {q}.snapshots WHERE run_id = $1 AND agent = $2 AND fold_version = $3 "
            "AND (tx_id, position) <= ($4::xid8, $5::bigint) "
            "ORDER BY tx_id DESC, position DESC LIMIT 1"
        )
        self._sql_save = (
            f"INSERT INTO {q}.snapshots (run_id, agent, fold_version, tx_id, position, "
            "event_id, event_count, state) "
            "SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]::xid8[], "
            "$5::bigint[], $6::uuid[], $7::bigint[], $8::bytea[]) "
            "ON CONFLICT DO NOTHING"
        )
        self._sql_drop = f"DELETE FROM {q}.snapshots WHERE $1::text IS NULL OR agent = $1"

    async def nearest(
        self, run_id: UUID, agent: str, fold_version: str, upto: LogPosition
    ) -> Snapshot | None:
        """The newest snapshot taken at or before ``upto`` (None if there is none)."""
        row = await self._pool.fetchrow(
            self._sql_nearest, run_id, agent, fold_version, upto.tx, upto.position
        )
        if row is None:
            return None
        return Snapshot(
            run_id=run_id,
            agent=agent,
            fold_version=fold_version,
            position=LogPosition(int(row[0]), int(row[1])),
            event_id=row[2],
            event_count=int(row[3]),
            state=bytes(row[4]),
        )

    async def load(
        self,
        run_id: UUID,
        agent: str,
        fold_version: str,
        state_type: Any,
        *,
        upto: LogPosition | None = None,
        before: LogPosition | None = None,
    ) -> tuple[Any, LogPosition] | None:
        """The decoded state of the nearest snapshot at or before ``upto`` (or strictly
        before ``before``) and where it was taken; None when there is none, or when it does
        not decode (a cache: the caller folds from the start instead)."""
        if upto is None:
            if before is None:
                raise TypeError("load() needs upto= or before=")
            upto = LogPosition(before.tx, before.position - 1)
        snap = await self.nearest(run_id, agent, fold_version, upto)
        if snap is None:
            return None
        try:
            return decode_state(snap.state, state_type), snap.position
        except msgspec.MsgspecError as exc:
            log.warning("snapshot.unreadable", agent=agent, run_id=str(run_id), error=str(exc))
            return None

    async def save(
        self, snapshots: Sequence[Snapshot], *, conn: asyncpg.Connection | None = None
    ) -> None:
        """Store snapshots (one statement); one already there is kept."""
        if not snapshots:
            return
        await (conn or self._pool).execute(
            self._sql_save,
            [s.run_id for s in snapshots],
            [s.agent for s in snapshots],
            [s.fold_version for s in snapshots],
            [str(s.position.tx) for s in snapshots],
            [s.position.position for s in snapshots],
            [s.event_id for s in snapshots],
            [s.event_count for s in snapshots],
            [s.state for s in snapshots],
        )

    async def drop(self, agent: str | None = None) -> int:
        """Delete the snapshots (of one agent, or all): the cache starts over."""
        status = await self._pool.execute(self._sql_drop, agent)
        return int(status.split()[-1])
