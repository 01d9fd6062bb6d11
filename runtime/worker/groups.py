"""Consumer-group housekeeping shared by workers: trimming acknowledged entries, lag."""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis
from redis.crc import key_slot

from runtime.ops import metrics
from runtime.streams.keys import KEY_PREFIX, is_cluster
from runtime.worker.delivery import parse_id, text

# KEYS: stream. ARGV: group, consumer, entry ids. Reset the idle time of the
# entries this consumer still owns (XCLAIM JUSTID does not count a delivery);
# never take back one that another consumer reclaimed. Returns those lost.
RENEW_LEASES = """
local lost = {}
for i = 3, #ARGV do
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if p[1] then
        if p[1][2] == ARGV[2] then
            redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
        else
            table.insert(lost, ARGV[i])
        end
    end
end
return lost
"""


async def report_lag(redis: aioredis.Redis, stream: str) -> None:
    """Export each group's lag on ``stream`` (pending + not yet delivered)."""
    length = await redis.xlen(stream)
    for info in await redis.xinfo_groups(stream):
        name = text(info["name"])
        lag = info.get("lag")
        undelivered = int(lag) if lag is not None else None
        pending = int(info.get("pending", 0))
        if undelivered is None:  # a server without the lag field: bound it by the length
            undelivered = length
        metrics.CONSUMER_LAG.labels(name, stream).set(pending + undelivered)


async def trim_acknowledged(redis: aioredis.Redis, stream: str) -> int:
    """XTRIM ``stream`` below the oldest entry some group still needs; entries removed.

    For each group that is the first pending entry, or (none pending) the one
    after its last delivered; the stream keeps everything from the lowest of
    those. A stream without groups is left alone.
    """
    groups = await redis.xinfo_groups(stream)
    if not groups:
        return 0
    keep: tuple[int, int] | None = None
    for info in groups:
        name = text(info["name"])
        summary = await redis.xpending(stream, name)
        if summary and int(summary["pending"]):
            bound = parse_id(text(summary["min"]))
        else:
            ms, seq = parse_id(text(info["last-delivered-id"]))
            bound = (ms, seq + 1)
        keep = bound if keep is None or bound < keep else keep
    assert keep is not None
    if keep <= (0, 1):
        return 0
    removed = await redis.xtrim(stream, minid=f"{keep[0]}-{keep[1]}", approximate=False)
    return int(removed)


# -- who subscribes to what (rolling deploys) -------------------------------------
#
# Two versions of an agent can share its consumer group during a deploy, and a
# group hands each entry to one consumer only: an old worker that acknowledged
# a type only the new version subscribes to would drop it. Each worker
# announces the types it handles under its consumer name, with an expiry. A
# worker given an entry whose type it does not handle, but a live member of
# its group does, hands it over: XCLAIM to that consumer (JUSTID: not counted
# as a delivery) and a note in the consumer's hand-off set, in one MULTI (on a
# Redis Cluster, one after the other when they are in different slots). The
# consumer adopts what the note names from its own pending list. If it dies
# first, the entry is reclaimed like any other after ``claim_idle``.


def subscriptions_key(agent: str) -> str:
    return f"{KEY_PREFIX}subs:{{{agent}}}"


def subscriptions_rev_key(agent: str) -> str:
    """Bumped whenever a consumer announces itself or leaves: readers refresh on a change."""
    return f"{KEY_PREFIX}subs-rev:{{{agent}}}"


def handoff_key(agent: str, consumer: str) -> str:
    """The streams on which ``consumer`` was handed entries it has not adopted yet."""
    return f"{KEY_PREFIX}handoff:{{{agent}}}:{consumer}"


async def announce(
    redis: aioredis.Redis, agent: str, consumer: str, types: frozenset[str], ttl: float
) -> None:
    """Record that ``consumer`` handles ``types`` for the next ``ttl`` seconds."""
    value = msgspec.json.encode({"types": sorted(types), "until": time.time() + ttl})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(subscriptions_key(agent), consumer, value)
        pipe.incr(subscriptions_rev_key(agent))
        await pipe.execute()


async def withdraw(redis: aioredis.Redis, agent: str, consumer: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(subscriptions_key(agent), consumer)
        pipe.incr(subscriptions_rev_key(agent))
        await pipe.execute()


async def live_subscriptions(redis: aioredis.Redis, agent: str) -> dict[str, frozenset[str]]:
    """Live consumers of ``agent``'s group -> the types each handles (expired ones removed)."""
    raw = await redis.hgetall(subscriptions_key(agent))
    now = time.time()
    live: dict[str, frozenset[str]] = {}
    expired = []
    for consumer, value in raw.items():
        try:
            entry = msgspec.json.decode(value)
            until, types = float(entry["until"]), entry["types"]
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            expired.append(consumer)
            continue
        if until < now:
            expired.append(consumer)
        else:
            live[text(consumer)] = frozenset(str(t) for t in types)
    if expired:
        await redis.hdel(subscriptions_key(agent), *expired)
    return live


async def hand_over(
    redis: aioredis.Redis, agent: str, stream: str, entry_id: str, consumer: str
) -> bool:
    """Give the pending entry to ``consumer`` and note it in its hand-off set; False if
    the entry is gone (deleted from the stream meanwhile)."""
    if is_cluster(redis) and key_slot(stream.encode()) != key_slot(
        handoff_key(agent, consumer).encode()
    ):
        # An ingress partition's stream and the agent's hand-off set are in
        # different slots of a Redis Cluster: no MULTI. Claim, then note: the
        # consumer never looks for an entry before it is its own, and a crash in
        # between leaves the entry pending on it unnoted, idle, so it is
        # reclaimed after ``claim_idle`` like any other (nothing lost).
        claimed = await redis.xclaim(stream, agent, consumer, 0, [entry_id], justid=True)
        if claimed:
            await redis.sadd(handoff_key(agent, consumer), stream)
        return bool(claimed)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xclaim(stream, agent, consumer, 0, [entry_id], justid=True)
        pipe.sadd(handoff_key(agent, consumer), stream)
        claimed, _ = await pipe.execute()
    return bool(claimed)
