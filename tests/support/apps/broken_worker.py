"""A deliberately broken worker for the kill -9 test: it acknowledges entries on receipt.

``python -m tests.support.apps.broken_worker`` takes the same settings from the
environment as ``agentrt worker`` and runs ``tests.support.apps.crash`` with a Worker
whose only change is the bug: XACK before the activation commits. The crash
test must catch it (events acknowledged, then lost with the killed process).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.streams.keys import connect_redis
from runtime.worker.options import WorkerOptions
from runtime.worker.worker import Worker, _Group
from tests.support.apps.crash import agents


class AckOnReceipt(Worker):
    async def _entry(
        self, g: _Group, stream: str, entry_id: str, fields: dict[Any, Any], claimed: bool
    ) -> None:
        await self.redis.xack(stream, g.agent.name, entry_id)  # the bug under test
        await super()._entry(g, stream, entry_id, fields, claimed)


async def main() -> None:
    settings = Settings.from_env()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    pool = await open_runtime_pool(settings)
    redis = await connect_redis(settings.require_redis_url())
    options = WorkerOptions(concurrency=4, partitions=2, claim_idle=0.5, max_deliveries=50)
    try:
        async with model_client(settings) as mc:
            llm = LLM(mc.client, settings, offline=mc.offline)
            log = EventLog(pool, schema=settings.db_schema)
            await AckOnReceipt(agents, redis=redis, log=log, llm=llm, options=options).run(stop)
    finally:
        await redis.aclose()
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
