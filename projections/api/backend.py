"""What the query API's routes read through: one pool, the log, the agents."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import asyncpg

from projections.api.http import Unavailable
from runtime.agents.agent import Agent
from runtime.errors import ServiceUnavailable, SettingsError
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.settings import Settings


class Backend:
    """What the routes read through: one pool (given, opened at start, or opened on first
    use), the log and the read models over it, and the agents time travel folds with."""

    def __init__(
        self, settings: Settings, agents: Iterable[Agent] = (), pool: asyncpg.Pool | None = None
    ) -> None:
        self.settings = settings
        self.agents: tuple[Agent, ...] = tuple(agents)
        self._pool = pool
        self._owned = False
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await self._open()
                    self._owned = True
        return self._pool

    async def _open(self) -> asyncpg.Pool:
        try:
            return await open_runtime_pool(self.settings, min_size=0, max_size=4, attempts=2)
        except SettingsError as exc:
            raise Unavailable(f"the query API has no database: {exc.message}") from None
        except ServiceUnavailable as exc:
            raise Unavailable(exc.message) from None

    async def log(self) -> EventLog:
        return EventLog(await self.pool(), schema=self.settings.db_schema)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._owned:
            await pool.close()
