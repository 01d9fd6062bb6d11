"""Whether the Redis behind the streams keeps what it acknowledged: AOF on, fsync on every write.

Promise 1 ("202 means kept") holds only if an XADD that Redis acknowledged
survives a crash of the Redis host, which takes ``appendonly yes`` and
``appendfsync always``. The embedded server runs that way; an external
``REDIS_URL`` may not, so ``agentrt serve`` and ``agentrt worker`` check it at
start (``CONFIG GET``), warn when it does not hold, and refuse to start when
``require_durable_redis`` is set. Managed services often refuse ``CONFIG``:
then the answer is "could not verify", which counts as not durable.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from runtime.errors import RedisNotDurable
from runtime.settings import Settings
from runtime.streams.keys import is_cluster

__all__ = ["RedisDurability", "check_redis_durability", "ensure_durable_redis"]

log = structlog.get_logger(__name__)

_RISKS = {
    "appendonly": "acknowledged writes live in memory only (until an RDB snapshot, if any): "
    "a Redis restart or crash loses webhooks already answered 202",
    "everysec": "about the last second of acknowledged writes is lost if the Redis host "
    "crashes or loses power: webhooks already answered 202 can vanish",
    "no": "the operating system decides when writes reach the disk: seconds of acknowledged "
    "writes (webhooks already answered 202) can be lost if the Redis host crashes",
    "unverified": "whether webhooks answered 202 survive a Redis crash is unknown",
}


class RedisDurability(msgspec.Struct, frozen=True, kw_only=True):
    """What the server said about its persistence, and whether that keeps every acknowledged write.

    ``appendonly`` / ``appendfsync`` are the server's values (None when it would
    not say); ``verified`` is False when ``CONFIG GET`` was refused, and then
    ``durable`` is False too; ``problem`` says what is wrong, or None.
    """

    appendonly: str | None
    appendfsync: str | None
    durable: bool
    verified: bool
    problem: str | None = None
    risk: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The ``/readyz`` field."""
        return {
            "appendonly": self.appendonly,
            "appendfsync": self.appendfsync,
            "durable": self.durable,
            "verified": self.verified,
            **({"problem": self.problem} if self.problem else {}),
        }


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


async def check_redis_durability(redis: aioredis.Redis, **node: Any) -> RedisDurability:
    """Ask the server (``CONFIG GET append*``; ``INFO persistence`` if CONFIG is refused).

    A refused CONFIG (disabled or renamed by a managed service, or an ACL
    without ``+config``) gives an unverified, not durable answer; connection
    errors propagate, as anything else that cannot reach Redis would.

    On a Redis Cluster every master is asked (``node``: the one asked, as
    ``target_nodes``); the answer is the first that is not durable, its
    problem naming the node.
    """
    if is_cluster(redis) and not node:
        cluster = typing.cast(Any, redis)
        await cluster.initialize()  # learns the nodes (once; a no-op after)
        answers = []
        for primary in cluster.get_primaries():
            found = await check_redis_durability(redis, target_nodes=primary)
            if not found.durable:
                return msgspec.structs.replace(found, problem=f"{primary.name}: {found.problem}")
            answers.append(found)
        return answers[0]
    try:
        raw = await redis.config_get("append*", **node)
    except ResponseError as exc:
        appendonly: str | None = None
        try:  # INFO is usually allowed: it tells AOF on/off, not the fsync policy.
            info = await redis.info("persistence", **node)
            if "aof_enabled" in info:
                appendonly = "yes" if str(info["aof_enabled"]) == "1" else "no"
        except ResponseError:
            pass
        return RedisDurability(
            appendonly=appendonly,
            appendfsync=None,
            durable=False,
            verified=False,
            problem=f"could not verify: the server refused CONFIG GET ({exc})",
            risk=_RISKS["appendonly" if appendonly == "no" else "unverified"],
        )
    config = {_text(k): _text(v) for k, v in raw.items()}
    appendonly, appendfsync = config.get("appendonly"), config.get("appendfsync")
    if appendonly != "yes":
        problem = f"appendonly is {appendonly!r}, not 'yes'"
        risk = _RISKS["appendonly"]
    elif appendfsync != "always":
        problem = f"appendfsync is {appendfsync!r}, not 'always'"
        risk = _RISKS.get(appendfsync or "", _RISKS["no"])
    else:
        return RedisDurability(
            appendonly=appendonly, appendfsync=appendfsync, durable=True, verified=True
        )
    return RedisDurability(
        appendonly=appendonly,
        appendfsync=appendfsync,
        durable=False,
        verified=True,
        problem=problem,
        risk=risk,
    )


async def ensure_durable_redis(
    redis: aioredis.Redis, settings: Settings, *, component: str
) -> RedisDurability:
    """Check at start: a structured warning when not durable, and with
    ``require_durable_redis`` set, :class:`RedisNotDurable` instead."""
    found = await check_redis_durability(redis)
    if found.durable:
        return found
    if settings.require_durable_redis:
        raise RedisNotDurable(component, found.problem or "not durable", found.risk or "")
    log.warning(
        "redis.not_durable",
        component=component,
        appendonly=found.appendonly,
        appendfsync=found.appendfsync,
        verified=found.verified,
        problem=found.problem,
        risk=found.risk,
        hint="run Redis with appendonly yes and appendfsync always; set "
        "AGENTRT_REQUIRE_DURABLE_REDIS=1 to refuse to start on anything less",
    )
    return found
