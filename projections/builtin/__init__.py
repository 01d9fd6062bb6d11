"""The built-in read models: runs, agent state, timeline, audit, usage, dead letters,
circuit transitions, state machines (one module each); :mod:`projections.queries` reads them."""

from __future__ import annotations

from collections.abc import Sequence

from projections.builtin.agent_state import AgentStateProjection
from projections.builtin.audit import AuditProjection
from projections.builtin.circuits import CircuitTransitionsProjection
from projections.builtin.dead_letters import DeadLettersProjection
from projections.builtin.machines import MachinesProjection
from projections.builtin.runs import RunsProjection
from projections.builtin.timeline import TimelineProjection
from projections.builtin.usage import UsageProjection
from projections.engine import Projection
from runtime.agents.agent import Agent
from runtime.settings import Settings

__all__ = [
    "AgentStateProjection",
    "AuditProjection",
    "CircuitTransitionsProjection",
    "DeadLettersProjection",
    "MachinesProjection",
    "RunsProjection",
    "TimelineProjection",
    "UsageProjection",
    "builtin_projections",
]


def builtin_projections(
    agents: Sequence[Agent] = (), settings: Settings | None = None
) -> list[Projection]:
    """Every built-in projection. ``agents`` (the ``--app``'s) let ``runs`` know who
    subscribes to what and ``agent_state`` fold their state; ``settings`` give the
    snapshot interval (default: from the environment) and the log's schema (default: the
    read schema's, without ``_read``)."""
    every = (settings if settings is not None else Settings.from_env()).snapshot_every
    return [
        RunsProjection(agents),
        AgentStateProjection(
            agents,
            snapshot_every=every,
            log_schema=settings.db_schema if settings is not None else None,
        ),
        TimelineProjection(),
        AuditProjection(),
        UsageProjection(),
        DeadLettersProjection(),
        CircuitTransitionsProjection(),
        MachinesProjection(),
    ]
