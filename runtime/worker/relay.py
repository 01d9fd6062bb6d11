"""The outbox relay: tails the log and publishes emitted events to their subscribers' streams.

It follows the log with the never-skipping reader (promise 4) and, for each
page, in ONE Redis MULTI: XADDs every deliverable event to the stream of each
agent subscribed to its type, schedules timers, and moves its checkpoint. So
a crash publishes a page whole or not at all; a page published twice (a
checkpoint lost with Redis's last second of AOF, say) is absorbed by the
agents' inbox rows. One relay runs at a time per name, under a lease in Redis.
(On a Redis Cluster the streams are in other slots than the checkpoint: the
entries go first, then the checkpoint, see ``Relay._publish_split``.)

Its name (``AGENTRT_RELAY_NAME``, ``default``) belongs to the deployment, not
to its routes: adding an agent or a subscription keeps the checkpoint. Beside
the checkpoint, a hash remembers every subscription (agent, event type) and
how far it has been served: ``live`` (up to the checkpoint), or a position
(up to there, not beyond). A relay that does not hold the lease enters its
new subscriptions at the current checkpoint; the relay that takes the lease
first sends each of its subscriptions that is behind the events it missed
(to that agent's stream only), marks them live, pauses the live ones it does
not route itself (an older version of the app holding the lease during a
rolling deploy), then follows the log. So two versions of an app publish
every event once to each subscriber, whichever holds the lease, and a new
subscription starts at the current position unless asked to backfill from
the start of the log.

The checkpoint is a :class:`~runtime.events.model.Cursor` (position and event
id), and the relay keeps older cursors beside it (one a second at most, the
last 64): on taking the lease it resumes at the newest one whose event is
still in place, so a PostgreSQL that lost its last commits (and reuses their
transaction ids) makes it publish a few events again, never skip new ones.

Durable timers ride on the same path: ``timer.scheduled`` goes into a sorted
set; when it comes due, the relay appends ``timer.fired`` to the log (with an
id derived from the timer, so twice is once), and publishes it like any
other event, to the agent that set it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
import typing
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, WatchError

from runtime.agents.agent import Agent
from runtime.agents.filters import Filters, accepts, describe
from runtime.agents.loading import subscribers
from runtime.errors import ApprovalNotFound, LeaseLost, SettingsError
from runtime.events.builtin import (
    APPROVAL_DEADLINE,
    BOOKKEEPING,
    TimerCancelled,
    TimerFired,
    TimerScheduled,
    addressed_to,
)
from runtime.events.ids import run_stream, timers_stream
from runtime.events.model import (
    START,
    START_CURSOR,
    Cursor,
    LogPosition,
    NewEvent,
    RecordedEvent,
    encode_body,
)
from runtime.log import approvals
from runtime.log.store import EventLog
from runtime.ops import metrics
from runtime.streams.keys import KEY_PREFIX, agent_stream, is_cluster, log_wake_channel
from runtime.worker.claims import RELEASE_HELD, RENEW_HELD

log = structlog.get_logger(__name__)

TIMERS_KEY = f"{KEY_PREFIX}timers"
#: Ids of scheduled timers cancelled (``timer.cancelled``): skipped when they come due.
CANCELLED_KEY = f"{KEY_PREFIX}timers:cancelled"
#: How long a stopping relay lets its publish and timer loops finish by themselves.
_STOP_GRACE = 10.0
_TIMER_NAMESPACE = uuid.UUID("a3f5e0b8-7c1d-4e2f-8b6a-9d0c1e2f3a4b")

#: A subscription served up to the checkpoint (see the module's docstring).
LIVE = "live"
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

# KEYS: checkpoint, subscriptions, legacy checkpoint. ARGV: backfill (1/0),
# subscription fields. Enter subscriptions this relay name has not seen yet, at
# the checkpoint (or the start of the log, for a backfill); a relay name with
# no checkpoint first adopts the one its routes had when relays were named
# after them (not on a Redis Cluster, where that key is in another slot; no
# cluster deployment predates the names).
_JOIN = """
local at = redis.call('GET', KEYS[1])
if not at and KEYS[3] then
    at = redis.call('GET', KEYS[3])
    if at then redis.call('SET', KEYS[1], at) end
end
if ARGV[1] == '1' or not at then at = '0:0' end
local added = 0
for i = 2, #ARGV do
    added = added + redis.call('HSETNX', KEYS[2], ARGV[i], at)
end
return added
"""


class _Timer(msgspec.Struct, frozen=True):
    timer_id: uuid.UUID
    agent: str
    name: str
    due_at: datetime
    run_id: uuid.UUID | None
    causation_id: uuid.UUID
    payload: Any = None
    #: The ``timer.scheduled`` event's trace: the ``timer.fired`` continues it.
    trace: str | None = None


class Relay:
    """Publishes log events to the streams of the agents subscribed to their types."""

    def __init__(
        self,
        log: EventLog,
        redis: aioredis.Redis,
        agents: Iterable[Agent] | Mapping[str, list[str]],
        *,
        name: str = "default",
        backfill: bool = False,
        batch: int = 500,
        poll_interval: float = 0.5,
        lease_seconds: float = 10.0,
        timer_interval: float = 0.2,
        anchor_interval: float = 1.0,
        anchors: int = 64,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise SettingsError(
                "relay name", f"{name!r}: use 1-100 letters, digits, '_', '.', ':' or '-'"
            )
        self.log = log
        self.redis = redis
        self.routes: dict[str, list[str]] = (
            dict(agents) if isinstance(agents, Mapping) else subscribers(agents)
        )
        #: Agent -> its event filters (agents with any): an event goes to those it passes.
        self.filters: dict[str, Filters] = (
            {} if isinstance(agents, Mapping) else {a.name: f for a in agents if (f := a.filters())}
        )
        #: The deployment's relay: its lease and checkpoint survive changes of routes.
        self.name = name
        #: Whether subscriptions this name has not seen get the log from its start.
        self.backfill = backfill
        self.batch = batch
        self.poll_interval = poll_interval
        self.lease_ms = int(lease_seconds * 1000)
        self.timer_interval = timer_interval
        self.anchor_interval = anchor_interval
        self.anchors = anchors
        #: A Redis Cluster client: the subscribers' streams are in other slots than
        #: the relay's own keys, so a page is published in two steps (:meth:`publish`).
        self._cluster = is_cluster(redis)
        # Positions belong to one log (schema): the keys say which. On a Redis
        # Cluster they share a hash tag, so the fenced MULTIs (WATCH the lease,
        # write the checkpoint and the subscriptions) stay in one slot. (A
        # single Redis keeps the names it always had.)
        scope = f"{log.schema}:{self.name}"
        base = f"{KEY_PREFIX}relay:{{{scope}}}" if self._cluster else f"{KEY_PREFIX}relay:{scope}"
        self.checkpoint_key = f"{base}:position"
        self.lease_key = f"{base}:lease"
        #: Older checkpoints, newest first, to rewind to if the log lost the last.
        self.anchors_key = f"{base}:anchors"
        #: Subscription ("agent event.type") -> LIVE, or the position served up to.
        self.subscriptions_key = f"{base}:subscriptions"
        # Relays used to be named after a hash of their routes: the checkpoint
        # of these routes under that name is adopted by a name that has none.
        legacy = hashlib.sha256(msgspec.json.encode(self.routes, order="sorted")).hexdigest()
        self._legacy_checkpoint_key = f"{KEY_PREFIX}relay:{log.schema}:app-{legacy[:12]}:position"
        self._token = secrets.token_hex(8)
        self._renew = redis.register_script(RENEW_HELD)
        self._release = redis.register_script(RELEASE_HELD)
        self._join = redis.register_script(_JOIN)
        self._next_anchor = 0.0
        self.published = 0

    def subscriptions(self) -> list[str]:
        """This relay's subscriptions, as the fields of its subscriptions hash."""
        return sorted({_field(a, t) for t, agents in self.routes.items() for a in agents})

    async def checkpoint(self) -> Cursor:
        """Where the relay resumes (before it is checked against the log)."""
        raw = await self.redis.get(self.checkpoint_key)
        if not raw:
            return START_CURSOR
        return Cursor.parse(_text(raw))

    async def position(self) -> LogPosition:
        return (await self.checkpoint()).position

    async def join(self) -> int:
        """Enter this relay's subscriptions that its name has not seen; how many were new.

        They join at the current checkpoint (events before it are not theirs),
        or at the start of the log with ``backfill``. A relay calls this as it
        starts, before it waits for the lease: while another relay holds it
        (an older version of the app, in a rolling deploy), the events of a
        new subscription are not published, and this position is where the
        relay that has it starts them when it takes the lease.
        """
        fields = self.subscriptions()
        if not fields:
            return 0
        keys = [self.checkpoint_key, self.subscriptions_key]
        if not self._cluster:
            keys.append(self._legacy_checkpoint_key)
        return int(await self._join(keys=keys, args=["1" if self.backfill else "0", *fields]))

    async def release(self) -> bool:
        """Give the lease up if this relay holds it (atomically); whether it did."""
        return bool(await self._release(keys=[self.lease_key], args=[self._token]))

    def route(self, event: RecordedEvent) -> list[str]:
        """The agents this event goes to (none for bookkeeping and for ingress events): its
        type's subscribers, those with filters only if it passes them."""
        if event.event_type in BOOKKEEPING:
            return []
        if event.producer is not None and event.producer.startswith("ingress:"):
            return []  # it reached its agents through the ingress streams
        targets = self.routes.get(event.event_type, [])
        addressee = addressed_to(event.body)
        if addressee is not None:
            return [a for a in targets if a == addressee]
        if self.filters:
            return [a for a in targets
                    if a not in self.filters or accepts(self.filters[a], event.event_type,
                                                        event.body)]  # fmt: skip
        return targets

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set: wait for the lease, then follow the log."""
        await self.join()
        while not stop.is_set():
            if await self.redis.set(self.lease_key, self._token, nx=True, px=self.lease_ms):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease_ms / 3000)
        if stop.is_set():
            return
        log.info("relay.started", name=self.name, routes=len(self.routes),
                 filters={a: describe(f) for a, f in sorted(self.filters.items())})  # fmt: skip
        # The publish and timer loops watch ``stop`` themselves; the lease loop
        # renews until they are done (``letting_go``), then ends by itself too.
        graceful = [
            asyncio.create_task(self._publish_loop(stop)),
            asyncio.create_task(self._timer_loop(stop)),
        ]
        letting_go = asyncio.Event()
        tasks = [*graceful, asyncio.create_task(self._lease_loop(letting_go))]
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
            # the stop for good. The lease loop is not cancelled either: a
            # cancellation landing in its Redis call could be swallowed by the
            # client (seen under load: the loop kept renewing, the stop hung).
            running = [t for t in graceful if not t.done()]
            if stop.is_set() and running:
                await asyncio.wait(running, timeout=_STOP_GRACE)
            letting_go.set()
            await asyncio.wait([tasks[-1]], timeout=_STOP_GRACE)
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self.release()
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

    async def _lease_loop(self, letting_go: asyncio.Event) -> None:
        """Renew the lease every third of its time to live, until ``letting_go`` is set."""
        while not letting_go.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(letting_go.wait(), self.lease_ms / 3000)
            if letting_go.is_set():
                return
            if await self._renew(keys=[self.lease_key], args=[self.lease_ms, self._token]):
                raise LeaseLost(f"relay {self.name!r} lost its lease to another relay")

    async def _publish_loop(self, stop: asyncio.Event) -> None:
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(wake))
        waker = asyncio.create_task(_set_on(stop, wake))
        try:
            start = await self.take_over(stop)
            if stop.is_set():
                return
            pages = self.log.follow(start, batch=self.batch, poll_interval=self.poll_interval,
                                    wake=wake, stop=stop)  # fmt: skip
            try:
                async for page in pages:
                    await self.publish(page)
            finally:
                await pages.aclose()
        finally:
            for task in (listener, waker):
                task.cancel()
            await asyncio.gather(listener, waker, return_exceptions=True)

    async def take_over(self, stop: asyncio.Event | None = None) -> LogPosition:
        """As the lease's new holder: find where to resume, and bring subscriptions up to it.

        The checkpoint is resumed only if its event is still where it was read
        (else the newest older cursor that is: see the module's docstring).
        Subscriptions of this relay that are behind get what they missed, on
        their own streams; live ones it does not route are paused at the
        checkpoint for a relay that does. Returns the position to follow from.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.checkpoint_key)
            pipe.lrange(self.anchors_key, 0, -1)
            pipe.hgetall(self.subscriptions_key)
            raw, anchors, subs = await pipe.execute()
        saved = Cursor.parse(_text(raw)) if raw else START_CURSOR
        resumed = saved
        if saved != START_CURSOR:
            resumed = await self.log.confirm([saved, *(Cursor.parse(_text(a)) for a in anchors)])
            if resumed != saved:
                log.warning("relay.rewound", name=self.name, checkpoint=str(saved),
                            to=str(resumed), reason="the log no longer holds the "
                            "checkpoint's event (it lost its last commits)")  # fmt: skip
        start = resumed.position
        served = {_text(k): _text(v) for k, v in subs.items()}
        mine = set(self.subscriptions())
        updates: dict[Any, Any] = {}
        behind: dict[str, LogPosition] = {}
        for field, value in served.items():
            if field in mine:
                continue
            if value == LIVE or Cursor.parse(value).position > start:
                updates[field] = str(start)  # paused here, for a relay that routes it
        for field in mine:
            state = served.get(field)
            if state == LIVE:
                continue
            since = (START if self.backfill else start) if state is None else (
                Cursor.parse(state).position)  # fmt: skip
            if since < start:
                behind[field] = since
                if state is None:
                    updates[field] = str(since)
            else:
                updates[field] = LIVE
        if paused := sorted(f for f in updates if f not in mine and served[f] == LIVE):
            # An older version of the app holds the lease now, or another app
            # shares this relay name (give each app its own AGENTRT_RELAY_NAME).
            log.warning("relay.subscriptions_paused", name=self.name, at=str(start),
                        subscriptions=paused)  # fmt: skip
        await self._fenced(updates, None if resumed == saved else resumed)
        if behind:
            await self._backfill(behind, start, stop)
        return start

    async def _fenced(self, updates: dict[Any, Any], checkpoint: Cursor | None) -> None:
        """Write subscription states (and a rewound checkpoint) while holding the lease."""
        if not updates and checkpoint is None:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._fence(pipe)
            if updates:
                pipe.hset(self.subscriptions_key, mapping=updates)
            if checkpoint is not None:
                pipe.set(self.checkpoint_key, str(checkpoint))
            try:
                await pipe.execute()
            except WatchError:
                raise LeaseLost(f"relay {self.name!r} lost its lease") from None

    async def _backfill(
        self, behind: dict[str, LogPosition], upto: LogPosition, stop: asyncio.Event | None
    ) -> None:
        """Publish to each subscription in ``behind`` its events after its position, up to
        ``upto`` (the checkpoint), on its agent's stream only; then mark them live.

        Page by page, each in one fenced MULTI with the subscriptions' progress,
        so a relay stopped halfway resumes where it was.
        """
        log.info("relay.backfilling", name=self.name, upto=str(upto),
                 subscriptions={f: str(p) for f, p in behind.items()})  # fmt: skip
        position = min(behind.values())
        sent = 0
        while stop is None or not stop.is_set():
            page = [e for e in await self.log.read_all(position, self.batch)
                    if e.log_position <= upto]  # fmt: skip
            if not page:
                break
            last = page[-1].log_position
            entries = [
                (agent_stream(agent), _fields(event))
                for event in page
                for agent in self.route(event)
                if (since := behind.get(_field(agent, event.event_type))) is not None
                and event.log_position > since
            ]
            if self._cluster:
                # The agents' streams are in other slots: entries first, then the
                # progress (see _publish_split for why that order is safe).
                await self._check_lease()
                await self._add_entries(entries, [])
            async with self.redis.pipeline(transaction=True) as pipe:
                await self._fence(pipe)
                if not self._cluster:
                    for stream, fields in entries:
                        pipe.xadd(stream, fields)
                sent += len(entries)
                progress: dict[Any, Any] = {
                    f: str(last) for f, since in behind.items() if since < last
                }
                if progress:
                    pipe.hset(self.subscriptions_key, mapping=progress)
                try:
                    await pipe.execute()
                except WatchError:
                    raise LeaseLost(
                        f"relay {self.name!r} lost its lease while publishing"
                    ) from None
            behind = {f: max(since, last) for f, since in behind.items()}
            position = last
            if last >= upto:
                break
        else:
            return  # asked to stop: the next holder goes on from the progress saved
        await self._fenced(dict.fromkeys(behind, LIVE), None)
        self.published += sent
        log.info("relay.backfilled", name=self.name, published=sent)

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
        if self._cluster:
            return await self._publish_split(page)
        async with self.redis.pipeline(transaction=True) as pipe:
            # Fenced by the lease: a relay that stalled past it and was
            # replaced publishes nothing (EXEC fails if the lease changed).
            await self._fence(pipe)
            relayed: list[str] = []
            for event in page:
                if isinstance(event.body, TimerScheduled):
                    self._schedule(pipe, event, event.body)
                elif isinstance(event.body, TimerCancelled):
                    pipe.sadd(CANCELLED_KEY, str(event.body.timer_id))
                for agent in self.route(event):
                    pipe.xadd(agent_stream(agent), _fields(event))
                    relayed.append(event.event_type)
            await self._move_checkpoint(pipe, page[-1])
        for event_type in relayed:
            metrics.RELAYED.labels(event_type).inc()
        self.published += len(relayed)
        return len(relayed)

    async def _publish_split(self, page: list[RecordedEvent]) -> int:
        """:meth:`publish` on a Redis Cluster: the page's entries, then the checkpoint.

        The subscribers' streams and the timers are in other slots than the
        checkpoint, and no MULTI spans two slots. So the entries and the timers
        are written first (a pipeline, a round trip per node), and only then is
        the checkpoint moved, in a MULTI of the relay's own slot fenced by the
        lease. A crash or a lost lease between the two publishes the page again
        from the checkpoint: the same events again, which the agents' inbox rows
        and activation claims absorb (run once, committed once), and the same
        timer members (ZADD of a member already there changes nothing). No event
        is skipped: the checkpoint never passes an entry not yet written.
        """
        await self._check_lease()
        entries = [(agent_stream(a), _fields(e)) for e in page for a in self.route(e)]
        timers = [(e, e.body) for e in page if isinstance(e.body, TimerScheduled)]
        cancelled = [e.body.timer_id for e in page if isinstance(e.body, TimerCancelled)]
        await self._add_entries(entries, timers, cancelled)
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._fence(pipe)
            await self._move_checkpoint(pipe, page[-1])
        for _, fields in entries:
            metrics.RELAYED.labels(fields["type"]).inc()
        self.published += len(entries)
        return len(entries)

    async def _fence(self, pipe: Any) -> None:
        """Start ``pipe``'s MULTI fenced by the lease: WATCH it, check it is this relay's
        (else :class:`LeaseLost`); EXEC then fails if another relay took it meanwhile."""
        await pipe.watch(self.lease_key)
        if await pipe.get(self.lease_key) != self._token.encode():
            raise LeaseLost(f"relay {self.name!r} lost its lease to another relay")
        pipe.multi()

    async def _move_checkpoint(self, pipe: Any, last: RecordedEvent) -> None:
        """Past ``last``, in the fenced MULTI ``pipe`` (executed here): the checkpoint, and
        now and then an anchor (older cursors to rewind to, should the log lose the last
        ones)."""
        cursor = str(Cursor.of(last))
        pipe.set(self.checkpoint_key, cursor)
        now = time.monotonic()
        anchored = now >= self._next_anchor
        if anchored:
            pipe.lpush(self.anchors_key, cursor)
            pipe.ltrim(self.anchors_key, 0, self.anchors - 1)
        try:
            await pipe.execute()
        except WatchError:
            raise LeaseLost(f"relay {self.name!r} lost its lease while publishing") from None
        if anchored:
            self._next_anchor = now + self.anchor_interval

    async def _check_lease(self) -> None:
        """Raise :class:`LeaseLost` unless this relay holds the lease (before unfenced
        writes: a relay replaced meanwhile then writes nothing, in the common case)."""
        if await self.redis.get(self.lease_key) != self._token.encode():
            raise LeaseLost(f"relay {self.name!r} lost its lease to another relay")

    async def _add_entries(
        self,
        entries: list[tuple[str, dict[Any, Any]]],
        timers: list[tuple[RecordedEvent, TimerScheduled]],
        cancelled: Sequence[uuid.UUID] = (),
    ) -> None:
        """XADD ``entries``, schedule ``timers`` and mark ``cancelled`` timers in one
        pipeline (not a MULTI: on a cluster it spans slots); raises if any failed."""
        if not entries and not timers and not cancelled:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, fields in entries:
                pipe.xadd(stream, fields)
            for event, timer in timers:
                self._schedule(pipe, event, timer)
            if cancelled:
                pipe.sadd(CANCELLED_KEY, *(str(t) for t in cancelled))
            await pipe.execute()

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
                trace=event.trace,
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
        due = typing.cast(
            list[bytes],
            await self.redis.zrangebyscore(TIMERS_KEY, "-inf", now_ms, start=0, num=100),
        )
        timers = [msgspec.json.decode(m, type=_Timer) for m in due]
        dropped = (
            await self.redis.smismember(CANCELLED_KEY, [str(t.timer_id) for t in timers])
            if timers
            else []
        )
        for member, timer, gone in zip(due, timers, dropped, strict=True):
            if gone:  # cancelled before it came due: it does not fire
                await self.redis.zrem(TIMERS_KEY, member)
                await self.redis.srem(CANCELLED_KEY, str(timer.timer_id))
                log.info("timer.cancelled", timer_id=str(timer.timer_id), agent=timer.agent)
                continue
            if timer.name == APPROVAL_DEADLINE:
                await self._approval_deadline(timer)
                await self.redis.zrem(TIMERS_KEY, member)
                continue
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
                        trace=timer.trace,
                    )
                ],
            )
            await self.redis.zrem(TIMERS_KEY, member)
            log.info("timer.fired", timer_id=str(timer.timer_id), agent=timer.agent)
        return len(due)

    async def _approval_deadline(self, timer: _Timer) -> None:
        """An approval's deadline: its default applies, unless someone decided first."""
        raw = (timer.payload or {}).get("approval_id") if isinstance(timer.payload, dict) else None
        try:
            approval_id = uuid.UUID(str(raw))
        except ValueError:
            log.error("approval.deadline_without_id", timer_id=str(timer.timer_id))
            return
        try:
            outcome = await approvals.apply_deadline(self.log, approval_id,
                                                     fired_by=timer.causation_id)  # fmt: skip
        except ApprovalNotFound:
            log.error("approval.deadline_unknown", approval_id=str(approval_id))
            return
        log.info("approval.deadline", approval_id=str(approval_id), outcome=outcome)


async def _set_on(stop: asyncio.Event, wake: asyncio.Event) -> None:
    await stop.wait()
    wake.set()


def _field(agent: str, event_type: str) -> str:
    """A subscription as a field of the subscriptions hash (agent names have no spaces)."""
    return f"{agent} {event_type}"


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


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
        # The span that produced it: the subscriber's activation continues its trace.
        **({"traceparent": event.trace} if event.trace else {}),
    }
