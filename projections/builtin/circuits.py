"""The ``circuit_transitions`` read model: every circuit-breaker state change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import asyncpg

from projections.builtin._common import copy_rows
from projections.engine import Projection, Tables
from runtime.events.builtin import CircuitTransitioned
from runtime.events.model import RecordedEvent


class CircuitTransitionsProjection(Projection):
    """One row per ``circuit.transitioned`` (table ``circuit_transitions``): a tool's
    breaker opening, half-opening or closing, with the failures and reason."""

    name: ClassVar[str] = "circuit_transitions"
    version: ClassVar[int] = 1
    types: ClassVar[frozenset[str] | None] = frozenset({"circuit.transitioned"})
    tables: ClassVar[dict[str, str]] = {
        "circuit_transitions": (
            "(position bigint PRIMARY KEY, tx bigint NOT NULL, event_id uuid NOT NULL,"
            " name text NOT NULL, from_state text NOT NULL, to_state text NOT NULL,"
            " failures integer NOT NULL, reason text NOT NULL, at timestamptz NOT NULL,"
            " run_id uuid)"
        )
    }
    indexes: ClassVar[tuple[str, ...]] = (
        "CREATE INDEX ON {circuit_transitions} (tx DESC, position DESC)",
        "CREATE INDEX ON {circuit_transitions} (name, tx DESC, position DESC)",
        "CREATE INDEX ON {circuit_transitions} (at)",
    )

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        rows = [
            (
                e.position,
                e.tx,
                e.event_id,
                b.name,
                b.from_state,
                b.to_state,
                b.failures,
                b.reason,
                e.recorded_at,
                e.run_id,
            )
            for e in events
            if type(b := e.body) is CircuitTransitioned
        ]
        if rows:
            await copy_rows(conn, tables, "circuit_transitions",
                            ("position", "tx", "event_id", "name", "from_state", "to_state",
                             "failures", "reason", "at", "run_id"), rows)  # fmt: skip
