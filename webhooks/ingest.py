"""Accepting a decoded webhook: dedupe and XADD in one atomic step, with back-pressure."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from runtime.events.model import encode_body, event_type_of
from runtime.ops.tracing import current_traceparent
from runtime.streams.keys import KEY_PREFIX, dedupe_key, ingress_stream, partition_of
from webhooks.auth import TOLERANCE_SECONDS
from webhooks.config import IngressConfig
from webhooks.errors import Unauthorized, Unavailable
from webhooks.formats import Decoded

#: Ingress event ids are UUIDv5 of (source, delivery id) in this namespace, so a
#: redelivery gets the same id however late it comes (the log's idempotent
#: append absorbs one that slipped past the Redis window).
NAMESPACE = uuid.UUID("6f1b1d9e-3c51-4a0e-9a43-8f7c2a6de001")

#: A replay token (Mailgun's) stays bound to its delivery this long: longer than
#: the window in which its signed timestamp is accepted at all.
TOKEN_TTL_SECONDS = 2 * TOLERANCE_SECONDS + 60

# KEYS: stream, dedupe key.  ARGV: ttl ms, max backlog, event id, then fields.
# Returns {1, entry id} when appended, {0, event id} for a duplicate, {-1, len}
# when the stream is over its backlog limit. One script: concurrent identical
# deliveries cannot both append. Both keys carry the partition's hash tag, so
# under Redis Cluster they share a slot and the script may touch both.
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

# KEYS: one key.  ARGV: value, ttl ms.  Sets the key if it is absent and returns
# what it holds afterwards: the first writer's value wins and every later caller
# reads it (SET NX GET needs Redis 7; this works on 6.2 too).
_FIRST_WINS = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""


def replay_token_key(source: str, token: str) -> str:
    """The delivery a sender's one-time token (Mailgun's) is bound to."""
    return f"{KEY_PREFIX}mailgun-token:{source}:{token}"


def event_id_for(source: str, delivery_key: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"{source}\n{delivery_key}")


@dataclasses.dataclass(frozen=True)
class Accepted:
    event_id: uuid.UUID
    duplicate: bool
    stream: str
    entry_id: str | None


class Ingestor:
    """Writes accepted webhooks to the partitioned ingress streams.

    Dedupe is by event id (from the source and its delivery id) and is atomic
    with the append: the partition's dedupe key and its stream share a Redis
    Cluster slot, so one script checks, appends and marks. That key is per
    partition because the stream's slot is: a key every partition could find
    would sit in another slot, and no script (nor MULTI) may span two slots.

    So a redelivery that arrives after ``partitions`` or a source's
    ``partition_key`` changed, inside the dedupe window, lands in another
    partition and is appended again. That copy runs no step twice: the
    workers' activation claim and inbox absorb it (tested in
    ``tests/webhooks/test_ingest_redelivery.py``). Finding the first partition
    first would cost every webhook a second round trip (the ingress benchmark
    fell from 61% to 46% of its ceiling with it), for a case that only a
    reconfiguration creates.
    """

    def __init__(self, redis: aioredis.Redis, config: IngressConfig) -> None:
        self.redis = redis
        self.config = config
        self._script = redis.register_script(_INGEST)
        self._first_wins = redis.register_script(_FIRST_WINS)
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
        replay_token: str | None = None,
    ) -> Accepted:
        """Append one delivery (or find it was appended before) and say which.

        ``replay_token`` is a sender's one-time token (Mailgun's): it is bound
        to this delivery's event id, not consumed, so the sender's retry of the
        same delivery (after a 503, a crash, a lost response) is let through to
        the dedupe, which appends it or answers it as the duplicate it is, while
        the token on any other delivery is refused as a replay. Binding first
        and appending second needs no atomicity: binding is idempotent.
        """
        event_id = event_id_for(source, delivery_key)
        partition = partition_of(partition_key or str(event_id), self.config.partitions)
        try:
            if replay_token is not None:
                await self._bind_token(source, replay_token, event_id)
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
            traceparent = current_traceparent()
            if traceparent is not None:
                # The webhook's span: the worker's activation continues its trace.
                fields += ["traceparent", traceparent]
            status, value = await self._script(
                keys=[stream, dedupe_key(partition, str(event_id))],
                args=[self._ttl_ms, self.config.max_backlog, str(event_id), *fields],
            )
        except (RedisError, RedisClusterException, OSError) as exc:
            # (RedisClusterException: a Redis Cluster none of whose nodes answered,
            # or whose slots are not all covered.)
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

    async def _bind_token(self, source: str, token: str, event_id: uuid.UUID) -> None:
        held = await self._first_wins(
            keys=[replay_token_key(source, token)],
            args=[str(event_id), TOKEN_TTL_SECONDS * 1000],
        )
        if _text(held) != str(event_id):
            raise Unauthorized(
                "this Mailgun token was used before, for another delivery (replay)",
                code="token_replayed",
            )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
