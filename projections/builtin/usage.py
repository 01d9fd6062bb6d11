"""The ``usage_daily`` read model: model tokens and cost by day (UTC), agent and model."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date
from typing import ClassVar

import asyncpg

from projections.engine import Projection, Tables
from runtime.events.builtin import StepRecorded
from runtime.events.model import RecordedEvent
from runtime.events.values import Usage


class UsageProjection(Projection):
    """Sums of every recorded model call's usage (table ``usage_daily``), and of what the
    agents' response caches saved: a step answered by the cache (``cached_from``) is no
    call and costs nothing; it counts in ``cached_calls``, and the usage of the call it
    repeats (its ``saved``) in ``saved_tokens`` and ``saved_cost_usd``.

    One upsert per batch: the batch's calls go in as arrays and PostgreSQL groups
    and adds them. Costs are ``numeric`` and are sent as the floats' exact decimal
    text, so a sum does not depend on how the log was cut into batches (float sums
    would: a rebuild must equal the incrementally maintained table, to the digit).
    """

    name: ClassVar[str] = "usage"
    #: 2: the response cache's columns (cached_calls, saved_tokens, saved_cost_usd).
    version: ClassVar[int] = 2
    types: ClassVar[frozenset[str] | None] = frozenset({"step.recorded"})
    tables: ClassVar[dict[str, str]] = {
        "usage_daily": (
            "(day date NOT NULL, agent text NOT NULL, model text NOT NULL,"
            " calls bigint NOT NULL, input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,"
            " cache_creation_input_tokens bigint NOT NULL, cache_read_input_tokens bigint NOT NULL,"
            " cost_usd numeric NOT NULL, offline_calls bigint NOT NULL,"
            " cached_calls bigint NOT NULL, saved_tokens bigint NOT NULL,"
            " saved_cost_usd numeric NOT NULL,"
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
        cached: list[bool] = []
        saved_tokens: list[int] = []
        saved_costs: list[str] = []
        for e in events:
            b = e.body
            if type(b) is not StepRecorded:
                continue
            if b.cached_from is not None and b.saved is not None:
                # Answered by the cache: no call; the call it repeats is what it saved.
                u, saved = Usage(model=b.saved.model), b.saved
            elif b.usage is not None:
                u, saved = b.usage, None
            else:
                continue
            days.append(e.recorded_at.astimezone(UTC).date())
            agents.append(b.agent)
            models.append(u.model)
            ins.append(u.input_tokens)
            outs.append(u.output_tokens)
            creates.append(u.cache_creation_input_tokens)
            reads.append(u.cache_read_input_tokens)
            costs.append(repr(float(u.cost_usd)))
            offline.append(u.offline)
            cached.append(saved is not None)
            saved_tokens.append(saved.tokens if saved is not None else 0)
            saved_costs.append(repr(float(saved.cost_usd)) if saved is not None else "0.0")
        if not days:
            return
        t = tables["usage_daily"]
        await conn.execute(
            f"INSERT INTO {t} AS t (day, agent, model, calls, input_tokens, output_tokens, "
            "cache_creation_input_tokens, cache_read_input_tokens, cost_usd, offline_calls, "
            "cached_calls, saved_tokens, saved_cost_usd) "
            "SELECT d, a, m, count(*) FILTER (WHERE NOT hit), sum(i), sum(o), sum(cc), sum(cr), "
            "sum(c::numeric), count(*) FILTER (WHERE off), count(*) FILTER (WHERE hit), "
            "sum(st), sum(sc::numeric) "
            "FROM unnest($1::date[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], "
            "$6::bigint[], $7::bigint[], $8::text[], $9::bool[], $10::bool[], $11::bigint[], "
            "$12::text[]) "
            "AS u(d, a, m, i, o, cc, cr, c, off, hit, st, sc) "
            "GROUP BY d, a, m "
            "ON CONFLICT (day, agent, model) DO UPDATE SET calls = t.calls + excluded.calls, "
            "input_tokens = t.input_tokens + excluded.input_tokens, "
            "output_tokens = t.output_tokens + excluded.output_tokens, "
            "cache_creation_input_tokens = "
            "t.cache_creation_input_tokens + excluded.cache_creation_input_tokens, "
            "cache_read_input_tokens = "
            "t.cache_read_input_tokens + excluded.cache_read_input_tokens, "
            "cost_usd = t.cost_usd + excluded.cost_usd, "
            "offline_calls = t.offline_calls + excluded.offline_calls, "
            "cached_calls = t.cached_calls + excluded.cached_calls, "
            "saved_tokens = t.saved_tokens + excluded.saved_tokens, "
            "saved_cost_usd = t.saved_cost_usd + excluded.saved_cost_usd",
            days, agents, models, ins, outs, creates, reads, costs, offline, cached,
            saved_tokens, saved_costs,
        )  # fmt: skip
