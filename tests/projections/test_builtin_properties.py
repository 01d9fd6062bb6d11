"""Promise 5 for every built-in projection: folding a generated log in random batches
equals folding it in one (what a rebuild does), table for table, row for row."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.builtin import builtin_projections
from projections.builtin.machines import MachinesProjection
from projections.builtin.runs import RunsProjection, _Open, _Run
from projections.engine import Projection, Tables
from runtime.events.model import START, RecordedEvent
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections.builtin_gen import AGENTS, Generator, ops

_suffixes = itertools.count()


async def fold(
    pool: asyncpg.Pool,
    p: Projection,
    schema: str,
    events: Sequence[RecordedEvent],
    sizes: Sequence[int],
) -> dict[str, list[tuple[Any, ...]]]:
    """Fold ``events`` into fresh tables, one transaction per batch (batch sizes cycling
    through ``sizes``, only the projection's types, as the engine passes them); the
    tables' rows, sorted."""
    tables = Tables(schema, p.tables, f"__t{next(_suffixes)}")
    async with pool.acquire() as conn:
        for name, columns in p.tables.items():
            await conn.execute(f"CREATE TABLE {tables[name]} {columns}")
        i = 0
        for size in itertools.cycle(sizes):
            if i >= len(events):
                break
            page = events[i : i + size]
            i += size
            mine = [e for e in page if p.types is None or e.event_type in p.types]
            if mine:
                async with conn.transaction():
                    await p.apply(conn, mine, tables)
        out = {}
        for name in p.tables:
            rows = await conn.fetch(f"SELECT * FROM {tables[name]}")
            out[name] = sorted((tuple(r) for r in rows), key=repr)
            await conn.execute(f"DROP TABLE {tables[name]}")
        # The snapshots the fold saved (a cache, emptied for the next fold).
        snaps = await conn.fetch(
            "DELETE FROM "
            f'"{schema.removesuffix("_read")}".snapshots RETURNING run_id, agent, '
            "fold_version, tx_id::text, position, event_id, event_count, state"
        )
        out["snapshots"] = sorted((tuple(r) for r in snaps), key=repr)
    return out


async def generated(log: EventLog, moves: list[Any]) -> list[RecordedEvent]:
    before = await log.read_last(1)
    start = before[-1].log_position if before else START
    await Generator(log).apply(moves)
    return await log.read_all(start, 100_000)


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(moves=ops, sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4))
async def test_every_builtin_projection_folds_the_same_in_any_batches(
    log: EventLog, settings: Settings, moves: list[Any], sizes: list[int]
) -> None:
    events = await generated(log, moves)
    every3 = Settings.from_env({}, db_schema=settings.db_schema, snapshot_every=3)
    for p in builtin_projections(AGENTS, every3):
        whole = await fold(log.pool, p, settings.read_schema, events, [len(events) or 1])
        batched = await fold(log.pool, p, settings.read_schema, events, sizes)
        assert batched == whole, p.name
        # Events without a run (circuit transitions) fold into no agent's state.
        per_run = collections.Counter(e.run_id for e in events if e.run_id is not None)
        if p.name == "agent_state" and max(per_run.values(), default=0) >= 3:
            assert whole["snapshots"], "a snapshot every 3 events of a run"


async def test_without_the_apps_agents_too(log: EventLog, settings: Settings) -> None:
    moves = [("activate", 0, 2, 1, 3), ("ask", 1, 0, 0, 1), ("activate", 1, 1, 2, 4),
             ("dead", 0, 1, 0, 2), ("decide", 1, 1, 1, 0), ("redrive", 0, 0, 0, 0),
             ("activate", 0, 1, 0, 5)]  # fmt: skip
    events = await generated(log, moves)
    for p in builtin_projections((), settings):
        whole = await fold(log.pool, p, settings.read_schema, events, [len(events)])
        for sizes in ([1], [2, 3], [5]):
            batched = await fold(log.pool, p, settings.read_schema, events, sizes)
            assert batched == whole, (p.name, sizes)


class ForgetfulRuns(RunsProjection):
    """A broken fold: what a run waits for is taken from the batch, not the table."""

    def _fold(self, run: _Run, e: RecordedEvent) -> None:
        if (
            (run.last_tx, run.last_position) < (e.tx, e.position)
            and run.events
            and (run.run_id not in self._seen)
        ):
            run.open = _Open()
        self._seen.add(run.run_id)
        super()._fold(run, e)

    async def apply(self, conn: Any, events: Sequence[RecordedEvent], tables: Tables) -> None:
        self._seen: set[Any] = set()
        await super().apply(conn, events, tables)


async def test_the_property_catches_a_fold_that_keeps_state_per_batch(
    log: EventLog, settings: Settings
) -> None:
    """The check above can fail: a fold that forgets an open approval across batches."""
    events = await generated(log, [("ask", 0, 0, 0, 1), ("activate", 0, 1, 0, 2)])
    broken = ForgetfulRuns(AGENTS)
    whole = await fold(log.pool, broken, settings.read_schema, events, [len(events)])
    batched = await fold(log.pool, broken, settings.read_schema, events, [1])
    assert batched != whole
    statuses = {row[0]: row[4] for row in whole["runs"]}
    assert set(statuses.values()) == {"waiting_for_approval"}
    right = RunsProjection(AGENTS)
    assert await fold(log.pool, right, settings.read_schema, events, [1]) == await fold(
        log.pool, right, settings.read_schema, events, [len(events)]
    )


class ForgetfulMachines(MachinesProjection):
    """A broken fold: each batch starts from the batch's events, not the table's rows."""

    async def apply(self, conn: Any, events: Sequence[RecordedEvent], tables: Tables) -> None:
        await super().apply(_Unread(conn), events, tables)


class _Unread:
    """A connection whose reads find nothing (its writes go through)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, *args: Any) -> list[Any]:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_machine_states_fold_across_batches(log: EventLog, settings: Settings) -> None:
    """Run 0 moves intake -> research, is refused research -> done, moves on to draft; run 1
    is refused intake -> draft. The property's check catches a fold that forgets."""
    moves = [("move", 0, 1, 0, 1), ("move", 0, 3, 0, 2), ("move", 1, 2, 0, 0),
             ("move", 0, 2, 0, 3)]  # fmt: skip
    events = await generated(log, moves)
    schema = settings.read_schema
    right = MachinesProjection()
    whole = await fold(log.pool, right, schema, events, [len(events)])
    rows = sorted((r[2], r[3], r[4], r[5], r[6]) for r in whole["machine_states"])
    assert rows == [
        ("draft", "research", 2, 1, "research -> done"),
        ("intake", None, 0, 1, "intake -> draft"),
    ]
    assert await fold(log.pool, right, schema, events, [1]) == whole
    broken = ForgetfulMachines()
    assert await fold(log.pool, broken, schema, events, [len(events)]) == whole
    assert await fold(log.pool, broken, schema, events, [1]) != whole
