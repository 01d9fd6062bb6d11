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
