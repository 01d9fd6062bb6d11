"""The ``usage_daily`` read model: model tokens and cost by day (UTC), agent and model."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date
from typing import ClassVar

import asyncpg

from projections.engine import Projection, Tables
from runtime.events.builtin import StepRecorded
from runtime.events.model import RecordedEvent


class UsageProjection(Projection):
    """Sums of every recorded model call's usage (table ``usage_daily``).

    One upsert per batch: the batch's calls go in as arrays and PostgreSQL groups
    and adds them. Costs are ``numeric`` and are sent as the floats' exact decimal
    text, so a sum does not depend on how the log was cut into batches (float sums
    would: a rebuild must equal the incrementally maintained table, to the digit).
    """

    name: ClassVar[str] = "usage"
    version: ClassVar[int] = 1
    types: ClassVar[frozenset[str] | None] = frozenset({"step.recorded"})
    tables: ClassVar[dict[str, str]] = {
        "usage_daily": (
            "(day date NOT NULL, agent text NOT NULL, model text NOT NULL,"
            " calls bigint NOT NULL, input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,"
            " cache_creation_input_tokens bigint NOT NULL, cache_read_input_tokens bigint NOT NULL,"
            " cost_usd numeric NOT NULL, offline_calls bigint NOT NULL,"
            " PRIMARY KEY (day, agent, model))"
        )
    }
    indexes: ClassVar[tuple[str, ...]] = (
        "CREATE INDEX ON {usage_daily} (agent, day)",
        "CREATE INDEX ON {usage_daily} (model, day)",
    )

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        days: list[date] = []
        agents: list[str] = []
        models: list[str] = []
        ins: list[int] = []
        outs: list[int] = []
        creates: list[int] = []
        reads: list[int] = []
        costs: list[str] = []
        offline: list[bool] = []
        for e in events:
            b = e.body
            if type(b) is not StepRecorded or b.usage is None:
                continue
            u = b.usage
            days.append(e.recorded_at.astimezone(UTC).date())
            agents.append(b.agent)
            models.append(u.model)
            ins.append(u.input_tokens)
            outs.append(u.output_tokens)
            creates.append(u.cache_creation_input_tokens)
            reads.append(u.cache_read_input_tokens)
            costs.append(repr(float(u.cost_usd)))
            offline.append(u.offline)
        if not days:
            return
        t = tables["usage_daily"]
        await conn.execute(
            f"INSERT INTO {t} AS t (day, agent, model, calls, input_tokens, output_tokens, "
            "cache_creation_input_tokens, cache_read_input_tokens, cost_usd, offline_calls) "
            "SELECT d, a, m, count(*), sum(i), sum(o), sum(cc), sum(cr), sum(c::numeric), "
            "count(*) FILTER (WHERE off) "
            "FROM unnest($1::date[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], "
            "$6::bigint[], $7::bigint[], $8::text[], $9::bool[]) "
            "AS u(d, a, m, i, o, cc, cr, c, off) "
            "GROUP BY d, a, m "
            "ON CONFLICT (day, agent, model) DO UPDATE SET calls = t.calls + excluded.calls, "
            "input_tokens = t.input_tokens + excluded.input_tokens, "
            "output_tokens = t.output_tokens + excluded.output_tokens, "
            "cache_creation_input_tokens = "
            "t.cache_creation_input_tokens + excluded.cache_creation_input_tokens, "
            "cache_read_input_tokens = "
            "t.cache_read_input_tokens + excluded.cache_read_input_tokens, "
            "cost_usd = t.cost_usd + excluded.cost_usd, "
            "offline_calls = t.offline_calls + excluded.offline_calls",
            days, agents, models, ins, outs, creates, reads, costs, offline,
        )  # fmt: skip
