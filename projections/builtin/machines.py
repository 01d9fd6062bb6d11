"""The ``machine_states`` read model: where each state machine agent is within each run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar
from uuid import UUID

import asyncpg

from projections.engine import Projection, Tables
from runtime.events.builtin import StateTransitioned, StateTransitionRefused
from runtime.events.model import RecordedEvent

_COLUMNS = (
    "run_id, agent, state, previous, transitions, refused, last_refused, last_reason, "
    "last_tx, last_position, updated_at"
)


@dataclasses.dataclass(slots=True)
class _Machine:
    state: str
    previous: str | None = None
    transitions: int = 0
    refused: int = 0
    last_refused: str | None = None
    last_reason: str | None = None
    tx: int = 0
    position: int = 0
    at: datetime | None = None


class MachinesProjection(Projection):
    """One row per run and state machine agent (table ``machine_states``), from the
    run's ``state.transitioned`` and ``state.transition_refused`` events in log order:
    the current ``state`` (the last transition's target; before any, the state a
    refusal was made in), the ``previous`` one, how many ``transitions`` and
    ``refused`` ones, and the last refusal (``from -> to``). It needs no app code:
    the events say everything, so it rebuilds from the log alone."""

    name: ClassVar[str] = "machines"
    version: ClassVar[int] = 1
    types: ClassVar[frozenset[str] | None] = frozenset(
        {"state.transitioned", "state.transition_refused"}
    )
    tables: ClassVar[dict[str, str]] = {
        "machine_states": (
            "(run_id uuid NOT NULL, agent text NOT NULL, state text NOT NULL, previous text,"
            " transitions integer NOT NULL, refused integer NOT NULL, last_refused text,"
            " last_reason text, last_tx bigint NOT NULL, last_position bigint NOT NULL,"
            " updated_at timestamptz NOT NULL, PRIMARY KEY (run_id, agent))"
        )
    }

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        mine = [
            e
            for e in events
            if e.run_id is not None and type(e.body) in (StateTransitioned, StateTransitionRefused)
        ]
        if not mine:
            return
        t = tables["machine_states"]
        machines: dict[tuple[UUID, str], _Machine] = {
            (r[0], r[1]): _Machine(*r[2:])
            for r in await conn.fetch(
                f"SELECT {_COLUMNS} FROM {t} WHERE run_id = ANY($1::uuid[])",
                list({e.run_id for e in mine}),
            )
        }
        for e in mine:
            b = e.body
            assert isinstance(b, StateTransitioned | StateTransitionRefused) and e.run_id
            m = machines.get((e.run_id, b.agent))
            if m is None:
                m = machines[(e.run_id, b.agent)] = _Machine(b.from_state)
            if isinstance(b, StateTransitioned):
                m.previous, m.state = b.from_state, b.to_state
                m.transitions += 1
                m.last_reason = b.reason or None
            else:
                m.refused += 1
                m.last_refused = f"{b.from_state} -> {b.to_state}"
            m.tx, m.position, m.at = e.tx, e.position, e.recorded_at
        rows = [
            (run_id, agent, m.state, m.previous, m.transitions, m.refused, m.last_refused,
             m.last_reason, m.tx, m.position, m.at)
            for (run_id, agent), m in machines.items()
        ]  # fmt: skip
        await conn.executemany(
            f"INSERT INTO {t} ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
            "ON CONFLICT (run_id, agent) DO UPDATE SET state = excluded.state, "
            "previous = excluded.previous, transitions = excluded.transitions, "
            "refused = excluded.refused, last_refused = excluded.last_refused, "
            "last_reason = excluded.last_reason, last_tx = excluded.last_tx, "
            "last_position = excluded.last_position, updated_at = excluded.updated_at",
            rows,
        )
