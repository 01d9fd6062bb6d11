"""Workers: agents in Redis consumer groups; one Postgres transaction per activation, then XACK.

The order of an activation (DESIGN.md, promise 2):

1. read an entry (XREADGROUP, or XAUTOCLAIM for one a dead consumer left);
2. if the inbox holds (agent, event id), the event was handled: XACK, done;
3. run the handler: LLM and tool calls are durable steps, recorded as they
   happen (promise 3); emitted events are buffered;
4. ONE transaction: the trigger event (if the log lacks it), the emitted
   events, ``activation.completed``, and the inbox row (agent, event id);
5. XACK, only after that commit.

A crash before 4 leaves the entry pending: it is reclaimed and the retried
handler gets its recorded steps back. A crash between 4 and 5 leaves it
pending too: the retry finds the inbox row and only acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
import time
import typing
import uuid
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis
import structlog
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, StatusCode
from redis.exceptions import ClusterError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runtime.agents.agent import Agent
from runtime.agents.context import FROM_START, Trigger, activation_id_for, transition_event
from runtime.agents.filters import Filters, accepts
from runtime.effects.breaker import CircuitBreaker, Transition
from runtime.effects.steps import Steps
from runtime.errors import (
    AgentrtError,
    ClaimLost,
    EventDecodeError,
    HandlerTimeout,
    InvalidDelivery,
    StepDivergence,
    StepFailed,
    UnknownEventType,
)
from runtime.events.ids import activation_stream, circuit_stream
from runtime.events.model import Event, NewEvent, RecordedEvent
from runtime.log.group import GroupWriter, MarkedAppends
from runtime.log.queries import LogQueries
from runtime.log.snapshots import SnapshotStore
from runtime.log.store import EventLog
from runtime.ops import metrics
from runtime.ops.tracing import current_traceparent, parent_from, span, traceparent_in
from runtime.streams.keys import (
    agent_stream,
    ingress_stream,
    is_cluster,
    log_wake_channel,
    slot_groups,
)
from runtime.worker.activation import activate
from runtime.worker.claims import Claim, Claims
from runtime.worker.commit import commit_activation
from runtime.worker.dead_letters import dead_letter
from runtime.worker.delivery import Delivery, parse_delivery, text
from runtime.worker.groups import (
    RENEW_LEASES,
    announce,
    hand_over,
    handoff_key,
    live_subscriptions,
    report_lag,
    subscriptions_rev_key,
    trim_acknowledged,
    withdraw,
)
from runtime.worker.options import WorkerOptions

if TYPE_CHECKING:
    from runtime.llm.calls import LLM

log = structlog.get_logger(__name__)


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


#: Seconds a worker waits for one of its own background tasks to end after
#: cancelling it. A cancellation can be lost (Python 3.11's ``asyncio.wait_for``,
#: used inside redis-py, can swallow one that arrives as its inner call
#: completes): a stop must not wait for such a task for ever.
_STOP_WAIT = 5.0
#: More than the streams one hand-off set can name (an agent's partitions and its own).
_MAX_NOTES = 1 << 16


@dataclasses.dataclass(eq=False)
class _Group:
    agent: Agent
    streams: list[str]
    types: frozenset[str]
    #: The handler's time limit (the agent's ``timeout``, else the worker's default).
    timeout: float
    #: Live members of the group (any version) -> the types each handles, and the
    #: revision of the registry that was read.
    live: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    live_rev: Any = None
    live_read_at: float = 0.0
    #: The agent's event filters (type -> any-of), checked before an activation.
    filters: Filters = dataclasses.field(default_factory=dict)


async def _bounded(tasks: Sequence[asyncio.Task[Any]], what: str) -> None:
    """Wait for cancelled ``tasks`` at most ``_STOP_WAIT`` seconds; name any that linger."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=_STOP_WAIT)
    if late:
        log.error("worker.stop_abandoned_tasks", what=what,
                  tasks=sorted(t.get_name() for t in late))  # fmt: skip


class Worker:
    """Runs agents: reads their streams, activates them, commits, acknowledges.

    The worker owns nothing it is given: the Redis client, the log (and its
    pool) and the LLM layer are closed by whoever opened them.
    """

    def __init__(
        self,
        agents: Sequence[Agent],
        *,
        redis: aioredis.Redis,
        log: EventLog,
        llm: LLM | None = None,
        options: WorkerOptions | None = None,
        breaker_threshold: int = 5,
        breaker_reset: float = 30.0,
        breaker_cache: float = 0.5,
    ) -> None:
        if not agents:
            raise ValueError("a worker needs at least one agent")
        self.options = opts = options or WorkerOptions()
        self.redis = redis
        self.log = log
        self._llm = llm
        self.consumer = opts.consumer or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        ingress = [ingress_stream(p) for p in range(opts.partitions)]
        self.groups = [
            _Group(
                agent=a,
                streams=[*(ingress if a.reads_ingress else []), agent_stream(a.name)],
                types=a.subscribed_types(),
                timeout=a.timeout or opts.handler_timeout,
                filters=a.filters(),
            )
            for a in agents
        ]
        #: Claims on (agent, event) held by activations running here.
        self.claims = Claims(redis, ttl=opts.claim_idle)
        #: Set when the run ends: background loops check it (not only cancellation).
        self._closing = False
        self._breakers: dict[str, CircuitBreaker] = {}
        self._breaker_threshold = breaker_threshold
        self._breaker_reset = breaker_reset
        self._breaker_cache = breaker_cache
        self._stopping = asyncio.Event()
        #: Activations running at once (entries read beyond it wait, leases renewed).
        self._gate = asyncio.Semaphore(opts.concurrency)
        #: Set while fewer than `concurrency` entries are held: readers wait on it.
        self._room = asyncio.Event()
        self._room.set()
        #: (group name, stream, entry id) -> task, from the read on: leases and draining.
        self._inflight: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self.queries = LogQueries(log)
        #: Step records of the activations running here, written together (group commit).
        self.step_writer = GroupWriter(log)
        #: Commits of the activations finishing here, several per transaction.
        self.commits = MarkedAppends(log)
        self._snapshots = SnapshotStore(log.pool, log.schema)
        self._renew = redis.register_script(RENEW_LEASES)
        #: (stream, group) -> entry ids committed and waiting for the next XACK.
        self._acks: dict[tuple[str, str], list[str]] = {}
        self._ack_wake = asyncio.Event()
        #: Whether something committed since the last flush (the relay is woken).
        self._committed = False
        self._wake_channel = log_wake_channel(log.schema)
        #: A Redis Cluster client: keys of one command, MULTI or script share a slot.
        self._cluster = is_cluster(redis)
        # XAUTOCLAIM's reply differs between Redis 6.2 and 7 (and redis-py
        # cannot parse 6.2's deleted entries): take it raw. (A cluster client
        # has no one pool to share: it takes the parsed reply, see reclaim_stream.)
        self._raw: aioredis.Redis | None = None
        if not self._cluster:
            self._raw = aioredis.Redis(connection_pool=redis.connection_pool)
            self._raw.set_response_callback("XAUTOCLAIM", _raw_reply)

    # -- Services (what contexts borrow) ------------------------------------------

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            raise RuntimeError("this worker was started without an LLM client")
        return self._llm

    def breaker(self, name: str) -> CircuitBreaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = CircuitBreaker(
                self.redis,
                name,
                failure_threshold=self._breaker_threshold,
                reset_timeout=self._breaker_reset,
                cache_ttl=self._breaker_cache,
            )
        return b

    async def record_transition(self, transition: Transition, *, run_id: UUID | None) -> None:
        """A breaker's state change, as an event of the stream ``circuit-<name>``."""
        metrics.CIRCUIT_STATE.labels(transition.name).set(
            metrics.STATE_VALUES[transition.to_state.value]
        )
        log.warning(
            "circuit.transition",
            circuit=transition.name,
            from_state=transition.from_state.value,
            to_state=transition.to_state.value,
        )
        await self.log.append(
            circuit_stream(transition.name),
            [
                NewEvent(
                    body=transition_event(transition),
                    run_id=run_id,
                    producer="breaker",
                    trace=current_traceparent(),
                )
            ],
        )

    # -- running ------------------------------------------------------------------

    async def setup(self) -> None:
        """Create every group (from the stream's start, so nothing before it is missed),
        and announce the types this worker handles to the other members of each group."""
        for g in self.groups:
            for stream in g.streams:
                with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                    await self.redis.xgroup_create(stream, g.agent.name, id="0", mkstream=True)
        await self._announce()

    async def _announce(self) -> None:
        # Valid for a few renewal periods: a worker that died stops counting soon.
        ttl = max(self.options.claim_idle, 10.0) * 1.5
        for g in self.groups:
            await announce(self.redis, g.agent.name, self.consumer, g.types, ttl)

    def stop(self) -> None:
        """Stop reading; in-flight activations finish (see :meth:`run`)."""
        self._stopping.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Work until ``stop`` is set (or :meth:`stop`), then drain and return.

        Stopping: readers finish their current XREADGROUP (``block_ms``) and
        read no more, reclaiming stops, activations in hand get
        ``drain_timeout`` seconds (their leases still renewed), and what is
        left is cancelled unacknowledged, for another consumer to reclaim.
        """
        await self.setup()
        opts = self.options
        if opts.drain_timeout >= opts.claim_idle:
            log.warning("worker.drain_outlasts_claim_idle", drain_timeout=opts.drain_timeout,
                        claim_idle=opts.claim_idle)  # fmt: skip
        log.info(
            "worker.started",
            consumer=self.consumer,
            agents=[g.agent.name for g in self.groups],
            concurrency=opts.concurrency,
        )
        # One XREADGROUP per group, or on a Redis Cluster one per hash slot of
        # its streams (a command's keys must share a slot there).
        readers = [
            self._task(self._read(g, streams), f"read:{g.agent.name}")
            for g in self.groups
            for streams in slot_groups(self.redis, g.streams)
        ]
        helpers = [
            *(self._task(self._reclaim(g), f"reclaim:{g.agent.name}") for g in self.groups),
            self._task(self._trim_loop(), "trim"),
            self._task(self._adopt_loop(), "adopt"),
        ]
        renewer = self._task(self._renew_leases(), "leases")
        acker = self._task(self._ack_loop(), "acks")
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(self._stopping.wait())]
        if stop is not None:
            waiters.append(asyncio.create_task(stop.wait()))
        try:
            done, _ = await asyncio.wait([*waiters, *readers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception() if task in readers else None
                if error is not None:
                    raise error
        finally:
            self._stopping.set()
            self._room.set()
            for task in waiters:
                task.cancel()
            # Readers notice the flag when their XREADGROUP returns (block_ms).
            _, slow = await asyncio.wait(readers, timeout=opts.block_ms / 1000 + 5)
            for task in [*slow, *helpers]:
                task.cancel()
            # Every wait below is bounded: a task that lost its cancellation
            # is abandoned (named in the log), never waited for.
            await _bounded([*readers, *helpers], "readers")
            await self._drain()
            await self.step_writer.drain()
            await self.commits.drain()
            self._closing = True
            self._ack_wake.set()
            acker.cancel()
            renewer.cancel()
            await _bounded([renewer, acker], "acknowledgements")
            try:
                await asyncio.wait_for(self._final_flush(), _STOP_WAIT)
            except (TimeoutError, RedisError, OSError) as exc:
                log.warning("worker.final_flush_failed", error=f"{type(exc).__name__}: {exc}")
            log.info("worker.stopped", consumer=self.consumer)

    def _task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task whose unexpected death is logged, not lost."""
        task = asyncio.create_task(coro, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                log.error("worker.task_died", task=name, error=f"{type(exc).__name__}: {exc}")

        task.add_done_callback(done)
        return task

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.options.drain_timeout
        if self._inflight:
            log.info("worker.draining", in_flight=len(self._inflight))
        while self._inflight and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._inflight.values()), timeout=left)
        late = list(self._inflight.values())
        for task in late:
            # Not acknowledged: the entry stays pending and another consumer
            # reclaims it; its recorded steps are not repeated.
            task.cancel()
        if late:
            log.warning("worker.drain_timeout", left_pending=len(late))
            await _bounded(late, "activations")

    async def _read(self, g: _Group, keys: list[str]) -> None:
        name = g.agent.name
        opts = self.options
        streams: dict[Any, Any] = dict.fromkeys(keys, ">")
        backoff = 0.1
        while not self._stopping.is_set():
            # Read only what there is room for: unread entries stay in the
            # stream for other workers instead of pending here.
            free = opts.concurrency - len(self._inflight)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                reply = await self.redis.xreadgroup(
                    name,
                    self.consumer,
                    streams,
                    # COUNT is per stream, so this may bring more than `free`
                    # when several streams have entries: those wait their
                    # turn here, leased (see _spawn).
                    count=min(opts.batch, free),
                    block=opts.block_ms,
                )
            except (RedisConnectionError, RedisTimeoutError, ClusterError, OSError) as exc:
                # (ClusterError: a cluster that is down or failing over, for now.)
                log.warning("worker.read_failed", agent=name, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("worker.group_missing", agent=name, error=str(exc))
                await self.setup()
                continue
            backoff = 0.1
            for stream_key, entries in typing.cast(list[Any], reply or []):
                stream = text(stream_key)
                for entry_id, fields in entries:
                    self._spawn(g, stream, text(entry_id), fields, claimed=False)

    def _spawn(
        self, g: _Group, stream: str, entry_id: str, fields: dict[Any, Any], *, claimed: bool
    ) -> None:
        """Hold the entry from now on (its lease is renewed), run it when there is room."""
        key = (g.agent.name, stream, entry_id)
        if key in self._inflight:
            return  # our own entry, still being handled
        task = asyncio.create_task(self._gated(g, stream, entry_id, fields, claimed))
        self._inflight[key] = task
        if len(self._inflight) >= self.options.concurrency:
            self._room.clear()

        def done(t: asyncio.Task[None]) -> None:
            self._inflight.pop(key, None)
            if len(self._inflight) < self.options.concurrency:
                self._room.set()
            if not t.cancelled() and t.exception() is not None:
                # Redis or Postgres failed around the activation (acking,
                # counting deliveries, dead-lettering): the entry stays
                # pending and is reclaimed; nothing was acknowledged.
                exc = t.exception()
                log.warning("activation.aborted", agent=key[0], stream=stream,
                            entry_id=entry_id, error=f"{type(exc).__name__}: {exc}")  # fmt: skip

        task.add_done_callback(done)

    async def _gated(
        self, g: _Group, stream: str, entry_id: str, fields: dict[Any, Any], claimed: bool
    ) -> None:
        async with self._gate:
            await self._entry(g, stream, entry_id, fields, claimed)

    # -- one entry ----------------------------------------------------------------

    async def _entry(
        self, g: _Group, stream: str, entry_id: str, fields: dict[Any, Any], claimed: bool
    ) -> None:
        agent = g.agent.name
        started = time.perf_counter()
        try:
            delivery = parse_delivery(stream, entry_id, fields)
        except InvalidDelivery as exc:
            log.error("activation.invalid_delivery", agent=agent, error=str(exc))
            await dead_letter(
                self.log, self.redis, g.agent.name, stream, entry_id, fields, None, exc, 1
            )
            return
        if delivery.type not in g.types:
            if await self._hand_off(g, stream, entry_id, delivery.type):
                metrics.ACTIVATIONS.labels(agent, "handed_off").inc()
                return
            await self._ack(g, stream, entry_id)
            metrics.ACTIVATIONS.labels(agent, "skipped").inc()
            return
        if delivery.type in g.filters and not self._passes(g, delivery):
            # Filtered out: acknowledged without an activation, like a type not subscribed.
            await self._ack(g, stream, entry_id)
            metrics.ACTIVATIONS.labels(agent, "filtered").inc()
            return
        aid = activation_id_for(agent, delivery.event_id, delivery.generation)
        with (
            structlog.contextvars.bound_contextvars(
                agent=agent,
                run_id=str(delivery.run_id),
                event_id=str(delivery.event_id),
                causation_id=str(delivery.causation_id) if delivery.causation_id else None,
                activation_id=str(aid),
            ),
            span(
                f"activation {agent}",
                context=self._trace_parent(delivery),
                kind=SpanKind.CONSUMER,
                attributes={"agentrt.agent": agent, "agentrt.event_type": delivery.type,
                            "agentrt.event_id": str(delivery.event_id),
                            "agentrt.run_id": str(delivery.run_id),
                            "agentrt.activation_id": str(aid),
                            "messaging.destination.name": stream,
                            "messaging.message.id": entry_id},
            ) as activation_span,
        ):  # fmt: skip
            try:
                outcome = await self._activate(g, delivery, fields, claimed)
            except (
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                OSError,
                RedisError,
                ClaimLost,
            ) as exc:
                # The servers, not the event (or another worker took it over):
                # leave it pending for a retry.
                log.warning("activation.unavailable", error=f"{type(exc).__name__}: {exc}")
                metrics.ACTIVATIONS.labels(agent, "failed").inc()
                activation_span.set_status(
                    StatusCode.ERROR, f"unavailable: {type(exc).__name__}: {exc}"
                )
                return
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # the handler's failure: counted, then dead-lettered
                activation_span.record_exception(exc)
                activation_span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                await self._failed(g, delivery, fields, exc)
                return
            activation_span.set_attribute("agentrt.outcome", outcome)
            metrics.ACTIVATIONS.labels(agent, outcome).inc()
            if outcome != "duplicate":
                metrics.ACTIVATION_SECONDS.labels(agent).observe(time.perf_counter() - started)

    @staticmethod
    def _trace_parent(d: Delivery) -> Context:
        """Where the activation's span goes: under the span that produced the event (the
        webhook's, or the activation's that emitted it), else at the root of a trace."""
        return parent_from(d.trace)

    def _passes(self, g: _Group, d: Delivery) -> bool:
        """Whether the entry's body passes the agent's filters. A body that does not decode
        passes: its activation dead-letters it (InvalidDelivery), as for any agent."""
        try:
            body = self.log.registry.decode(d.type, d.schema_version, d.body, strict=True)
        except (EventDecodeError, UnknownEventType):
            return True
        return accepts(g.filters, d.type, body)

    async def _activate(self, g: _Group, d: Delivery, fields: dict[Any, Any], claimed: bool) -> str:
        claim = self.claims.claim(g.agent.name, d.inbox_id)
        try:
            return await self._run_claimed(g, d, fields, claimed, claim)
        finally:
            if claim.held:
                # A failure or a stop: released with the next acknowledgements,
                # so a retry elsewhere need not wait out the lease.
                claim.release_later()
                self._ack_wake.set()

    async def _run_claimed(
        self, g: _Group, d: Delivery, fields: dict[Any, Any], claimed: bool, claim: Claim
    ) -> str:
        agent = g.agent
        aid = activation_id_for(agent.name, d.event_id, d.generation)
        steps_stream_id = activation_stream(aid)
        # A first delivery goes straight to the handler: it claims (agent,
        # event) only at its first step, so a duplicate copy running at the
        # same time waits there and then finds the steps in the log instead of
        # calling; a duplicate of a committed activation is caught by the inbox
        # row at commit. An activation taking no step never claims (the fast
        # path: its commit is its only effect). A redelivery claims first,
        # then looks.
        trigger_in_log, has_steps = d.in_log, False
        if claimed:
            await claim.acquire()
            state = await self.queries.activation_state(
                agent.name, d.inbox_id, d.event_id, steps_stream_id
            )
            trigger_in_log, has_steps = state.trigger_in_log, state.has_steps
            if state.handled:
                await self._ack(g, d.stream, d.entry_id)
                log.info("activation.duplicate")
                return "duplicate"
            deliveries = await self._deliveries(g, d.stream, d.entry_id)
            if deliveries > self.options.max_deliveries:
                error = RuntimeError(
                    f"delivered {deliveries} times without completing "
                    "(its workers died or timed out while handling it)"
                )
                lettered = await dead_letter(self.log, self.redis, g.agent.name, d.stream,
                                             d.entry_id, fields, d, error, deliveries)  # fmt: skip
                return "dead_lettered" if lettered else "duplicate"
        try:
            body = self.log.registry.decode(d.type, d.schema_version, d.body, strict=True)
        except (EventDecodeError, UnknownEventType) as exc:
            raise InvalidDelivery(d.stream, d.entry_id, str(exc)) from None
        # A redelivery reads its recorded steps now (the divergence check at
        # the end needs them), or knows there are none; a first delivery reads
        # them at its first step, if it takes one, once it holds the claim.
        if claimed and has_steps:
            steps = Steps(self.log, activation_id=aid, run_id=d.run_id, agent=agent.name,
                          trigger_id=d.event_id, lazy=True, guard=claim,
                          writer=self.step_writer)  # fmt: skip
            await steps.ensure_loaded()
        else:
            steps = Steps(self.log, activation_id=aid, run_id=d.run_id, agent=agent.name,
                          trigger_id=d.event_id, lazy=not claimed, guard=claim,
                          writer=self.step_writer)  # fmt: skip
        history: list[RecordedEvent] = []
        folded: Any = FROM_START
        if agent.folds_state:
            folded, history = await self._history(agent, d)
        trigger = Trigger(
            event_id=d.event_id,
            type=d.type,
            run_id=d.run_id,
            causation_id=d.causation_id,
            producer=d.producer,
            body=body,
            stream=d.stream,
            entry_id=d.entry_id,
        )

        async def spend() -> tuple[int, float]:
            return await self.queries.run_spend(d.run_id, excluding_stream=steps_stream_id)

        try:
            async with asyncio.timeout(g.timeout) as limit:
                result = await activate(
                    agent,
                    trigger,
                    activation_id=aid,
                    steps=steps,
                    services=self,
                    history=history,
                    spent=spend,
                    state=folded,
                )
        except TimeoutError:
            if not limit.expired():
                raise  # the handler's own TimeoutError: its failure, like any other
            raise HandlerTimeout(agent.name, g.timeout) from None
        outcome, outputs = result.outcome, result.outputs
        trigger_event = None if d.in_log else self._trigger_event(d, body)
        # The commit and the ack run to the end even if the worker is told to
        # stop meanwhile: half of them is what the inbox exists to repair.
        committed = await asyncio.shield(self._commit_and_ack(
            g, d, aid, outputs, trigger_event, bool(trigger_in_log), outcome, claim))  # fmt: skip
        if not committed:
            log.info("activation.duplicate", reason="another consumer committed it first")
            return "duplicate"
        log.info("activation.completed", outcome=outcome, steps=steps.count,
                 reused_steps=steps.reused, emitted=len(result.emitted))  # fmt: skip
        return outcome

    async def _history(self, agent: Agent, d: Delivery) -> tuple[Any, list[RecordedEvent]]:
        """The state to fold from and the run's events before the trigger, so a retry folds
        the same state.

        A run starts with its ingress event (nothing before it); a relayed
        event carries its log position: the nearest snapshot before it (the
        agent-state projection takes them) and the events after that; anything
        else reads the run up to the trigger.
        """
        if d.run_id == d.event_id and not d.in_log:
            return FROM_START, []
        if d.position is not None:
            found = await self._snapshots.load(
                d.run_id, agent.name, agent.fold_version, agent.state_decode_type(),
                before=d.position,
            )  # fmt: skip
            if found is not None:
                state, at = found
                return state, await self.log.read_run_between(d.run_id, at, d.position)
            return FROM_START, await self.log.read_run_between(d.run_id, None, d.position)
        events = await self.log.read_run(d.run_id)
        out = []
        for e in events:
            if e.event_id == d.event_id:
                break
            out.append(e)
        return FROM_START, out

    async def _commit_and_ack(
        self,
        g: _Group,
        d: Delivery,
        aid: UUID,
        outputs: list[NewEvent],
        trigger: NewEvent | None,
        trigger_in_log: bool,
        outcome: str,
        claim: Claim,
    ) -> bool:
        committed = await self.commit(g.agent.name, d, aid, outputs, trigger, trigger_in_log,
                                      outcome)  # fmt: skip
        self._committed = self._committed or committed
        claim.release_later()  # in the same round trip as the XACK
        await self._ack(g, d.stream, d.entry_id)
        return committed

    async def commit(
        self,
        agent: str,
        d: Delivery,
        aid: UUID,
        outputs: Sequence[NewEvent],
        trigger: NewEvent | None,
        trigger_in_log: bool,
        outcome: str,
    ) -> bool:
        """The activation's one transaction (:func:`commit_activation`); False for a duplicate."""
        return await commit_activation(self.log, self.queries, agent, d, aid, outputs, trigger,
                                       trigger_in_log, outcome, self.commits)  # fmt: skip

    @staticmethod
    def _trigger_event(d: Delivery, body: Event) -> NewEvent:
        return NewEvent(
            body=body,
            event_id=d.event_id,
            run_id=d.run_id,
            causation_id=d.causation_id,
            producer=d.producer,
            recorded_at=d.recorded_at or datetime.now(UTC),
            trace=traceparent_in(parent_from(d.trace)),
        )

    async def _ack(self, g: _Group, stream: str, entry_id: str) -> None:
        """Acknowledge, batched: the entry joins the next XACK of its stream.

        Only ever called after the commit (or for entries with nothing to
        commit), so a delay changes nothing but the round trips: if the
        process dies first, the entry is redelivered and the inbox skips it.
        """
        self._acks.setdefault((stream, g.agent.name), []).append(entry_id)
        self._ack_wake.set()

    async def _ack_loop(self) -> None:
        """Send the queued acknowledgements, one pipelined round trip per wake-up."""
        while not self._closing:
            await self._ack_wake.wait()
            await self._flush_acks()

    async def _final_flush(self) -> None:
        await self._flush_acks()
        for g in self.groups:
            await withdraw(self.redis, g.agent.name, self.consumer)

    async def _flush_acks(self) -> None:
        self._ack_wake.clear()
        batch, self._acks = self._acks, {}
        committed, self._committed = self._committed, False
        if not batch and not committed and not self.claims.releasing:
            return
        try:
            if self._cluster:
                await self._flush_acks_cluster(batch, committed)
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for (stream, group), ids in batch.items():
                    pipe.xack(stream, group, *ids)
                # Claims of committed activations go after their XACKs.
                await self.claims.release_in(pipe)
                if committed:
                    # Wakes the relay (cheaper than a NOTIFY in every commit,
                    # which PostgreSQL serializes).
                    pipe.publish(self._wake_channel, b"")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # Left pending: reclaimed later, and the inbox row makes it a no-op.
            log.warning("worker.ack_failed", entries=sum(map(len, batch.values())),
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    async def _flush_acks_cluster(
        self, batch: dict[tuple[str, str], list[str]], committed: bool
    ) -> None:
        """:meth:`_flush_acks` on a Redis Cluster, whose pipelines take neither scripts
        nor PUBLISH: the XACKs in one pipeline (a round trip per node), then the
        claims' releases (a script per slot) and the wake-up."""
        if batch:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (stream, group), ids in batch.items():
                    pipe.xack(stream, group, *ids)
                await pipe.execute()
        await self.claims.release_pending()
        if committed:
            await self.redis.publish(self._wake_channel, b"")

    async def _deliveries(self, g: _Group, stream: str, entry_id: str) -> int:
        rows = await self.redis.xpending_range(stream, g.agent.name, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _hand_off(self, g: _Group, stream: str, entry_id: str, event_type: str) -> bool:
        """An entry this version does not handle: hand it to a live member of the group
        that does (another version, during a rolling deploy); False if there is none.

        The registry is read again whenever a consumer came or went (one GET of
        its revision, read after the entry was, so a version that announced
        itself before the entry was written is seen).
        """
        rev = await self.redis.get(subscriptions_rev_key(g.agent.name))
        now = time.monotonic()
        if rev != g.live_rev or now - g.live_read_at > 10.0:
            g.live = await live_subscriptions(self.redis, g.agent.name)
            g.live_rev, g.live_read_at = rev, now
        takers = [c for c, types in g.live.items() if event_type in types and c != self.consumer]
        if not takers:
            return False
        target = random.choice(takers)
        if await hand_over(self.redis, g.agent.name, stream, entry_id, target):
            log.info("activation.handed_off", agent=g.agent.name, type=event_type, to=target)
        return True

    async def _adopt_loop(self) -> None:
        """Take up the entries other versions handed to this consumer (see ``_hand_off``)."""
        interval = min(0.5, max(self.options.claim_idle / 3, 0.05))
        keys = [handoff_key(g.agent.name, self.consumer) for g in self.groups]
        while await self._sleep(interval):
            try:
                # SPOP with a count reads and clears each set in one atomic
                # command (a set names at most an agent's streams): no MULTI,
                # so the keys may sit in different slots of a Redis Cluster.
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.spop(key, _MAX_NOTES)
                    noted = await pipe.execute()
                for g, streams in zip(self.groups, noted, strict=True):
                    for stream in sorted(text(s) for s in streams or ()):
                        await self._adopt(g, stream)
            except (RedisError, OSError) as exc:
                log.warning("worker.adopt_failed", error=f"{type(exc).__name__}: {exc}")

    async def _adopt(self, g: _Group, stream: str) -> None:
        start = "-"
        while True:
            rows = await self.redis.xpending_range(
                stream, g.agent.name, start, "+", self.options.batch, consumername=self.consumer
            )
            for row in rows:
                entry_id = text(row["message_id"])
                if (g.agent.name, stream, entry_id) in self._inflight:
                    continue
                page = await self.redis.xrange(stream, entry_id, entry_id)
                if not page:
                    await self.redis.xack(stream, g.agent.name, entry_id)  # deleted meanwhile
                    continue
                log.info("activation.adopted", agent=g.agent.name, stream=stream, entry_id=entry_id)
                self._spawn(g, stream, entry_id, page[0][1] or {}, claimed=True)
            if len(rows) < self.options.batch:
                return
            ms, _, seq = text(rows[-1]["message_id"]).partition("-")
            start = f"{ms}-{int(seq) + 1}"

    # -- failure ------------------------------------------------------------------

    async def _failed(self, g: _Group, d: Delivery, fields: dict[Any, Any], exc: Exception) -> None:
        if await self.queries.handled(g.agent.name, d.inbox_id):
            # A duplicate of an activation that committed: its rerun failing
            # changes nothing.
            await self._ack(g, d.stream, d.entry_id)
            log.info("activation.duplicate", rerun_error=f"{type(exc).__name__}: {exc}")
            return
        deliveries = await self._deliveries(g, d.stream, d.entry_id)
        # These fail the same way every time: retrying only delays the dead letter.
        deterministic = isinstance(exc, InvalidDelivery | StepFailed | StepDivergence)
        final = deterministic or deliveries >= self.options.max_deliveries
        log.warning(
            "activation.failed",
            error=f"{type(exc).__name__}: {exc}",
            deliveries=deliveries,
            max_deliveries=self.options.max_deliveries,
            dead_letter=final,
            exc_info=not isinstance(exc, AgentrtError),
        )
        metrics.ACTIVATIONS.labels(g.agent.name, "failed").inc()
        if final:
            await dead_letter(
                self.log, self.redis, g.agent.name, d.stream, d.entry_id, fields, d, exc, deliveries
            )
        # Otherwise it stays pending: reclaimed after claim_idle, tried again.

    # -- background ---------------------------------------------------------------

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False once the worker is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    async def _reclaim(self, g: _Group) -> None:
        """XAUTOCLAIM entries idle past claim_idle, following the cursor to the end."""
        idle_ms = int(self.options.claim_idle * 1000)
        while await self._sleep(max(self.options.claim_idle / 2, 0.05)):
            for stream in g.streams:
                try:
                    await self.reclaim_stream(g, stream, idle_ms)
                except (RedisError, OSError) as exc:
                    log.warning("worker.reclaim_failed", stream=stream, error=str(exc))

    async def reclaim_stream(self, g: _Group, stream: str, idle_ms: int) -> int:
        """Claim every entry of ``stream`` idle for ``idle_ms``; how many were claimed."""
        cursor: Any = "0-0"
        claimed = 0
        while True:
            if self._raw is None:  # a cluster client: entries parsed, (id, fields) each
                reply = await self.redis.xautoclaim(
                    stream, g.agent.name, self.consumer, idle_ms, cursor, count=self.options.batch
                )
            else:
                reply = await self._raw.execute_command(  # type: ignore[no-untyped-call]
                    "XAUTOCLAIM", stream, g.agent.name, self.consumer, idle_ms, cursor,
                    "COUNT", self.options.batch,
                )  # fmt: skip
            start, cursor, entries = cursor, reply[0], reply[1]
            got = []
            for entry in entries:
                if entry is None or entry[1] is None:
                    continue
                entry_id, raw_fields = text(entry[0]), entry[1]
                got.append(entry_id)
                fields = (
                    raw_fields
                    if isinstance(raw_fields, dict)
                    else dict(zip(raw_fields[::2], raw_fields[1::2], strict=True))
                )
                claimed += 1
                self._spawn(g, stream, entry_id, fields, claimed=True)
            # Redis 7 drops deleted entries from the PEL itself and lists them
            # in reply[2]. Redis 6.2 returns each as a bare nil and leaves it
            # pending on us, for ever: find those and acknowledge them.
            if len(got) < len(entries):
                await self._ack_deleted(g, stream, text(start), set(got))
            if len(reply) > 2 and reply[2]:
                log.warning("worker.claimed_deleted_entries", stream=stream, ids=len(reply[2]))
            if text(cursor) == "0-0":
                return claimed

    async def _ack_deleted(self, g: _Group, stream: str, start: str, got: set[str]) -> None:
        rows = await self.redis.xpending_range(
            stream, g.agent.name, start, "+", self.options.batch * 4, consumername=self.consumer
        )
        for row in rows:
            entry_id = text(row["message_id"])
            if entry_id in got or (g.agent.name, stream, entry_id) in self._inflight:
                continue
            if not await self.redis.xrange(stream, entry_id, entry_id):
                await self.redis.xack(stream, g.agent.name, entry_id)
                log.warning("worker.claimed_deleted_entry", stream=stream, entry_id=entry_id)

    async def _renew_leases(self) -> None:
        """Reset the idle time of entries being handled here, so nobody reclaims them."""
        # Runs until cancelled, after the drain: entries in hand keep their lease.
        interval = max(self.options.claim_idle / 3, 0.05)
        announced = time.monotonic()
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                await self.claims.renew()
                if time.monotonic() - announced > max(self.options.claim_idle, 10.0) / 3:
                    await self._announce()
                    announced = time.monotonic()
            except (RedisError, OSError) as exc:
                log.warning("worker.claim_renewal_failed", error=f"{type(exc).__name__}: {exc}")
            by_stream: dict[tuple[str, str], list[str]] = {}
            for group, stream, entry_id in list(self._inflight):
                by_stream.setdefault((group, stream), []).append(entry_id)
            for (group, stream), ids in by_stream.items():
                try:
                    lost = await self._renew(keys=[stream], args=[group, self.consumer, *ids])
                except (RedisError, OSError) as exc:
                    log.warning("worker.lease_renewal_failed", stream=stream, error=str(exc))
                    continue
                for entry_id in lost or ():
                    # Another consumer reclaimed it (we stalled past claim_idle).
                    # Both may finish it: the inbox lets one commit, and the
                    # log keeps one result per step.
                    log.warning("worker.lease_lost", stream=stream, entry_id=text(entry_id))

    async def _trim_loop(self) -> None:
        streams = sorted({s for g in self.groups for s in g.streams})
        while await self._sleep(self.options.trim_interval):
            for stream in streams:
                try:
                    await trim_acknowledged(self.redis, stream)
                    await report_lag(self.redis, stream)
                except (RedisError, OSError) as exc:
                    log.warning("worker.trim_failed", stream=stream, error=str(exc))
