"""Consumer-group housekeeping shared by workers: trimming acknowledged entries, lag."""

from __future__ import annotations

import redis.asyncio as aioredis

from runtime.ops import metrics
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
