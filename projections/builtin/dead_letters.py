"""The ``dead_letters`` read model: activations that failed too often, and their redrives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import asyncpg

from projections.builtin._common import copy_rows
from projections.engine import Projection, Tables
from runtime.agents.context import activation_id_for
from runtime.events.builtin import ActivationDeadLettered, DeadLetterRedriven
from runtime.events.model import RecordedEvent

DEAD_LETTER_COLUMNS = (
    "position", "tx", "event_id", "agent", "trigger_id", "trigger_type", "activation_id",
    "run_id", "stream", "entry_id", "error_type", "error", "error_code", "deliveries",
    "dead_lettered_at", "generation", "status", "redriven_at", "redriven_generation", "forced",
)  # fmt: skip
#: Redrives a dead letter's generation is looked for among (activation ids name it).
_MAX_GENERATION = 64


def generation_of(agent: str, trigger_id: Any, activation_id: Any) -> int:
    """The delivery generation a dead-lettered activation ran at (0: the first delivery;
    a redrive starts the next), recovered from its activation id; -1 if not found."""
    for g in range(_MAX_GENERATION):
        if activation_id_for(agent, trigger_id, g) == activation_id:
            return g
    return -1


class DeadLettersProjection(Projection):
    """One row per ``activation.dead_lettered`` (table ``dead_letters``).

    ``status`` is ``open`` until a ``dead_letter.redriven`` of the same agent and
    trigger arrives: then ``redriven``, with ``redriven_at``, the generation it was
    redriven to and whether it was forced. A later failure of the redriven
    activation is a new row (its own activation id and generation).
    """

    name: ClassVar[str] = "dead_letters"
    version: ClassVar[int] = 1
    types: ClassVar[frozenset[str] | None] = frozenset(
        {"activation.dead_lettered", "dead_letter.redriven"}
    )
    tables: ClassVar[dict[str, str]] = {
        "dead_letters": (
            "(position bigint PRIMARY KEY, tx bigint NOT NULL, event_id uuid NOT NULL,"
            " agent text NOT NULL, trigger_id uuid NOT NULL, trigger_type text NOT NULL,"
            " activation_id uuid NOT NULL, run_id uuid, stream text NOT NULL,"
            " entry_id text NOT NULL, error_type text NOT NULL, error text NOT NULL,"
            " error_code text, deliveries integer NOT NULL,"
            " dead_lettered_at timestamptz NOT NULL, generation integer NOT NULL,"
            " status text NOT NULL, redriven_at timestamptz, redriven_generation integer,"
            " forced boolean NOT NULL)"
        )
    }
    indexes: ClassVar[tuple[str, ...]] = (
        "CREATE INDEX ON {dead_letters} (tx DESC, position DESC)",
        "CREATE INDEX ON {dead_letters} (agent, trigger_id) WHERE status = 'open'",
        "CREATE INDEX ON {dead_letters} (run_id)",
        "CREATE INDEX ON {dead_letters} (status, tx DESC, position DESC)",
    )

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        new: dict[tuple[str, Any], list[Any]] = {}  # (agent, trigger) -> its open row here
        rows: list[list[Any]] = []
        earlier: list[tuple[Any, ...]] = []  # redrives of rows committed before this batch
        for e in events:
            b = e.body
            if type(b) is ActivationDeadLettered:
                row = [
                    e.position, e.tx, e.event_id, b.agent, b.trigger_id, b.trigger_type,
                    b.activation_id, e.run_id, b.stream, b.entry_id, b.error_type, b.error,
                    b.error_code, b.deliveries, e.recorded_at,
                    generation_of(b.agent, b.trigger_id, b.activation_id), "open", None, None,
                    False,
                ]  # fmt: skip
                rows.append(row)
                new[(b.agent, b.trigger_id)] = row
            elif type(b) is DeadLetterRedriven:
                target = new.pop((b.agent, b.trigger_id), None)
                if target is not None:
                    target[16:20] = ["redriven", e.recorded_at, b.generation, b.forced]
                else:
                    earlier.append((b.agent, b.trigger_id, e.recorded_at, b.generation, b.forced))
        t = tables["dead_letters"]
        if earlier:  # before the new rows: a redrive here never reaches a later letter
            await conn.executemany(
                f"UPDATE {t} SET status = 'redriven', redriven_at = $3, "
                "redriven_generation = $4, forced = $5 "
                "WHERE agent = $1 AND trigger_id = $2 AND status = 'open'",
                earlier,
            )
        if rows:
            await copy_rows(conn, tables, "dead_letters", DEAD_LETTER_COLUMNS,
                            [tuple(r) for r in rows])  # fmt: skip
