"""Shared helpers of the worker tests: a flushed Redis database, sending events, running workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from runtime.agents.agent import Agent
from runtime.events.model import Event, encode_body, event_type_of
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.streams.keys import ingress_stream
from runtime.worker.options import WorkerOptions
from runtime.worker.relay import Relay
from runtime.worker.worker import Worker
from tests.support import REPO
from tests.support.servers import Servers, redis_db_url

#: The Redis database the worker tests own (flushed per test).
WORKER_DB = 11


def db_url(url: str, db: int = WORKER_DB) -> str:
    return redis_db_url(url, db)


def ingress_fields(body: Event, event_id: uuid.UUID | None = None) -> dict[str, Any]:
    """Fields as the webhook ingress writes them."""
    return {
        "event_id": str(event_id or uuid.uuid4()),
        "type": event_type_of(body),
        "schema_version": str(type(body).__schema_version__),
        "source": "test",
        "delivery": "d",
        "received_at": datetime.now(UTC).isoformat(),
        "content_type": "application/json",
        "body": encode_body(body),
        "raw": b"{}",
    }


async def send(
    redis: aioredis.Redis, body: Event, *, event_id: uuid.UUID | None = None, partition: int = 0
) -> uuid.UUID:
    fields = ingress_fields(body, event_id)
    await redis.xadd(ingress_stream(partition), fields)
    return uuid.UUID(fields["event_id"])


async def wait_for(
    check: Callable[[], Awaitable[bool]], seconds: float = 20.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.02)


def fast_options(**overrides: Any) -> WorkerOptions:
    values: dict[str, Any] = {
        "concurrency": 8,
        "batch": 16,
        "block_ms": 50,
        "claim_idle": 0.3,
        "max_deliveries": 3,
        "drain_timeout": 5.0,
        "trim_interval": 3600.0,
        "partitions": 2,
    }
    values.update(overrides)
    return WorkerOptions(**values)


@contextlib.asynccontextmanager
async def running(
    agents: Sequence[Agent],
    redis: aioredis.Redis,
    log: EventLog,
    *,
    relay: bool = True,
    options: WorkerOptions | None = None,
    llm: Any = None,
) -> AsyncIterator[Worker]:
    """A worker (and a relay) running in this loop until the block ends."""
    worker = Worker(agents, redis=redis, log=log, llm=llm, options=options or fast_options())
    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker.run(stop))]
    if relay:
        r = Relay(log, redis, agents, poll_interval=0.05, timer_interval=0.05)
        tasks.append(asyncio.create_task(r.run(stop)))
    try:
        await worker.setup()
        yield worker
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


async def count_type(log: EventLog, event_type: str) -> int:
    q = f'"{log.schema}"'
    return int(await log.pool.fetchval(f"SELECT count(*) FROM {q}.events WHERE event_type = $1",
                                       event_type))  # fmt: skip


async def inbox_rows(log: EventLog) -> list[tuple[str, uuid.UUID, str]]:
    q = f'"{log.schema}"'
    rows = await log.pool.fetch(f"SELECT consumer, event_id, outcome FROM {q}.inbox")
    return [(r[0], r[1], r[2]) for r in rows]


def worker_env(
    settings: Settings, servers: Servers, model_url: str, calls: Path, tool_delay: float
) -> dict[str, str]:
    """The environment of an ``agentrt worker`` process running ``tests.support.apps``:
    the test's servers and schema, and the production model path aimed at ``model_url``
    (an :class:`~runtime.llm.offline.OfflineServer` of the test's own)."""
    return {
        **os.environ,
        "REDIS_URL": db_url(servers.redis_url),
        "DATABASE_URL": servers.database_url,
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        # A key sends the worker down the production path (no offline server
        # of its own), aimed at the test's model server.
        "ANTHROPIC_API_KEY": "sk-test",
        "ANTHROPIC_BASE_URL": model_url,
        "ORDERS_TOOL_DELAY": str(tool_delay),
        "ORDERS_CALLS": str(calls),
        "AGENTRT_LOG_LEVEL": "warning",
        "PYTHONPATH": str(REPO),
    }
