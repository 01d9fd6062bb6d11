"""The run explorer's live updates: one watcher of the log's tail tells every page."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from projections.api.backend import Backend
from projections.engine import Projector
from projections.registry import registered
from projections.ui.live import LogWatch
from runtime.events.ids import run_stream
from runtime.events.model import NewEvent
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections.test_api import email


async def _listen(watch: LogWatch, heard: asyncio.Queue[tuple[str, int]]) -> None:
    async for change in watch.changes():
        await heard.put(change)


async def test_pages_hear_of_the_log_growing_and_of_the_runs_model_folding(
    settings: Settings, log: EventLog
) -> None:
    watch = LogWatch(Backend(settings, pool=log.pool), interval=0.05)
    queues: list[asyncio.Queue[tuple[str, int]]] = [asyncio.Queue(), asyncio.Queue()]
    tasks = [asyncio.create_task(_listen(watch, q)) for q in queues]
    try:
        await asyncio.sleep(0.5)  # both listening, the first read done
        assert watch._listeners == 2
        # Nothing moved since they started listening: nothing is said.
        assert all(q.empty() for q in queues)
        run_id = uuid.uuid4()
        body = email(1, "ada@example.com")
        await log.append(run_stream(run_id), [NewEvent(body=body, run_id=run_id)])
        head = await log.pool.fetchval(f'SELECT max(position) FROM "{settings.db_schema}".events')
        for q in queues:  # every listener, from one read
            assert await asyncio.wait_for(q.get(), 10) == ("log", head)
        await Projector(log, registered(agents=[]), settings).catch_up()
        for q in queues:
            assert await asyncio.wait_for(q.get(), 10) == ("runs", head)
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await watch.close()
    assert watch._listeners == 0


async def test_the_watcher_outlives_a_database_it_cannot_reach(
    settings: Settings, log: EventLog
) -> None:
    """A read that fails (no database configured: the backend's 503; PostgreSQL away:
    a refused connection) is tried again, and pages hear of changes once the database
    answers. (The first kind used to end the watcher, leaving every page waiting.)"""
    import dataclasses

    away = dataclasses.replace(settings, database_url=None)
    watch = LogWatch(Backend(away), interval=0.05)
    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    task = asyncio.create_task(_listen(watch, heard))
    try:
        await asyncio.sleep(1.0)  # several failed reads
        assert watch._task is not None and not watch._task.done()
        watch._backend = Backend(settings, pool=log.pool)  # the database is there now
        await asyncio.sleep(0.5)
        run_id = uuid.uuid4()
        body = email(2, "grace@example.com")
        await log.append(run_stream(run_id), [NewEvent(body=body, run_id=run_id)])
        name, _ = await asyncio.wait_for(heard.get(), 10)
        assert name == "log"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await watch.close()
