"""Time travel: a run's folded agent state as of any of its events.

The state of each agent that keeps one (``Agent.evolve``) after folding the
run's events up to and including the event at a log position, exactly what
``ctx.state`` would have held for an activation triggered just after it. The
fold starts from the nearest snapshot at or before that event (the
agent-state projection takes one every ``snapshot_every`` events) and reads
only the events after it; with no snapshot it folds from the start. Both
answers are the same (a property test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import msgspec

from projections.errors import AgentMissing, StepOutOfRange, UnknownRun
from runtime.agents.agent import Agent
from runtime.events.model import LogPosition, RecordedEvent
from runtime.log.snapshots import SnapshotStore
from runtime.log.store import EventLog


class AgentState(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's folded state in the run."""

    agent: str
    #: The state as JSON values (``msgspec.to_builtins``).
    state: Any
    #: Events folded on top of the snapshot (all of the prefix when none was used).
    folded: int
    #: The log position of the snapshot the fold started from, if one was used.
    snapshot_position: int | None = None


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    """A run's state as of one of its events."""

    run_id: UUID
    #: The event the state is taken after: its global log position, id and type.
    position: int
    event_id: UUID
    event_type: str
    #: How many of the run's events come up to and including it.
    event_count: int
    agents: list[AgentState]


def _fold(agent: Agent, state: Any, events: Sequence[RecordedEvent]) -> Any:
    for e in events:
        state = agent.evolve(state, e)
    return state


async def state_at(
    log: EventLog,
    agents: Sequence[Agent],
    run_id: UUID,
    position: int | None = None,
    *,
    snapshots: bool = True,
) -> RunState:
    """Each stateful agent's state after the run's event at ``position`` (default: its last).

    :class:`UnknownRun` for a run with no events, :class:`StepOutOfRange` for a
    position that is not one of the run's events, :class:`AgentMissing` when no
    given agent keeps state.
    """
    stateful = [a for a in agents if a.folds_state]
    if not stateful:
        names = ", ".join(a.name for a in agents) or "none"
        raise AgentMissing(
            "time travel folds the agents' state with their evolve(); none of the loaded "
            f"agents ({names}) keeps state: start with --app naming your agents"
        )
    events = await log.read_run(run_id)
    if not events:
        raise UnknownRun(f"no run {run_id} in the log")
    if position is None:
        index = len(events) - 1
    else:
        index = next((i for i, e in enumerate(events) if e.position == position), -1)
        if index < 0:
            raise StepOutOfRange(
                f"position {position} is not an event of run {run_id} (its events are at "
                f"positions {min(e.position for e in events)}..{max(e.position for e in events)},"
                " see its timeline)"
            )
    target = events[index]
    prefix = events[: index + 1]
    store = SnapshotStore(log.pool, log.schema) if snapshots else None
    out = []
    for agent in stateful:
        out.append(await _agent_state(agent, run_id, target.log_position, prefix, store))
    return RunState(
        run_id=run_id,
        position=target.position,
        event_id=target.event_id,
        event_type=target.event_type,
        event_count=index + 1,
        agents=out,
    )


async def _agent_state(
    agent: Agent,
    run_id: UUID,
    upto: LogPosition,
    prefix: Sequence[RecordedEvent],
    store: SnapshotStore | None,
) -> AgentState:
    found = None
    if store is not None:
        found = await store.load(
            run_id, agent.name, agent.fold_version, agent.state_decode_type(), upto=upto
        )
    if found is not None:
        state, at = found
        tail = [e for e in prefix if e.log_position > at]
        return AgentState(
            agent=agent.name,
            state=msgspec.to_builtins(_fold(agent, state, tail)),
            folded=len(tail),
            snapshot_position=at.position,
        )
    state = _fold(agent, agent.initial_state(), prefix)
    return AgentState(agent=agent.name, state=msgspec.to_builtins(state), folded=len(prefix))
