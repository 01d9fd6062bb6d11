"""The projection engine: checkpoints in the fold's transaction, rebuilds into shadow tables
swapped in atomically, version changes, status, bad names."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import asyncpg
import pytest

from projections.engine import Projection, Projector, Tables
from projections.errors import ProjectionBusy, UnknownProjection
from runtime.errors import AppLoadError
from runtime.events.model import Event, RecordedEvent
from runtime.log.store import EventLog
from runtime.settings import Settings


class Ticked(Event, tag="enginetest.ticked"):
    n: int


class Other(Event, tag="enginetest.other"):
    n: int


class Ticks(Projection):
    """Per stream: how many ticks and their sum (a fold whose double application shows)."""

    name = "ticks"
    types = frozenset({"enginetest.ticked"})
    tables: ClassVar[dict[str, str]] = {
        "ticks": "(stream text PRIMARY KEY, count bigint NOT NULL, total bigint NOT NULL)"
    }
    indexes = ("CREATE INDEX ON {ticks} (total)",)
    #: Seconds each apply() waits (to hold a page open in a test).
    delay = 0.0

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        seen: dict[str, tuple[int, int]] = {}
        for e in events:
            assert isinstance(e.body, Ticked)
            c, t = seen.get(e.stream_id, (0, 0))
            seen[e.stream_id] = (c + 1, t + e.body.n)
        if self.delay:
            await asyncio.sleep(self.delay)
        t = tables["ticks"]
        await conn.execute(
            f"INSERT INTO {t} SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) "
            f"ON CONFLICT (stream) DO UPDATE SET count = {t}.count + excluded.count, "
            f"total = {t}.total + excluded.total",
            list(seen),
            [v[0] for v in seen.values()],
            [v[1] for v in seen.values()],
        )


class TicksV2(Ticks):
    version = 2


async def _append(log: EventLog, streams: int, per: int, start: int = 0) -> int:
    for s in range(streams):
        await log.append(f"s-{s}", [Ticked(n=start + i) for i in range(per)])
        await log.append(f"o-{s}", [Other(n=i) for i in range(3)])
    return sum(start + i for i in range(per))


async def _rows(log: EventLog, settings: Settings) -> dict[str, tuple[int, int]]:
    rows = await log.pool.fetch(f'SELECT * FROM "{settings.read_schema}".ticks')
    return {r["stream"]: (r["count"], r["total"]) for r in rows}


def _settings(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)


async def test_catch_up_folds_each_event_once_and_keeps_its_checkpoint(
    log: EventLog, settings: Settings
) -> None:
    per_stream = await _append(log, 3, 5)
    projector = Projector(log, [Ticks()], settings, batch=4)
    await projector.catch_up()  # new: built by a rebuild, then the lane
    assert await _rows(log, settings) == {f"s-{s}": (5, per_stream) for s in range(3)}
    await projector.catch_up()  # nothing new: nothing folded again
    await _append(log, 3, 2, start=100)
    await Projector(log, [Ticks()], settings, batch=3).catch_up()
    rows = await _rows(log, settings)
    assert rows == {f"s-{s}": (7, per_stream + 201) for s in range(3)}
    status = {s.name: s for s in await projector.status()}
    assert status["ticks"].state == "live"
    assert status["ticks"].lag_events == 0
    assert status["ticks"].events_applied == 3 * 5 + 3 * 3 + 3 * 2 + 3 * 3


async def test_two_projectors_at_once_fold_each_page_once(
    log: EventLog, settings: Settings
) -> None:
    await _append(log, 1, 1)
    await Projector(log, [Ticks()], settings).catch_up()
    await _append(log, 20, 10)
    a, b = (Projector(log, [Ticks()], settings, batch=7) for _ in range(2))
    await asyncio.gather(a.catch_up(), b.catch_up())
    rows = await _rows(log, settings)
    assert rows["s-0"] == (11, 45)
    assert all(rows[f"s-{s}"] == (10, 45) for s in range(1, 20))


async def test_a_failed_page_leaves_tables_and_checkpoint_as_they_were(
    log: EventLog, settings: Settings
) -> None:
    class Failing(Ticks):
        async def apply(self, conn: Any, events: Any, tables: Tables) -> None:
            await super().apply(conn, events, tables)
            raise RuntimeError("the fold failed after writing")

    await _append(log, 2, 3)
    await Projector(log, [Ticks()], settings).catch_up()
    before = await _rows(log, settings)
    await _append(log, 2, 3, start=10)
    with pytest.raises(RuntimeError):
        await Projector(log, [Failing()], settings).catch_up()
    assert await _rows(log, settings) == before
    await Projector(log, [Ticks()], settings).catch_up()
    assert await _rows(log, settings) == {f"s-{s}": (6, 3 + 33) for s in range(2)}


async def test_version_change_rebuilds_or_is_flagged(log: EventLog, settings: Settings) -> None:
    await _append(log, 2, 4)
    await Projector(log, [Ticks()], settings).catch_up()
    flagged = Projector(log, [TicksV2()], _settings(settings, projection_version_change="flag"))
    await flagged.catch_up()
    (status,) = await flagged.status()
    assert (status.state, status.built_version, status.version) == ("stale", "1", "2")
    rebuilt = Projector(log, [TicksV2()], settings)
    await rebuilt.catch_up()
    (status,) = await rebuilt.status()
    assert (status.state, status.built_version) == ("live", "2")
    assert await _rows(log, settings) == {f"s-{s}": (4, 6) for s in range(2)}


async def test_rebuild_under_concurrent_appends_misses_nothing_and_never_shows_empty(
    log: EventLog, settings: Settings
) -> None:
    """Appends run during the rebuild; queries run through the swap: every query sees a
    full table, and the rebuilt table equals the log."""
    await _append(log, 10, 20)
    projector = Projector(log, [Ticks()], settings, batch=50)
    await projector.catch_up()
    stop = asyncio.Event()
    appended: list[int] = []
    seen_sizes: list[int] = []
    table = f'"{settings.read_schema}".ticks'

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            await log.append("s-live", [Ticked(n=1)])
            appended.append(1)
            i += 1
            await asyncio.sleep(0.002)

    async def reader() -> None:
        while not stop.is_set():
            seen_sizes.append(await log.pool.fetchval(f"SELECT count(*) FROM {table}"))

    live = Projector(log, [Ticks()], settings, batch=50)
    live_stop = asyncio.Event()
    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader()),
             asyncio.create_task(live.run(live_stop))]  # fmt: skip
    progress: list[Any] = []
    slow = Ticks()
    slow.delay = 0.01  # a rebuild long enough for appends to land during it
    await Projector(log, [slow], settings, batch=20).rebuild("ticks", progress=progress.append)
    stop.set()
    await asyncio.gather(*tasks[:2])
    await live.catch_up()
    live_stop.set()
    await tasks[2]
    rows = await _rows(log, settings)
    assert rows["s-live"] == (len(appended), len(appended))
    assert all(rows[f"s-{s}"] == (20, 190) for s in range(10))
    assert min(seen_sizes) >= 10, "a query saw the table empty or partial"
    assert progress[-1].phase == "done"
    assert progress[-1].done >= progress[-1].total - len(appended)
    assert any(p.eta is not None for p in progress)


async def test_unknown_busy_and_invalid_projections(log: EventLog, settings: Settings) -> None:
    projector = Projector(log, [Ticks()], settings)
    with pytest.raises(UnknownProjection, match=r"no projection 'nope'.*ticks"):
        await projector.rebuild("nope")
    async with log.pool.acquire() as conn:
        key = f"agentrt.rebuild:{settings.read_schema}:ticks"
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", key)
        try:
            with pytest.raises(ProjectionBusy):
                await projector.rebuild("ticks")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)

    class Clash(Ticks):
        name = "clash"

    with pytest.raises(AppLoadError, match="belongs to projection 'ticks'"):
        Projector(log, [Ticks(), Clash()], settings)

    class BadName(Ticks):
        name = "Bad Name"

    with pytest.raises(AppLoadError, match="must match"):
        Projector(log, [BadName()], settings)


async def test_a_killed_rebuild_leaves_live_tables_serving(
    log: EventLog, settings: Settings
) -> None:
    await _append(log, 4, 5)
    projector = Projector(log, [Ticks()], settings, batch=5)
    await projector.catch_up()
    before = await _rows(log, settings)
    slow = Ticks()
    slow.delay = 0.05
    task = asyncio.create_task(Projector(log, [slow], settings, batch=5).rebuild("ticks"))
    for _ in range(200):
        (status,) = await projector.status()
        if status.state == "rebuilding" and (status.rebuild_done or 0) > 0:
            break
        await asyncio.sleep(0.02)
    assert status.state == "rebuilding"
    assert status.rebuild_total == 4 * 5 + 4 * 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _rows(log, settings) == before
    await projector.rebuild("ticks")  # starts over, cleanly
    assert await _rows(log, settings) == before
    (status,) = await projector.status()
    assert status.state == "live"


def test_tables_name_live_and_shadow() -> None:
    t = Tables("x_read", ["runs"], "__rebuild")
    assert t["runs"] == '"x_read"."runs__rebuild"'
    assert t.parts("runs") == ("x_read", "runs__rebuild")
    assert list(t) == ["runs"]
