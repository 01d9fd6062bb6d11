"""The servers a test session uses, and a fresh schema per test."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg


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
