"""Real servers for the suite: embedded by default, REDIS_URL / DATABASE_URL when set."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from runtime.log.migrations import migrate
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.ops.embedded import EmbeddedServices
from runtime.settings import Settings
from tests.support.runtime import db_url
from tests.support.servers import Servers, drop_schema, fresh_schema


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """One Redis and one PostgreSQL for the whole session."""
    redis_url = os.environ.get("REDIS_URL")
    database_url = os.environ.get("DATABASE_URL")
    services: EmbeddedServices | None = None
    state = None
    if redis_url is None or database_url is None:
        state = Path(tempfile.mkdtemp(prefix="agentrt-test-"))
        # fsync off: a throwaway cluster; durability is not what these tests measure.
        services = EmbeddedServices(state, fast_unsafe=True, redis_appendfsync="everysec")
        urls = services.up(redis=redis_url is None, postgres=database_url is None)
        redis_url = redis_url or urls["REDIS_URL"]
        database_url = database_url or urls["DATABASE_URL"]
    try:
        yield Servers(redis_url, database_url, embedded=services is not None)
    finally:
        if services is not None:
            services.destroy()
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
async def settings(servers: Servers) -> AsyncIterator[Settings]:
    """Settings for a migrated schema of this test's own; dropped afterwards."""
    schema = fresh_schema()
    s = Settings.from_env({}, db_schema=schema, poll_interval=0.05).with_urls(
        redis_url=servers.redis_url, database_url=servers.database_url
    )
    await migrate(s)
    yield s
    await drop_schema(servers.database_url, schema)


@pytest.fixture
async def log(settings: Settings) -> AsyncIterator[EventLog]:
    """The log as the runtime sees it: connected as the app role."""
    pool = await open_runtime_pool(settings, max_size=20)
    try:
        yield EventLog(pool, schema=settings.db_schema)
    finally:
        await pool.close()


@pytest.fixture
async def admin(servers: Servers) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the configured (superuser) role, for tampering and inspection."""
    conn = await asyncpg.connect(servers.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    """A client on the Redis database the worker tests own, flushed before and after."""
    client = aioredis.Redis.from_url(db_url(servers.redis_url))
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()
