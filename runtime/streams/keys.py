"""Redis Streams plumbing: key names, partitioning, and clients that ping and retry."""

from __future__ import annotations

import asyncio
import zlib

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runtime.errors import ServiceUnavailable

log = structlog.get_logger(__name__)

KEY_PREFIX = "agentrt:"


def partition_of(key: str, partitions: int) -> int:
    """A stable partition for ``key`` (CRC32: the same in every process and release)."""
    return zlib.crc32(key.encode()) % partitions


def ingress_stream(partition: int) -> str:
    """``agentrt:in:{p3}``: the braces are a Redis Cluster hash tag, so a
    partition's stream and its dedupe keys share a slot."""
    return f"{KEY_PREFIX}in:{{p{partition}}}"


def dedupe_key(partition: int, event_id: str) -> str:
    return f"{KEY_PREFIX}dedupe:{{p{partition}}}:{event_id}"


def agent_stream(agent: str) -> str:
    """``agentrt:agent:{triage}``: events the relay, timers and redrives deliver to one agent."""
    return f"{KEY_PREFIX}agent:{{{agent}}}"


def log_wake_channel(schema: str) -> str:
    """Redis pub/sub channel on which workers announce commits to the log of ``schema``."""
    return f"{KEY_PREFIX}wake:{schema}"


#: Entries whose activation failed too often, with the error (``agentrt dlq``).
DLQ_STREAM = f"{KEY_PREFIX}dlq"


async def connect_redis(
    url: str, *, attempts: int = 5, socket_timeout: float = 5.0
) -> aioredis.Redis:
    """A client whose server answered PING; retried with backoff while it starts."""
    client = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=socket_timeout,
        socket_timeout=socket_timeout,
        health_check_interval=30,
    )
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise ServiceUnavailable("Redis", url, str(exc)) from exc
            log.debug("redis.retry", url=url, attempt=attempt, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")
