"""The ``timeline`` read model: every event of every run, with what a tree view needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import asyncpg

from projections.builtin._common import copy_rows, summary
from projections.engine import Projection, Tables
from runtime.events.builtin import ActivationCompleted, StepRecorded
from runtime.events.model import RecordedEvent

COLUMNS = (
    "run_id", "position", "tx", "event_id", "event_type", "stream_id", "causation_id", "agent",
    "activation_id", "step", "kind", "name", "model", "duration_ms", "input_tokens",
    "output_tokens", "cost_usd", "recorded_at", "summary",
)  # fmt: skip


class TimelineProjection(Projection):
    """One row per event of a run (table ``timeline``, appended with COPY).

    The order a reader wants (a trigger before what it caused, although a run's
    first steps are in the log before their trigger) is the query's:
    :meth:`projections.queries.ReadModels.timeline` walks ``causation_id``
    depth-first with siblings in log order. ``agent`` is the producer (the step's
    agent for steps); ``activation_id``, ``step``, ``kind``, ``name``, ``model``,
    tokens and cost are set for steps, ``activation_id`` and ``duration_ms`` for
    ``activation.completed``.
    """

    name: ClassVar[str] = "timeline"
    version: ClassVar[int] = 1
    types: ClassVar[frozenset[str] | None] = None
    tables: ClassVar[dict[str, str]] = {
        "timeline": (
            "(run_id uuid NOT NULL, position bigint NOT NULL, tx bigint NOT NULL,"
            " event_id uuid NOT NULL, event_type text NOT NULL, stream_id text NOT NULL,"
            " causation_id uuid, agent text, activation_id uuid, step integer, kind text,"
            " name text, model text, duration_ms double precision, input_tokens bigint,"
            " output_tokens bigint, cost_usd double precision, recorded_at timestamptz NOT NULL,"
            " summary text NOT NULL, PRIMARY KEY (run_id, position))"
        )
    }

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        rows = [_row(e) for e in events if e.run_id is not None]
        if rows:
            await copy_rows(conn, tables, "timeline", COLUMNS, rows)


def _row(e: RecordedEvent) -> tuple[Any, ...]:
    b = e.body
    if type(b) is StepRecorded:
        u = b.usage
        return (
            e.run_id, e.position, e.tx, e.event_id, e.event_type, e.stream_id, e.causation_id,
            b.agent, b.activation_id, b.step, b.kind, b.name, u.model if u else None,
            b.duration_ms, u.input_tokens if u else None, u.output_tokens if u else None,
            u.cost_usd if u else None, e.recorded_at, summary(e),
        )  # fmt: skip
    if type(b) is ActivationCompleted:
        return (
            e.run_id, e.position, e.tx, e.event_id, e.event_type, e.stream_id, e.causation_id,
            b.agent, b.activation_id, None, None, None, None, b.duration_ms, None, None, None,
            e.recorded_at, summary(e),
        )  # fmt: skip
    return (
        e.run_id, e.position, e.tx, e.event_id, e.event_type, e.stream_id, e.causation_id,
        e.producer, None, None, None, None, None, None, None, None, None, e.recorded_at,
        summary(e),
    )  # fmt: skip
