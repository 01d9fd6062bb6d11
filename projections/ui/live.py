"""Live updates for the run explorer: one watcher of the log's tail per process, fanned out
to every open page as server-sent events.

The watcher reads two numbers, at most every ``interval`` seconds and only while a page
listens: the log's head (the last position written) and where the ``runs`` read model's
projector is (its checkpoint). A page is told ``log`` when the head moves (a run page of
a running run reloads its timeline) and ``runs`` when the projector has folded new events
(the runs table reloads). Two cheap index reads per interval, whatever the number of open
pages: each page waits on one shared condition, never on a query of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING

import asyncpg
import structlog

from projections.errors import ReadSideError

if TYPE_CHECKING:  # a type only: projections.api imports this package at its start
    from projections.api.backend import Backend

log = structlog.get_logger(__name__)


class LogWatch:
    """The log's head and the runs projection's position, shared by every listener."""

    def __init__(self, backend: Backend, *, interval: float = 0.5) -> None:
        self._backend = backend
        self.interval = interval
        self.head: int | None = None
        self.folded: int | None = None
        self._changed = asyncio.Condition()
        self._listeners = 0
        self._task: asyncio.Task[None] | None = None
        #: Set once the first read is in: a page is told of changes after it, not of it.
        self._primed = asyncio.Event()

    async def _read(self) -> tuple[int | None, int | None]:
        settings = self._backend.settings
        pool = await self._backend.pool()
        head = await pool.fetchval(f'SELECT max(position) FROM "{settings.db_schema}".events')
        try:
            folded = await pool.fetchval(
                f'SELECT position FROM "{settings.read_schema}".projection_checkpoints '
                "WHERE name = 'runs'"
            )
        except asyncpg.UndefinedTableError:  # no projector has run yet
            folded = None
        return head, folded

    async def _run(self) -> None:
        try:
            while self._listeners:
                try:
                    head, folded = await self._read()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                        ReadSideError) as exc:  # fmt: skip
                    # PostgreSQL away (or the pool not opened yet): try again next time.
                    log.warning("ui.live_read_failed", error=str(exc))
                else:
                    if (head, folded) != (self.head, self.folded):
                        self.head, self.folded = head, folded
                        async with self._changed:
                            self._changed.notify_all()
                self._primed.set()
                await asyncio.sleep(self.interval)
        finally:
            # Ended (no listener left, or a fault): the next listener starts a new watcher
            # and waits for its first read.
            self._task = None
            self._primed.clear()

    def _moved(self, seen: tuple[int | None, int | None]) -> bool:
        return (self.head, self.folded) != seen

    async def changes(self) -> AsyncIterator[tuple[str, int]]:
        """``("log", head)`` and ``("runs", position)`` whenever they move, from now on."""
        self._listeners += 1
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ui-log-watch")
        try:
            await self._primed.wait()
            seen = (self.head, self.folded)
            while True:
                async with self._changed:
                    await self._changed.wait_for(partial(self._moved, seen))
                head, folded = self.head, self.folded
                if head != seen[0] and head is not None:
                    yield "log", head
                if folded != seen[1] and folded is not None:
                    yield "runs", folded
                seen = (head, folded)
        finally:
            self._listeners -= 1

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
