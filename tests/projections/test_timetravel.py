"""Time travel: the state at each position equals the fold of the prefix, with and without
snapshots (property test); bad positions and runs get clear errors."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.errors import AgentMissing, StepOutOfRange, UnknownRun
from projections.timetravel import state_at
from runtime.agents.agent import Agent
from runtime.events.ids import run_stream
from runtime.events.model import Event, NewEvent, RecordedEvent
from runtime.log.snapshots import Snapshot, SnapshotStore, encode_state
from runtime.log.store import EventLog


class Moved(Event, tag="timetravel.moved"):
    dx: int
    label: str = ""


class Position(msgspec.Struct):
    x: int = 0
    moves: int = 0
    labels: list[str] = msgspec.field(default_factory=list)


class Walker(Agent):
    name = "walker"
    subscribes = (Moved,)
    state_type = Position

    def initial_state(self) -> Position:
        return Position()

    def evolve(self, state: Position, event: RecordedEvent) -> Position:
        if isinstance(event.body, Moved):
            return Position(state.x + event.body.dx, state.moves + 1,
                            [*state.labels, event.body.label][-3:])  # fmt: skip
        return state

    async def handle(self, event: Any, ctx: Any) -> None:
        return None


class Stateless(Agent):
    name = "stateless"
    subscribes = (Moved,)

    async def handle(self, event: Any, ctx: Any) -> None:
        return None


async def _run(log: EventLog, moves: list[tuple[int, str]]) -> tuple[uuid.UUID, list[Any]]:
    run_id = uuid.uuid4()
    events = [
        NewEvent(
            body=Moved(dx=dx, label=label),
            run_id=run_id,
            event_id=run_id if i == 0 else uuid.uuid4(),
        )
        for i, (dx, label) in enumerate(moves)
    ]
    # A few appends, so the run spans several transactions.
    for chunk in range(0, len(events), 3):
        await log.append(run_stream(run_id), events[chunk : chunk + 3])
    return run_id, await log.read_run(run_id)


def _expected(events: list[Any], upto: int) -> dict[str, Any]:
    walker = Walker()
    state = walker.initial_state()
    for e in events[: upto + 1]:
        state = walker.evolve(state, e)
    return msgspec.to_builtins(state)


moves = st.lists(
    st.tuples(st.integers(-50, 50), st.sampled_from(["", "n", "s", "é"])), min_size=1, max_size=12
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(moves=moves, snap_at=st.sets(st.integers(0, 11), max_size=4))
async def test_state_at_every_position_is_the_fold_of_its_prefix(
    log: EventLog, moves: list[tuple[int, str]], snap_at: set[int]
) -> None:
    run_id, events = await _run(log, moves)
    walker = Walker()
    store = SnapshotStore(log.pool, log.schema)
    snaps = []
    for i in sorted(k for k in snap_at if k < len(events)):
        data = encode_state(_state(events, i), Position)
        assert data is not None
        e = events[i]
        snaps.append(Snapshot(run_id=run_id, agent="walker", fold_version=walker.fold_version,
                              position=e.log_position, event_id=e.event_id, event_count=i + 1,
                              state=data))  # fmt: skip
    await store.save(snaps)
    for i, e in enumerate(events):
        expected = _expected(events, i)
        for use in (True, False):
            got = await state_at(log, [walker, Stateless()], run_id, e.position, snapshots=use)
            (only,) = got.agents
            assert only.state == expected, (i, use)
            assert got.event_count == i + 1
            if use and any(s.event_count - 1 <= i for s in snaps):
                assert only.snapshot_position is not None
                assert only.folded < i + 1 or only.folded == 0
            else:
                assert only.snapshot_position is None and only.folded == i + 1


def _state(events: list[Any], i: int) -> Position:
    walker = Walker()
    state = walker.initial_state()
    for e in events[: i + 1]:
        state = walker.evolve(state, e)
    return state


async def test_a_snapshot_of_another_fold_version_is_never_read(log: EventLog) -> None:
    run_id, events = await _run(log, [(1, "a"), (2, "b"), (3, "c")])
    wrong = encode_state(Position(x=999, moves=99), Position)
    assert wrong is not None
    await SnapshotStore(log.pool, log.schema).save(
        [
            Snapshot(
                run_id=run_id,
                agent="walker",
                fold_version="v0",
                position=events[1].log_position,
                event_id=events[1].event_id,
                event_count=2,
                state=wrong,
            )
        ]
    )
    got = await state_at(log, [Walker()], run_id)
    assert got.agents[0].state == _expected(events, 2)
    assert got.agents[0].snapshot_position is None


async def test_bad_positions_runs_and_agents_are_refused(log: EventLog) -> None:
    run_id, events = await _run(log, [(1, "a"), (2, "b")])
    other, other_events = await _run(log, [(5, "x")])
    with pytest.raises(StepOutOfRange, match="is not an event of run"):
        await state_at(log, [Walker()], run_id, other_events[0].position)
    with pytest.raises(UnknownRun):
        await state_at(log, [Walker()], uuid.uuid4())
    with pytest.raises(AgentMissing, match="keeps state"):
        await state_at(log, [Stateless()], run_id)
    assert (await state_at(log, [Walker()], other)).agents[0].state["x"] == 5
    assert len(events) == 2


def test_a_state_that_does_not_round_trip_is_not_snapshotted() -> None:
    assert encode_state({1, 2}, Any) is None  # a set comes back as a list
    assert encode_state(Position(x=1), Position) is not None


async def test_the_worker_folds_ctx_state_from_the_nearest_snapshot(
    log: EventLog, redis: Any
) -> None:
    """A relayed event's activation starts from the snapshot before it and folds only the
    events after it; the state equals the fold from the start (and a snapshot that lies shows
    that it was read)."""
    from runtime.worker.delivery import Delivery
    from runtime.worker.worker import Worker

    run_id, events = await _run(log, [(i, "") for i in range(1, 9)])
    trigger = events[6]
    delivery = Delivery(stream="s", entry_id="1-0", event_id=trigger.event_id,
                        type=trigger.event_type, schema_version=1, body=b"{}", run_id=run_id,
                        position=trigger.log_position)  # fmt: skip
    worker = Worker([Walker()], redis=redis, log=log)
    walker = Walker()
    state, history = await worker._history(walker, delivery)
    assert history == events[:6]
    full = walker.initial_state() if state is None or not isinstance(state, Position) else state
    for e in history:
        full = walker.evolve(full, e)
    assert full == _state(events, 5)
    # A snapshot after event 3 (index 2), holding a state the fold could never produce: the
    # worker starts from it and folds only events 4..6.
    marked = Position(x=1000, moves=3)
    data = encode_state(marked, Position)
    assert data is not None
    await SnapshotStore(log.pool, log.schema).save([
        Snapshot(run_id=run_id, agent="walker", fold_version=walker.fold_version,
                 position=events[2].log_position, event_id=events[2].event_id, event_count=3,
                 state=data)
    ])  # fmt: skip
    state, history = await worker._history(walker, delivery)
    assert state == marked
    assert history == events[3:6]
    # The trigger's own position is never included, even with a snapshot taken at it.
    data = encode_state(_state(events, 6), Position)
    assert data is not None
    await SnapshotStore(log.pool, log.schema).save([
        Snapshot(run_id=run_id, agent="walker", fold_version=walker.fold_version,
                 position=trigger.log_position, event_id=trigger.event_id, event_count=7,
                 state=data)
    ])  # fmt: skip
    state, history = await worker._history(walker, delivery)
    assert state == marked and history == events[3:6]
