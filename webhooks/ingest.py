"""Accepting a decoded webhook: dedupe and XADD in one atomic step, with back-pressure."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from runtime.events.model import encode_body, event_type_of
from runtime.streams.keys import dedupe_key, ingress_stream, partition_of
from webhooks.config import IngressConfig
from webhooks.errors import Unavailable
from webhooks.formats import Decoded

#: Ingress event ids are UUIDv5 of (source, delivery id) in this namespace, so a
#: redelivery gets the same id however late it comes (the log's idempotent
#: append absorbs one that slipped past the Redis window).
NAMESPACE = uuid.UUID("6f1b1d9e-3c51-4a0e-9a43-8f7c2a6de001")

# KEYS: stream, dedupe key.  ARGV: ttl ms, max backlog, event id, then fields.
# Returns {1, entry id} when appended, {0, event id} for a duplicate, {-1, len}
# when the stream is over its backlog limit. One script: concurrent identical
# deliveries cannot both append.
_INGEST = """
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local limit = tonumber(ARGV[2])
if limit > 0 then
  local len = redis.call('XLEN', KEYS[1])
  if len >= limit then return {-1, tostring(len)} end
end
local entry = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[1])
return {1, entry}
"""


def event_id_for(source: str, delivery_key: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"{source}\n{delivery_key}")


@dataclasses.dataclass(frozen=True)
class Accepted:
    event_id: uuid.UUID
    duplicate: bool
    stream: str
    entry_id: str | None


class Ingestor:
    """Writes accepted webhooks to the partitioned ingress streams."""

    def __init__(self, redis: aioredis.Redis, config: IngressConfig) -> None:
        self.redis = redis
        self.config = config
        self._script = redis.register_script(_INGEST)
        self._ttl_ms = int(config.dedupe_window_hours * 3600 * 1000)

    async def ingest(
        self,
        *,
        source: str,
        decoded: Decoded,
        delivery_key: str,
        partition_key: str,
        raw: bytes,
        content_type: str,
    ) -> Accepted:
        event_id = event_id_for(source, delivery_key)
        partition = partition_of(partition_key or str(event_id), self.config.partitions)
        stream = ingress_stream(partition)
        fields: list[bytes | str] = [
            "event_id", str(event_id),
            "type", event_type_of(decoded.body),
            "schema_version", str(type(decoded.body).__schema_version__),
            "source", source,
            "delivery", delivery_key,
            "received_at", datetime.now(UTC).isoformat(),
            "content_type", content_type,
            "body", encode_body(decoded.body),
            "raw", raw,
        ]  # fmt: skip
        try:
            status, value = await self._script(
                keys=[stream, dedupe_key(partition, str(event_id))],
                args=[self._ttl_ms, self.config.max_backlog, str(event_id), *fields],
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"the event store is unreachable ({type(exc).__name__}); nothing was accepted",
                code="redis_unavailable",
                retry_after=self.config.retry_after_seconds,
            ) from exc
        if status == -1:
            raise Unavailable(
                f"ingress backlog is full ({int(value)} entries waiting in partition "
                f"{partition}); retry later",
                code="backlog_full",
                retry_after=self.config.retry_after_seconds,
            )
        entry = value.decode() if isinstance(value, bytes) else str(value)
        if status == 0:
            return Accepted(uuid.UUID(entry), True, stream, None)
        return Accepted(event_id, False, stream, entry)
