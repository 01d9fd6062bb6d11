"""Redis Streams plumbing: key names, partitioning, and clients that ping and retry."""

from __future__ import annotations

import asyncio
import typing
import zlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from runtime.errors import ServiceUnavailable, SettingsError

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


#: URL schemes that name a Redis Cluster (``redis+cluster://host:port``): any one
#: node of it, from which the client learns the others and their slots.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """For a ``redis+cluster://`` (or ``rediss+cluster://``) URL, the plain URL of its
    seed node; None for any other URL. A cluster has only database 0: another one is
    refused (:class:`SettingsError`) rather than ignored."""
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme)
    if plain is None:
        return None
    if not parts.hostname:
        raise SettingsError(
            "REDIS_URL", f"{parts.scheme}:// needs a host (any node of the cluster)"
        )
    if parts.path.strip("/") not in ("", "0") or "db=" in parts.query:
        raise SettingsError(
            "REDIS_URL",
            f"a Redis Cluster has only database 0; drop {parts.path or parts.query!r} from the URL",
        )
    return urlunsplit(parts._replace(scheme=plain, path=""))


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """A client for ``url`` (not connected yet): a :class:`RedisCluster` for a
    ``redis+cluster://`` URL, else a plain one.

    Typed as ``Redis``: the cluster client offers the same command methods, and
    the few places where cluster mode behaves differently (MULTI and scripts
    within one slot, no scripts or PUBLISH in pipelines, XREADGROUP per slot) ask
    :func:`is_cluster`.
    """
    seed = cluster_url(url)
    if seed is None:
        return aioredis.Redis.from_url(url, **options)
    cluster = RedisCluster.from_url(seed, **options)
    # Older redis-py cluster clients refuse MULTI (``transaction=True``) and
    # have no pub/sub: say so now rather than at the first dead letter.
    try:
        cluster.pipeline(transaction=True)
        cluster.pubsub  # noqa: B018 - an AttributeError where it is missing
    except (RedisClusterException, AttributeError):
        raise SettingsError(
            "REDIS_URL",
            f"redis+cluster:// needs a redis-py whose asyncio cluster client takes MULTI "
            f"and pub/sub (this is redis-py {redis.__version__}; tested with 8.1)",
        ) from None
    return typing.cast(aioredis.Redis, cluster)


def is_cluster(redis: Any) -> bool:
    """Whether ``redis`` is a Redis Cluster client (keys of one command, MULTI or script
    must then share a hash slot)."""
    return isinstance(redis, RedisCluster)


def slot_groups(redis: Any, keys: Iterable[str]) -> list[list[str]]:
    """``keys`` in groups that one command, MULTI or script may touch together: all of
    them for a single Redis, those of one hash slot each for a cluster (order kept)."""
    keys = list(keys)
    if not is_cluster(redis):
        return [keys] if keys else []
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(key_slot(key.encode()), []).append(key)
    return list(groups.values())


async def connect_redis(
    url: str, *, attempts: int = 5, socket_timeout: float = 5.0
) -> aioredis.Redis:
    """A client whose server answered PING; retried with backoff while it starts.

    ``redis+cluster://host:port`` connects to a Redis Cluster (see
    :func:`redis_client`)."""
    client = redis_client(
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
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError) as exc:
            # (RedisClusterException: no node of the cluster answered.)
            if attempt == attempts:
                await client.aclose()
                raise ServiceUnavailable("Redis", url, str(exc)) from exc
            log.debug("redis.retry", url=url, attempt=attempt, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")
