"""The outbox relay: tails the log and publishes emitted events to their subscribers' streams.

It follows the log with the never-skipping reader (promise 4) and, for each
page, in ONE Redis MULTI: XADDs every deliverable event to the stream of each
agent subscribed to its type, schedules timers, and moves its checkpoint. So
a crash publishes a page whole or not at all; a page published twice (a
checkpoint lost with Redis's last second of AOF, say) is absorbed by the
agents' inbox rows. One relay runs at a time per name, under a lease in Redis.

Durable timers ride on the same path: ``timer.scheduled`` goes into a sorted
set; when it comes due, the relay appends ``timer.fired`` to the log (with an
id derived from the timer, so twice is once), and publishes it like any
other event, to the agent that set it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
import typing
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, WatchError

from runtime.agents.agent import Agent
from runtime.agents.loading import subscribers
from runtime.errors import LeaseLost
from runtime.events.builtin import BOOKKEEPING, TimerFired, TimerScheduled
from runtime.events.ids import run_stream, timers_stream
from runtime.events.model import START, LogPosition, NewEvent, RecordedEvent, encode_body
from runtime.log.store import EventLog
from runtime.ops import metrics
from runtime.streams.keys import KEY_PREFIX, agent_stream, log_wake_channel

log = structlog.get_logger(__name__)

TIMERS_KEY = f"{KEY_PREFIX}timers"
#: How long a stopping relay lets its publish and timer loops finish by themselves.
_STOP_GRACE = 10.0
_TIMER_NAMESPACE = uuid.UUID("a3f5e0b8-7c1d-4e2f-8b6a-9d0c1e2f3a4b")

# KEYS: lease. ARGV: token, ttl ms. Renew only a lease we hold.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class _Timer(msgspec.Struct, frozen=True):
    timer_id: uuid.UUID
    agent: str
    name: str
    due_at: datetime
    run_id: uuid.UUID | None
    causation_id: uuid.UUID
    payload: Any = None


class Relay:
    """Publishes log events to the streams of the agents subscribed to their types."""

    def __init__(
        self,
        log: EventLog,
        redis: aioredis.Redis,
        agents: Iterable[Agent] | Mapping[str, list[str]],
        *,
        name: str | None = None,
        batch: int = 500,
        poll_interval: float = 0.5,
        lease_seconds: float = 10.0,
        timer_interval: float = 0.2,
    ) -> None:
        self.log = log
        self.redis = redis
        self.routes: dict[str, list[str]] = (
            dict(agents) if isinstance(agents, Mapping) else subscribers(agents)
        )
        # One relay per set of routes: workers running different apps each
        # publish for their own agents, under their own lease and checkpoint.
        self.name = (
            name
            or "app-"
            + hashlib.sha256(msgspec.json.encode(self.routes, order="sorted")).hexdigest()[:12]
        )
        self.batch = batch
        self.poll_interval = poll_interval
        self.lease_ms = int(lease_seconds * 1000)
        self.timer_interval = timer_interval
        # Positions belong to one log (schema): the keys say which.
        self.checkpoint_key = f"{KEY_PREFIX}relay:{log.schema}:{self.name}:position"
        self.lease_key = f"{KEY_PREFIX}relay:{log.schema}:{self.name}:lease"
        self._token = secrets.token_hex(8)
        self._renew = redis.register_script(_RENEW)
        self.published = 0

    async def position(self) -> LogPosition:
        raw = await self.redis.get(self.checkpoint_key)
        if not raw:
            return START
        return LogPosition.parse(raw.decode() if isinstance(raw, bytes) else str(raw))

    def route(self, event: RecordedEvent) -> list[str]:
        """The agents this event goes to (none for bookkeeping and for ingress events)."""
        if event.event_type in BOOKKEEPING:
            return []
        if event.producer is not None and event.producer.startswith("ingress:"):
            return []  # it reached its agents through the ingress streams
        targets = self.routes.get(event.event_type, [])
        if isinstance(event.body, TimerFired):
            return [a for a in targets if a == event.body.agent]
        return targets

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set: wait for the lease, then follow the log."""
        while not stop.is_set():
            if await self.redis.set(self.lease_key, self._token, nx=True, px=self.lease_ms):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease_ms / 3000)
        if stop.is_set():
            return
        log.info("relay.started", name=self.name, routes=len(self.routes))
        # The publish and timer loops watch ``stop`` themselves; the lease loop is cancelled.
        graceful = [
            asyncio.create_task(self._publish_loop(stop)),
            asyncio.create_task(self._timer_loop(stop)),
        ]
        tasks = [*graceful, asyncio.create_task(self._lease_loop())]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            # Asked to stop, the publish and timer loops finish on their own,
            # between database calls: a query cancelled in flight makes asyncpg
            # reset its connection, and under load that release could hold up
            # the stop for good. The lease loop only sleeps and talks to Redis.
            running = [t for t in graceful if not t.done()]
            if stop.is_set() and running:
                await asyncio.wait(running, timeout=_STOP_GRACE)
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                if await self.redis.get(self.lease_key) == self._token.encode():
                    await self.redis.delete(self.lease_key)
            log.info("relay.stopped", name=self.name, published=self.published)

    async def serve(self, stop: asyncio.Event) -> None:
        """:meth:`run`, restarted after Redis or PostgreSQL errors and lost leases.

        A worker runs its relay this way, so a hiccup of the relay never
        stops the agents. Restarting is safe: it resumes at its checkpoint.
        """
        delay = 0.5
        while not stop.is_set():
            try:
                await self.run(stop)
                return
            except (LeaseLost, RedisError, OSError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:  # fmt: skip
                log.warning("relay.restarting", error=f"{type(exc).__name__}: {exc}",
                            retry_in=delay)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            if not await self._renew(keys=[self.lease_key], args=[self._token, self.lease_ms]):
                raise LeaseLost(f"relay {self.name!r} lost its lease to another relay")

    async def _publish_loop(self, stop: asyncio.Event) -> None:
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(wake))
        waker = asyncio.create_task(_set_on(stop, wake))
        pages = self.log.follow(await self.position(), batch=self.batch,
                                poll_interval=self.poll_interval, wake=wake, stop=stop)  # fmt: skip
        try:
            async for page in pages:
                await self.publish(page)
        finally:
            for task in (listener, waker):
                task.cancel()
            await asyncio.gather(listener, waker, return_exceptions=True)
            await pages.aclose()

    async def _listen(self, wake: asyncio.Event) -> None:
        """Wake the reader when a worker announces a commit (polling covers the rest:
        appends by other writers, a lost message, a Redis reconnect)."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(log_wake_channel(self.log.schema))
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            wake.set()
            except (RedisError, OSError) as exc:
                log.warning("relay.wake_listener_failed", error=str(exc))
                await asyncio.sleep(1.0)

    async def publish(self, page: list[RecordedEvent]) -> int:
        """Publish one page and move the checkpoint past it, atomically; entries added."""
        async with self.redis.pipeline(transaction=True) as pipe:
            # Fenced by the lease: a relay that stalled past it and was
            # replaced publishes nothing (EXEC fails if the lease changed).
            await pipe.watch(self.lease_key)
            if await pipe.get(self.lease_key) != self._token.encode():
                raise LeaseLost(f"relay {self.name!r} lost its lease to another relay")
            pipe.multi()  # type: ignore[no-untyped-call]
            relayed: list[str] = []
            for event in page:
                if isinstance(event.body, TimerScheduled):
                    self._schedule(pipe, event, event.body)
                for agent in self.route(event):
                    pipe.xadd(agent_stream(agent), _fields(event))
                    relayed.append(event.event_type)
            pipe.set(self.checkpoint_key, str(page[-1].log_position))
            try:
                await pipe.execute()
            except WatchError:
                raise LeaseLost(f"relay {self.name!r} lost its lease while publishing") from None
        for event_type in relayed:
            metrics.RELAYED.labels(event_type).inc()
        self.published += len(relayed)
        return len(relayed)

    @staticmethod
    def _schedule(pipe: Any, event: RecordedEvent, timer: TimerScheduled) -> None:
        member = msgspec.json.encode(
            _Timer(
                timer_id=timer.timer_id,
                agent=timer.agent,
                name=timer.name,
                due_at=timer.due_at,
                run_id=event.run_id,
                causation_id=event.event_id,
                payload=timer.payload,
            )
        )
        pipe.zadd(TIMERS_KEY, {member: timer.due_at.timestamp() * 1000})

    async def _timer_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.fire_due_timers()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.timer_interval)

    async def fire_due_timers(self, now: float | None = None) -> int:
        """Append ``timer.fired`` for every due timer (idempotently), then unschedule it."""
        now_ms = (time.time() if now is None else now) * 1000
        due = await self.redis.zrangebyscore(TIMERS_KEY, "-inf", now_ms, start=0, num=100)
        for member in typing.cast(list[bytes], due):
            timer = msgspec.json.decode(member, type=_Timer)
            fired = TimerFired(
                timer_id=timer.timer_id,
                agent=timer.agent,
                name=timer.name,
                due_at=timer.due_at,
                payload=timer.payload,
            )
            stream = run_stream(timer.run_id) if timer.run_id else timers_stream(timer.agent)
            await self.log.append(
                stream,
                [
                    NewEvent(
                        body=fired,
                        event_id=uuid.uuid5(_TIMER_NAMESPACE, str(timer.timer_id)),
                        run_id=timer.run_id,
                        causation_id=timer.causation_id,
                        producer="timers",
                    )
                ],
            )
            await self.redis.zrem(TIMERS_KEY, member)
            log.info("timer.fired", timer_id=str(timer.timer_id), agent=timer.agent)
        return len(due)


async def _set_on(stop: asyncio.Event, wake: asyncio.Event) -> None:
    await stop.wait()
    wake.set()


def _fields(event: RecordedEvent) -> dict[Any, Any]:
    return {
        "event_id": str(event.event_id),
        "type": event.event_type,
        "schema_version": str(event.schema_version),
        "body": encode_body(event.body),
        "run_id": str(event.run_id or event.event_id),
        "causation_id": str(event.causation_id or ""),
        "producer": event.producer or "",
        "recorded_at": event.recorded_at.astimezone(UTC).isoformat(),
        "stream_id": event.stream_id,
        "position": str(event.log_position),
    }
