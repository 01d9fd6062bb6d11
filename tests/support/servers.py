"""The servers a test session uses, and a fresh schema per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from runtime.ops.embedded import EmbeddedRedis


class Servers:
    def __init__(self, redis_url: str, database_url: str, embedded: bool) -> None:
        self.redis_url = redis_url
        self.database_url = database_url
        self.embedded = embedded


def fresh_schema() -> str:
    return "t_" + uuid.uuid4().hex[:12]


async def drop_schema(database_url: str, schema: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}_read" CASCADE')
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def redis_db_url(url: str, db: int) -> str:
    """``url`` pointed at Redis database ``db`` (a test area owns and flushes its own)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        sep = "&" if parts.query else ""
        return urlunsplit(parts._replace(query=f"{parts.query}{sep}db={db}"))
    return urlunsplit(parts._replace(path=f"/{db}"))


@contextlib.contextmanager
def private_redis(directory: Path, **options: Any) -> Iterator[str]:
    """A Redis of the test's own (embedded Valkey, AOF; ``options`` as EmbeddedRedis takes
    them): its URL, the server stopped afterwards. For tests that change its CONFIG."""
    server = EmbeddedRedis(directory, **options)
    try:
        yield server.start()
    finally:
        server.stop()


def as_user(url: str, user: str, password: str) -> str:
    """``url`` logged in as ``user``."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def redis_user(
    admin: aioredis.Redis, url: str, prefix: str, *, denied: Sequence[str]
) -> AsyncIterator[str]:
    """``url`` as a new ACL user who may do everything but the ``denied`` commands (a
    managed service's CONFIG, say); the user is deleted afterwards."""
    user, password = f"{prefix}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        categories=["+@all"],
        commands=[f"-{command}" for command in denied],
    )
    try:
        yield as_user(url, user, password)
    finally:
        await admin.acl_deluser(user)
