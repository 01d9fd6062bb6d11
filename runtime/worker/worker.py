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
import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runtime.agents.agent import Agent
from runtime.agents.context import Context, Trigger, activation_id_for, transition_event
from runtime.effects.breaker import CircuitBreaker, Transition
from runtime.effects.steps import Steps
from runtime.errors import (
    AgentrtError,
    BudgetExceeded,
    ConcurrencyConflict,
    DuplicateEventMismatch,
    EventDecodeError,
    InvalidDelivery,
    StepDivergence,
    StepFailed,
    UnknownEventType,
)
from runtime.events.builtin import ActivationCompleted, ActivationDeadLettered
from runtime.events.ids import activation_stream, circuit_stream, dead_letters_stream, run_stream
from runtime.events.model import Event, LogPosition, NewEvent, RecordedEvent
from runtime.log.store import ANY_VERSION, NO_STREAM, EventLog
from runtime.ops import metrics
from runtime.streams.keys import DLQ_STREAM, agent_stream, ingress_stream, log_wake_channel

if TYPE_CHECKING:
    from runtime.llm.calls import LLM

log = structlog.get_logger(__name__)

#: uuid5 namespace of the log events the worker writes about dead letters.
_DLQ_NAMESPACE = uuid.UUID("0b7d2d6e-8f0a-4c2e-9a51-3c1f3e9f2a77")
#: How often a lost race on the run stream is retried before the activation fails.
_COMMIT_ATTEMPTS = 12

# KEYS: stream. ARGV: group, consumer, entry ids. Reset the idle time of the
# entries this consumer still owns (XCLAIM JUSTID does not count a delivery);
# never take back one that another consumer reclaimed. Returns those lost.
_RENEW = """
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How a worker reads, retries and gives up."""

    #: Activations in flight at once in this process (all agents together).
    concurrency: int = 16
    #: Entries asked for per XREADGROUP.
    batch: int = 32
    #: How long an XREADGROUP blocks; also how soon a stop request is noticed.
    block_ms: int = 1000
    #: An entry pending this long on a consumer that stopped renewing it is reclaimed.
    claim_idle: float = 60.0
    #: Deliveries of one entry (first read and reclaims) before it is dead-lettered.
    max_deliveries: int = 5
    #: On stop, how long in-flight activations may take to finish.
    drain_timeout: float = 30.0
    #: Seconds between trims of the streams below what every group acknowledged.
    trim_interval: float = 30.0
    #: Ingress partitions (``agentrt:in:{p0}`` ..), as the webhooks config sets them.
    partitions: int = 8
    #: This process's consumer name (default: host-pid-random).
    consumer: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch < 1 or self.max_deliveries < 1:
            raise ValueError("concurrency, batch and max_deliveries must be at least 1")
        if self.claim_idle <= 0 or self.block_ms < 1:
            raise ValueError("claim_idle and block_ms must be positive")


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A stream entry as an event: written by the ingress, the relay, timers or a redrive."""

    stream: str
    entry_id: str
    event_id: UUID
    type: str
    schema_version: int
    body: bytes
    run_id: UUID
    causation_id: UUID | None = None
    producer: str | None = None
    recorded_at: datetime | None = None
    #: Where the event sits in the log, for events relayed from it (None: ingress).
    position: LogPosition | None = None
    #: Bumped by each redrive: a fresh activation (fresh steps) for the same event.
    generation: int = 0

    @property
    def in_log(self) -> bool:
        return self.position is not None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_delivery(stream: str, entry_id: str, fields: dict[Any, Any]) -> Delivery:
    """The entry's event, or :class:`InvalidDelivery` naming what is wrong with it."""
    f = {_text(k): v for k, v in fields.items()}
    try:
        event_id = UUID(_text(f["event_id"]))
        run_raw = f.get("run_id")
        cause = f.get("causation_id")
        at = f.get("recorded_at") or f.get("received_at")
        body = f["body"]
        return Delivery(
            stream=stream,
            entry_id=entry_id,
            event_id=event_id,
            type=_text(f["type"]),
            schema_version=int(_text(f.get("schema_version", b"1"))),
            body=body if isinstance(body, bytes) else str(body).encode(),
            run_id=UUID(_text(run_raw)) if run_raw else event_id,
            causation_id=UUID(_text(cause)) if cause else None,
            producer=_text(f["producer"]) if f.get("producer") else (
                f"ingress:{_text(f['source'])}" if f.get("source") else None),
            recorded_at=datetime.fromisoformat(_text(at)) if at else None,
            position=LogPosition.parse(_text(f["position"])) if f.get("position") else None,
            generation=int(_text(f.get("generation", b"0"))),
        )  # fmt: skip
    except KeyError as exc:
        raise InvalidDelivery(stream, entry_id, f"field {exc.args[0]!r} is missing") from None
    except ValueError as exc:
        raise InvalidDelivery(stream, entry_id, str(exc)) from None


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclasses.dataclass(eq=False)
class _Group:
    agent: Agent
    streams: list[str]
    types: frozenset[str]


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
            )
            for a in agents
        ]
        self._breakers: dict[str, CircuitBreaker] = {}
        self._breaker_threshold = breaker_threshold
        self._breaker_reset = breaker_reset
        self._stopping = asyncio.Event()
        #: Activations running at once (entries read beyond it wait, leases renewed).
        self._gate = asyncio.Semaphore(opts.concurrency)
        #: Set while fewer than `concurrency` entries are held: readers wait on it.
        self._room = asyncio.Event()
        self._room.set()
        #: (group name, stream, entry id) -> task, from the read on: leases and draining.
        self._inflight: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        q = f'"{log.schema}"'
        self._sql_start = (
            f"SELECT EXISTS (SELECT 1 FROM {q}.inbox WHERE consumer = $1 AND event_id = $2), "
            f"EXISTS (SELECT 1 FROM {q}.events WHERE event_id = $2), "
            f"EXISTS (SELECT 1 FROM {q}.events WHERE stream_id = $3)"
        )
        self._sql_spend = (
            "SELECT coalesce(sum(coalesce((data->'usage'->>'input_tokens')::bigint, 0) "
            "+ coalesce((data->'usage'->>'output_tokens')::bigint, 0) "
            "+ coalesce((data->'usage'->>'cache_creation_input_tokens')::bigint, 0) "
            "+ coalesce((data->'usage'->>'cache_read_input_tokens')::bigint, 0)), 0), "
            "coalesce(sum((data->'usage'->>'cost_usd')::float8), 0) "
            f"FROM {q}.events WHERE run_id = $1 AND event_type = 'step.recorded' "
            "AND stream_id <> $2"
        )
        self._sql_done = (
            f"SELECT EXISTS (SELECT 1 FROM {q}.inbox WHERE consumer = $1 AND event_id = $2)"
        )
        self._sql_has_event = f"SELECT EXISTS (SELECT 1 FROM {q}.events WHERE event_id = $1)"
        self._renew = redis.register_script(_RENEW)
        #: (stream, group) -> entry ids committed and waiting for the next XACK.
        self._acks: dict[tuple[str, str], list[str]] = {}
        self._ack_wake = asyncio.Event()
        #: Whether something committed since the last flush (the relay is woken).
        self._committed = False
        self._wake_channel = log_wake_channel(log.schema)
        # XAUTOCLAIM's reply differs between Redis 6.2 and 7 (and redis-py
        # cannot parse 6.2's deleted entries): take it raw.
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
            [NewEvent(body=transition_event(transition), run_id=run_id, producer="breaker")],
        )

    # -- running ------------------------------------------------------------------

    async def setup(self) -> None:
        """Create every group (from the stream's start, so nothing before it is missed)."""
        for g in self.groups:
            for stream in g.streams:
                with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                    await self.redis.xgroup_create(stream, g.agent.name, id="0", mkstream=True)

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
        readers = [self._task(self._read(g), f"read:{g.agent.name}") for g in self.groups]
        helpers = [
            *(self._task(self._reclaim(g), f"reclaim:{g.agent.name}") for g in self.groups),
            self._task(self._trim_loop(), "trim"),
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
            await asyncio.gather(*readers, *helpers, return_exceptions=True)
            await self._drain()
            acker.cancel()
            renewer.cancel()
            await asyncio.gather(renewer, acker, return_exceptions=True)
            await self._flush_acks()
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
            await asyncio.gather(*late, return_exceptions=True)

    async def _read(self, g: _Group) -> None:
        name = g.agent.name
        opts = self.options
        streams: dict[Any, Any] = dict.fromkeys(g.streams, ">")
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
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
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
                stream = _text(stream_key)
                for entry_id, fields in entries:
                    self._spawn(g, stream, _text(entry_id), fields, claimed=False)

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
            await self._dead_letter(g, stream, entry_id, fields, None, exc, 1)
            return
        if delivery.type not in g.types:
            await self._ack(g, stream, entry_id)
            metrics.ACTIVATIONS.labels(agent, "skipped").inc()
            return
        with structlog.contextvars.bound_contextvars(
            agent=agent,
            run_id=str(delivery.run_id),
            event_id=str(delivery.event_id),
            causation_id=str(delivery.causation_id) if delivery.causation_id else None,
            activation_id=str(activation_id_for(agent, delivery.event_id, delivery.generation)),
        ):
            try:
                outcome = await self._activate(g, delivery, fields, claimed)
            except (
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                OSError,
                RedisError,
            ) as exc:
                # The servers, not the event: leave it pending for a retry.
                log.warning("activation.unavailable", error=f"{type(exc).__name__}: {exc}")
                metrics.ACTIVATIONS.labels(agent, "failed").inc()
                return
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # the handler's failure: counted, then dead-lettered
                await self._failed(g, delivery, fields, exc)
                return
            metrics.ACTIVATIONS.labels(agent, outcome).inc()
            if outcome != "duplicate":
                metrics.ACTIVATION_SECONDS.labels(agent).observe(time.perf_counter() - started)

    async def _activate(self, g: _Group, d: Delivery, fields: dict[Any, Any], claimed: bool) -> str:
        agent = g.agent
        aid = activation_id_for(agent.name, d.event_id, d.generation)
        steps_stream_id = activation_stream(aid)
        # A first delivery goes straight to the handler: a duplicate of a
        # committed activation is caught by the inbox row at commit (its steps
        # come back from the log, so nothing is called twice), which saves a
        # round trip on every activation. A redelivery looks first.
        trigger_in_log, has_steps = d.in_log, False
        if claimed:
            done, trigger_in_log, has_steps = await self.log.pool.fetchrow(
                self._sql_start, agent.name, d.event_id, steps_stream_id
            )
            if done:
                await self._ack(g, d.stream, d.entry_id)
                log.info("activation.duplicate")
                return "duplicate"
            deliveries = await self._deliveries(g, d.stream, d.entry_id)
            if deliveries > self.options.max_deliveries:
                error = RuntimeError(
                    f"delivered {deliveries} times without completing "
                    "(its workers died or timed out while handling it)"
                )
                await self._dead_letter(g, d.stream, d.entry_id, fields, d, error, deliveries)
                return "dead_lettered"
        try:
            body = self.log.registry.decode(d.type, d.schema_version, d.body, strict=True)
        except (EventDecodeError, UnknownEventType) as exc:
            raise InvalidDelivery(d.stream, d.entry_id, str(exc)) from None
        # A redelivery reads its recorded steps now (the divergence check at
        # the end needs them), or knows there are none; a first delivery reads
        # them at its first step, if it takes one.
        if claimed and has_steps:
            steps = await Steps.load(self.log, activation_id=aid, run_id=d.run_id,
                                     agent=agent.name, trigger_id=d.event_id)  # fmt: skip
        else:
            steps = Steps(self.log, activation_id=aid, run_id=d.run_id, agent=agent.name,
                          trigger_id=d.event_id, lazy=not claimed)  # fmt: skip
        history: list[RecordedEvent] = []
        if type(agent).evolve is not Agent.evolve:
            history = await self._history(d)
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
            tokens, usd = await self.log.pool.fetchrow(self._sql_spend, d.run_id, steps_stream_id)
            return int(tokens), float(usd)

        ctx = Context(
            agent=agent,
            trigger=trigger,
            activation_id=aid,
            steps=steps,
            services=self,
            history=history,
            spent=spend,
        )
        started = time.perf_counter()
        outcome = "completed"
        extra: list[Event] = []
        try:
            await agent.handle(body, ctx)
            steps.check_complete()
        except BudgetExceeded as stop:
            # The run stops here: what the handler emitted so far is dropped
            # (an activation commits whole or not at all), the reason is kept.
            log.warning("run.budget_exceeded", detail=str(stop))
            outcome = "budget_exceeded"
            ctx.emitted.clear()
            if isinstance(stop.event, Event):
                extra.append(stop.event)
        completed = ActivationCompleted(
            agent=agent.name,
            activation_id=aid,
            trigger_id=d.event_id,
            trigger_type=d.type,
            steps=steps.count,
            emitted=[e.event_id for e in ctx.emitted],
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            outcome=outcome,
        )
        outputs = [
            *ctx.emitted,
            *(
                NewEvent(body=e, run_id=d.run_id, causation_id=d.event_id, producer=agent.name)
                for e in [*extra, completed]
            ),
        ]
        trigger_event = None if d.in_log else self._trigger_event(d, body)
        # The commit and the ack run to the end even if the worker is told to
        # stop meanwhile: half of them is what the inbox exists to repair.
        committed = await asyncio.shield(self._commit_and_ack(
            g, d, aid, outputs, trigger_event, bool(trigger_in_log), outcome))  # fmt: skip
        if not committed:
            log.info("activation.duplicate", reason="another consumer committed it first")
            return "duplicate"
        log.info("activation.completed", outcome=outcome, steps=steps.count,
                 reused_steps=steps.reused, emitted=len(ctx.emitted))  # fmt: skip
        return outcome

    async def _history(self, d: Delivery) -> list[RecordedEvent]:
        """The run's events before the trigger, so a retry folds the same state.

        A run starts with its ingress event (nothing before it); a relayed
        event carries its log position; anything else stops at the trigger.
        """
        if d.run_id == d.event_id and not d.in_log:
            return []
        events = await self.log.read_run(d.run_id)
        if d.position is not None:
            return [e for e in events if e.log_position < d.position]
        out = []
        for e in events:
            if e.event_id == d.event_id:
                break
            out.append(e)
        return out

    async def _commit_and_ack(
        self,
        g: _Group,
        d: Delivery,
        aid: UUID,
        outputs: list[NewEvent],
        trigger: NewEvent | None,
        trigger_in_log: bool,
        outcome: str,
    ) -> bool:
        committed = await self.commit(g.agent.name, d, aid, outputs, trigger, trigger_in_log,
                                      outcome)  # fmt: skip
        self._committed = self._committed or committed
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
        """The activation's one transaction; False if its inbox row was there already.

        One statement (so one round trip, atomic without BEGIN/COMMIT): the
        trigger if the log lacks it, the outputs, and the inbox row. A lost
        race (another activation of the run appended first, or wrote the
        trigger) rolls it back whole; it is tried again.
        """
        marker = (agent, d.event_id, aid, outcome, d.run_id)
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            events = list(outputs)
            expected = ANY_VERSION
            if trigger is not None and not trigger_in_log:
                events.insert(0, trigger)
                if d.run_id == d.event_id and attempt == 1:
                    # Most likely the run's first event, its stream new: the
                    # chain is computed here and the rows go straight in (no
                    # function). If the stream exists after all (a redrive,
                    # another agent), the retry appends at any version.
                    expected = NO_STREAM
            try:
                await self.log.append_marked(run_stream(d.run_id), events, marker, expected)
                return True
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "inbox_pkey":
                    return False
                lost: Exception = exc
            except (ConcurrencyConflict, DuplicateEventMismatch) as exc:
                lost = exc
            if attempt == _COMMIT_ATTEMPTS:
                raise lost
            if attempt > 1:
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
            if trigger is not None:
                trigger_in_log = bool(await self.log.pool.fetchval(self._sql_has_event,
                                                                   d.event_id))  # fmt: skip
        raise AssertionError("unreachable")

    @staticmethod
    def _trigger_event(d: Delivery, body: Event) -> NewEvent:
        return NewEvent(
            body=body,
            event_id=d.event_id,
            run_id=d.run_id,
            causation_id=d.causation_id,
            producer=d.producer,
            recorded_at=d.recorded_at or datetime.now(UTC),
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
        while True:
            await self._ack_wake.wait()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        self._ack_wake.clear()
        batch, self._acks = self._acks, {}
        committed, self._committed = self._committed, False
        if not batch and not committed:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (stream, group), ids in batch.items():
                    pipe.xack(stream, group, *ids)
                if committed:
                    # Wakes the relay (cheaper than a NOTIFY in every commit,
                    # which PostgreSQL serializes).
                    pipe.publish(self._wake_channel, b"")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # Left pending: reclaimed later, and the inbox row makes it a no-op.
            log.warning("worker.ack_failed", entries=sum(map(len, batch.values())),
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    async def _deliveries(self, g: _Group, stream: str, entry_id: str) -> int:
        rows = await self.redis.xpending_range(stream, g.agent.name, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 1

    # -- failure ------------------------------------------------------------------

    async def _failed(self, g: _Group, d: Delivery, fields: dict[Any, Any], exc: Exception) -> None:
        if await self.log.pool.fetchval(self._sql_done, g.agent.name, d.event_id):
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
            await self._dead_letter(g, d.stream, d.entry_id, fields, d, exc, deliveries)
        # Otherwise it stays pending: reclaimed after claim_idle, tried again.

    async def _dead_letter(
        self,
        g: _Group,
        stream: str,
        entry_id: str,
        fields: dict[Any, Any],
        d: Delivery | None,
        exc: BaseException,
        deliveries: int,
    ) -> None:
        """Record the error in the log, move the entry to the DLQ stream, acknowledge it."""
        agent = g.agent.name
        code = str(exc.code) if isinstance(exc, AgentrtError) else None
        trigger_id = (
            d.event_id if d is not None else uuid.uuid5(_DLQ_NAMESPACE, f"{stream}/{entry_id}")
        )
        aid = activation_id_for(agent, trigger_id, d.generation if d else 0)
        event = ActivationDeadLettered(
            agent=agent,
            activation_id=aid,
            trigger_id=trigger_id,
            trigger_type=d.type if d is not None else "",
            stream=stream,
            entry_id=entry_id,
            deliveries=deliveries,
            error_type=type(exc).__name__,
            error=str(exc),
            error_code=code,
        )
        # A deterministic id: a crash before the XACK repeats this append as a no-op.
        new = NewEvent(
            body=event,
            event_id=uuid.uuid5(_DLQ_NAMESPACE, f"{agent}/{stream}/{entry_id}"),
            run_id=d.run_id if d is not None else None,
            causation_id=d.event_id if d is not None else None,
            producer=agent,
        )
        target = run_stream(d.run_id) if d is not None else dead_letters_stream(agent)
        await self.log.append(target, [new])
        dlq_fields: dict[Any, Any] = dict(fields)
        dlq_fields.update(
            {
                "dlq_agent": agent,
                "dlq_stream": stream,
                "dlq_entry_id": entry_id,
                "dlq_deliveries": str(deliveries),
                "dlq_error_type": type(exc).__name__,
                "dlq_error": str(exc)[:4000],
                "dlq_at": datetime.now(UTC).isoformat(),
            }
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(DLQ_STREAM, dlq_fields)
            pipe.xack(stream, agent, entry_id)
            await pipe.execute()
        metrics.DEAD_LETTERS.labels(agent).inc()
        metrics.ACTIVATIONS.labels(agent, "dead_lettered").inc()
        log.error("activation.dead_lettered", deliveries=deliveries, error=str(exc))

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
            reply = await self._raw.execute_command(  # type: ignore[no-untyped-call]
                "XAUTOCLAIM", stream, g.agent.name, self.consumer, idle_ms, cursor,
                "COUNT", self.options.batch,
            )  # fmt: skip
            start, cursor, entries = cursor, reply[0], reply[1]
            got = []
            for entry in entries:
                if entry is None or entry[1] is None:
                    continue
                entry_id, raw_fields = _text(entry[0]), entry[1]
                got.append(entry_id)
                fields = dict(zip(raw_fields[::2], raw_fields[1::2], strict=True))
                claimed += 1
                self._spawn(g, stream, entry_id, fields, claimed=True)
            # Redis 7 drops deleted entries from the PEL itself and lists them
            # in reply[2]. Redis 6.2 returns each as a bare nil and leaves it
            # pending on us, for ever: find those and acknowledge them.
            if len(got) < len(entries):
                await self._ack_deleted(g, stream, _text(start), set(got))
            if len(reply) > 2 and reply[2]:
                log.warning("worker.claimed_deleted_entries", stream=stream, ids=len(reply[2]))
            if _text(cursor) == "0-0":
                return claimed

    async def _ack_deleted(self, g: _Group, stream: str, start: str, got: set[str]) -> None:
        rows = await self.redis.xpending_range(
            stream, g.agent.name, start, "+", self.options.batch * 4, consumername=self.consumer
        )
        for row in rows:
            entry_id = _text(row["message_id"])
            if entry_id in got or (g.agent.name, stream, entry_id) in self._inflight:
                continue
            if not await self.redis.xrange(stream, entry_id, entry_id):
                await self.redis.xack(stream, g.agent.name, entry_id)
                log.warning("worker.claimed_deleted_entry", stream=stream, entry_id=entry_id)

    async def _renew_leases(self) -> None:
        """Reset the idle time of entries being handled here, so nobody reclaims them."""
        # Runs until cancelled, after the drain: entries in hand keep their lease.
        interval = max(self.options.claim_idle / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
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
                    log.warning("worker.lease_lost", stream=stream, entry_id=_text(entry_id))

    async def _trim_loop(self) -> None:
        streams = sorted({s for g in self.groups for s in g.streams})
        while await self._sleep(self.options.trim_interval):
            for stream in streams:
                try:
                    await trim_acknowledged(self.redis, stream)
                    await self._report_lag(stream)
                except (RedisError, OSError) as exc:
                    log.warning("worker.trim_failed", stream=stream, error=str(exc))

    async def _report_lag(self, stream: str) -> None:
        length = await self.redis.xlen(stream)
        for info in await self.redis.xinfo_groups(stream):
            name = _text(info["name"])
            lag = info.get("lag")
            undelivered = int(lag) if lag is not None else None
            pending = int(info.get("pending", 0))
            if undelivered is None:  # Redis 6.2: no lag field; bound it by the length
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
        name = _text(info["name"])
        summary = await redis.xpending(stream, name)
        if summary and int(summary["pending"]):
            bound = parse_id(_text(summary["min"]))
        else:
            ms, seq = parse_id(_text(info["last-delivered-id"]))
            bound = (ms, seq + 1)
        keep = bound if keep is None or bound < keep else keep
    assert keep is not None
    if keep <= (0, 1):
        return 0
    removed = await redis.xtrim(stream, minid=f"{keep[0]}-{keep[1]}", approximate=False)
    return int(removed)
