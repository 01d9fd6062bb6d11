"""Fork a past run: a new run, linked to its parent, that reuses the parent's recorded results
before a step and runs live from that step on, with a change (model, tier, prompt or input).

The fork runs in this process as the workers would: :func:`activate` for the
trigger's subscribers, then for each emitted event's subscribers, breadth-first
in emit order, until nothing is left. A step numbered below ``at`` is answered
from the parent's matching activation (same agent, same trigger type, same
ordinal among the agent's activations) when it asks for exactly what the
parent's did (request hash), and recorded in the child as a copy of it (the
child's activation id; its own duration); every other step runs live. The
change applies from ``at`` on, at the model-step level (:class:`ForkLLM`).

The fork commits whole, once every activation has run (see :class:`_Fork`): its
steps in ``act-<id>`` streams, its outputs in ``run-<id>`` (``run.forked`` and
the trigger first), every activation's inbox row, in the order a worker would
have committed them. The parent run is never written to.

Numbering: a step's run-level number in the fork is counted as
:meth:`RunRecord.locate` counts it (activations in the order they commit, steps
within each), which is the parent's numbering as long as the fork runs the
parent's activations in the parent's order (a pipeline always does).

The system prompt of ``--prompt-file`` is stored as its text in
``run.forked``'s ``prompt`` (a reader needs the text to see what changed; its
sha256 is one ``hashlib`` call away).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import redis.asyncio as aioredis
import structlog

from projections.errors import AgentMissing, InvalidInput, StepOutOfRange
from projections.record import RecordedActivation, RunRecord, load_run
from runtime.agents.agent import Agent
from runtime.agents.context import Trigger, activation_id_for, transition_event
from runtime.effects.breaker import CircuitBreaker, Transition
from runtime.effects.steps import StepCall, StepOutput, Steps, request_hash
from runtime.errors import AgentrtError
from runtime.events.builtin import (
    BOOKKEEPING,
    ActivationDeadLettered,
    RunForked,
    StepRecorded,
)
from runtime.events.ids import activation_stream, circuit_stream, run_stream
from runtime.events.model import (
    Event,
    NewEvent,
    RecordedEvent,
    event_type_of,
    new_event_id,
    utcnow,
)
from runtime.llm.calls import LLM, Caller
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.worker.activation import activate

log = structlog.get_logger(__name__)

JSON = dict[str, Any]

#: The stream name a fork's triggers carry (they come from no Redis stream).
FORK_STREAM = "fork"


# -- what changes ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """What the fork changes, from its fork step on (``body``: the trigger, from the start)."""

    #: The model id every model step from the fork step on uses (``--model``, or ``--tier``'s).
    model: str | None = None
    #: The tier ``model`` came from, when given as a tier (recorded in ``run.forked``).
    tier: str | None = None
    #: The system prompt replacing the agent's (``--prompt-file``).
    prompt: str | None = None
    #: The trigger's new body (``--input-file``), else the parent's.
    body: Event | None = None

    def rewrite(self, request: JSON) -> JSON:
        """A model request with the change applied (the same request if nothing changes)."""
        if self.model is None and self.prompt is None:
            return request
        changed = dict(request)
        if self.model is not None:
            changed["model"] = self.model
        if self.prompt is not None:
            changed["system"] = self.prompt
        return changed


def decode_input(record: RunRecord, data: bytes) -> Event:
    """``data`` (JSON) as a body of the run's trigger type; :class:`InvalidInput` naming
    what does not decode (the field, as msgspec reports it: ``at `$.subject```)."""
    kind = type(record.root.body)
    try:
        body = msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidInput(
            f"the input does not decode as {record.root.event_type} ({kind.__name__}): {exc}"
        ) from None
    assert isinstance(body, Event)
    return body


# -- the steps of a child activation ---------------------------------------------------


class ForkSteps(Steps):
    """A child activation's steps: below the fork step, the parent's recorded results (copied
    into the child's stream) where the request matches; every other step executed live."""

    def __init__(
        self,
        *,
        activation_id: UUID,
        run_id: UUID,
        agent: str,
        trigger_id: UUID,
        first_step: int,
        at: int,
        parent: Mapping[int, StepRecorded],
    ) -> None:
        # No log: the steps are kept here and written with the fork's commit.
        super().__init__(
            None, activation_id=activation_id, run_id=run_id, agent=agent, trigger_id=trigger_id
        )
        self.first_step = first_step
        self.at = at
        self.parent = parent
        #: Step numbers (within the activation) answered with the parent's result.
        self.copied: list[int] = []
        #: When each step was taken (its event's ``recorded_at``, written later).
        self.taken_at: dict[int, datetime] = {}

    def run_step(self, n: int) -> int:
        """The run-level number of this activation's step ``n``."""
        return self.first_step + n - 1

    async def run(self, kind: str, name: str, request: Any, call: StepCall) -> StepRecorded:
        n = self.next_step
        source = self.parent.get(n) if self.run_step(n) < self.at else None
        if source is None or (source.kind, source.name, source.request_hash) != (
            kind,
            name,
            request_hash(kind, name, request),
        ):
            record = await super().run(kind, name, request, call)
            self.taken_at.setdefault(n, utcnow())
            return record
        found = source

        async def reuse() -> StepOutput:
            # The parent's outcome, as it was: result or error, its attempts and usage.
            return StepOutput(
                result=found.result,
                error=found.error,
                attempts=tuple(found.attempts),
                usage=found.usage,
            )

        record = await super().run(kind, name, request, reuse)
        self.copied.append(n)
        self.reused += 1  # answered from a record (the parent's), as the model layer logs it
        self.taken_at.setdefault(n, utcnow())
        return record

    @property
    def live(self) -> list[int]:
        """Step numbers (within the activation) that called a model or a tool."""
        return [n for n in self.executed if n not in self.copied]


class ForkLLM(LLM):
    """The model layer of a fork: requests of steps numbered ``at`` and later get the change."""

    def __init__(
        self,
        client: Any,
        settings: Settings,
        *,
        offline: bool,
        at: int,
        change: Change,
    ) -> None:
        super().__init__(client, settings, offline=offline)
        self.at = at
        self.change = change

    async def step(self, ctx: Caller, request: JSON) -> StepRecorded:
        steps = ctx.steps
        if isinstance(steps, ForkSteps) and steps.run_step(steps.next_step) >= self.at:
            request = self.change.rewrite(request)
        return await super().step(ctx, request)


class ForkServices:
    """What a fork's contexts borrow (a worker's ``Services``): the model layer, circuit
    breakers shared through Redis, and their transitions appended as the worker does."""

    def __init__(self, log: EventLog, redis: aioredis.Redis, llm: LLM, settings: Settings) -> None:
        self._log = log
        self._redis = redis
        self._llm = llm
        self._settings = settings
        self._breakers: dict[str, CircuitBreaker] = {}

    @property
    def llm(self) -> LLM:
        return self._llm

    def breaker(self, name: str) -> CircuitBreaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = CircuitBreaker(
                self._redis,
                name,
                failure_threshold=self._settings.breaker_failure_threshold,
                reset_timeout=self._settings.breaker_reset_timeout,
            )
        return b

    async def record_transition(self, transition: Transition, *, run_id: UUID | None) -> None:
        log.warning(
            "circuit.transition",
            circuit=transition.name,
            from_state=transition.from_state.value,
            to_state=transition.to_state.value,
        )
        await self._log.append(
            circuit_stream(transition.name),
            [NewEvent(body=transition_event(transition), run_id=run_id, producer="breaker")],
        )


# -- checks before anything is written -------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ForkPlan:
    """A fork that passed every check: the parent, where it branches, the agents it needs."""

    parent: RunRecord
    at: int
    agents: dict[str, Agent]


async def plan_fork(log: EventLog, run_id: UUID, at: int, agents: Sequence[Agent]) -> ForkPlan:
    """Check a fork before anything is written: the run exists (:class:`UnknownRun`), ``at``
    is one of its steps (:class:`StepOutOfRange`), the app defines each of its agents
    (:class:`AgentMissing`)."""
    record = await load_run(log, run_id)
    record.locate(at)
    by_name = {a.name: a for a in agents}
    missing = sorted({a.agent for a in record.activations} - set(by_name))
    if missing:
        raise AgentMissing(
            f"run {run_id} needs agent(s) {', '.join(missing)}, which the app does not define "
            f"(it defines: {', '.join(sorted(by_name)) or 'none'})"
        )
    if not record.activations:
        raise StepOutOfRange(f"run {run_id} has no activation to fork")
    return ForkPlan(record, at, by_name)


# -- the report ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ForkedActivation:
    """One activation of the fork: which steps were the parent's and which ran live."""

    agent: str
    activation_id: UUID
    trigger_id: UUID
    trigger_type: str
    #: The parent's matching activation (None: the parent had none).
    parent_activation_id: UUID | None
    first_step: int
    #: Run-level numbers of the steps answered with the parent's results.
    reused: list[int]
    #: Run-level numbers of the steps that called a model or a tool.
    live: list[int]
    outcome: str
    emitted: list[UUID]
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ForkReport:
    """What ``agentrt fork`` prints."""

    run_id: UUID
    parent_run_id: UUID
    at_step: int
    change: dict[str, Any]
    activations: list[ForkedActivation]
    #: The live part: model calls, tool calls, tokens and dollars (reused steps cost nothing).
    model_calls: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(dataclasses.asdict(self))
        return data


# -- running the fork ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    """An activation to run: an agent and its trigger (the root, or an emitted event)."""

    agent: Agent
    event: NewEvent


def _deliverable(event: NewEvent) -> bool:
    return event_type_of(event.body) not in BOOKKEEPING


def _subscribers(agents: Mapping[str, Agent], body: Event, *, ingress: bool) -> list[Agent]:
    """Who handles the event: the relay's rule (the app's agents subscribed to its type
    whose filters it passes, in the app's order), and for an ingress event only agents
    that read the ingress streams."""
    event_type = event_type_of(body)
    return [
        a
        for a in agents.values()
        if event_type in a.subscribed_types()
        and (a.reads_ingress or not ingress)
        and a.accepts(event_type, body)
    ]


class _Fork:
    """One fork: its activations, run one after the other, and what its commit will write.

    Nothing is written until every activation has run; then ONE transaction
    appends, in the order a worker would have committed them, each activation's
    steps (``act-<id>``) and its outputs (the run stream, ``run.forked`` and the
    trigger first), and every activation's inbox row. So a relay beside the fork
    sees the fork's events only once each of their activations is marked handled:
    a worker given one finds it committed (a duplicate) instead of running it
    again with the parent's settings, as it did for one fork in five before, when
    each activation committed on its own. A fork that stops halfway (a crash, a
    server gone) leaves nothing but the circuit transitions its tools caused.
    """

    def __init__(self, log: EventLog, plan: ForkPlan, services: ForkServices, change: Change):
        self.log = log
        self.plan = plan
        self.services = services
        self.change = change
        self.run_id = new_event_id()
        self.next_step = 1
        #: agent -> the parent's activations of it, in commit order.
        self.parent_of: dict[str, list[RecordedActivation]] = collections.defaultdict(list)
        for a in plan.parent.activations:
            self.parent_of[a.agent].append(a)
        self.ordinal: collections.Counter[str] = collections.Counter()
        self.report: list[ForkedActivation] = []
        self.usage = [0, 0, 0, 0, 0.0]  # live: model calls, tool calls, tokens in, out, usd
        #: Tokens and dollars of the fork's steps so far (the budget check's run spend).
        self.spent: tuple[int, float] = (0, 0.0)
        #: The appends of the commit, in order: (stream, events, expected version).
        self.writes: list[tuple[str, list[NewEvent], int]] = []
        self.versions: dict[str, int] = collections.Counter()
        #: The events the commit will write, in order, as the log will hold them (but for
        #: position, transaction and hashes): what ``ctx.state`` folds.
        self.planned: list[RecordedEvent] = []
        self.index: dict[UUID, int] = {}
        self.inbox: list[tuple[str, UUID, UUID, str, UUID]] = []

    def trigger(self) -> NewEvent:
        root = self.plan.parent.root
        return NewEvent(
            body=self.change.body or root.body,
            event_id=self.run_id,
            run_id=self.run_id,
            causation_id=None,
            producer=root.producer,
        )

    def forked(self) -> NewEvent:
        c = self.change
        body = RunForked(
            parent_run_id=self.plan.parent.run_id,
            at_step=self.plan.at,
            trigger_id=self.run_id,
            model=c.model,
            tier=c.tier,
            prompt=c.prompt,
            input_changed=c.body is not None,
        )
        return NewEvent(body=body, run_id=self.run_id, producer="fork")

    def match(self, agent: str, trigger_type: str) -> RecordedActivation | None:
        """The parent's activation this one stands for: the same agent and ordinal, and
        a trigger of the same type."""
        k = self.ordinal[agent]
        self.ordinal[agent] += 1
        mine = self.parent_of.get(agent, [])
        if k < len(mine) and mine[k].trigger.event_type == trigger_type:
            return mine[k]
        return None

    def write(self, stream: str, events: list[NewEvent]) -> None:
        """Add an append to the commit, and its events to what later activations fold."""
        if not events:
            return
        self.writes.append((stream, events, self.versions[stream]))
        for e in events:
            self.versions[stream] += 1
            self.index[e.event_id] = len(self.planned)
            body = e.body
            self.planned.append(
                RecordedEvent(len(self.planned) + 1, 0, e.event_id, stream, self.versions[stream],
                              event_type_of(body), type(body).__schema_version__, e.run_id,
                              e.causation_id, e.producer, e.recorded_at, e.trace, body, b"", b"")
            )  # fmt: skip

    async def run(self) -> ForkReport:
        root = self.trigger()
        head = [self.forked(), root]
        ingress = (root.producer or "").startswith("ingress:")
        queue = collections.deque(
            _Pending(a, root) for a in _subscribers(self.plan.agents, root.body, ingress=ingress)
        )
        if not queue:
            self.write(run_stream(self.run_id), head)
        while queue:
            item = queue.popleft()
            outputs = await self.activation(item, head)
            head = []
            for event in outputs:
                if _deliverable(event):
                    for a in _subscribers(self.plan.agents, event.body, ingress=False):
                        queue.append(_Pending(a, event))
        await self.commit()
        calls, tools, tin, tout, usd = self.usage
        return ForkReport(
            run_id=self.run_id,
            parent_run_id=self.plan.parent.run_id,
            at_step=self.plan.at,
            change={
                "model": self.change.model,
                "tier": self.change.tier,
                "prompt": self.change.prompt,
                "input_changed": self.change.body is not None,
            },
            activations=self.report,
            model_calls=int(calls),
            tool_calls=int(tools),
            input_tokens=int(tin),
            output_tokens=int(tout),
            cost_usd=round(float(usd), 10),
        )

    async def commit(self) -> None:
        """Everything in one transaction: the appends in order, then the inbox rows."""
        inbox = f'"{self.log.schema}".inbox'
        async with self.log.pool.acquire() as conn, conn.transaction():
            for stream, events, expected in self.writes:
                await self.log.append(stream, events, expected, conn=conn)
            await conn.executemany(
                f"INSERT INTO {inbox} (consumer, event_id, activation_id, outcome, run_id) "
                "VALUES ($1, $2, $3, $4, $5)",
                self.inbox,
            )

    async def activation(self, item: _Pending, head: list[NewEvent]) -> list[NewEvent]:
        """Run one activation and add it to the commit (after ``head``: the run's first
        events); its outputs."""
        agent, event = item.agent, item.event
        trigger_type = event_type_of(event.body)
        aid = activation_id_for(agent.name, event.event_id)
        parent = self.match(agent.name, trigger_type)
        steps = ForkSteps(
            activation_id=aid,
            run_id=self.run_id,
            agent=agent.name,
            trigger_id=event.event_id,
            first_step=self.next_step,
            at=self.plan.at,
            parent=parent.steps if parent is not None else {},
        )
        trigger = Trigger(
            event_id=event.event_id,
            type=trigger_type,
            run_id=self.run_id,
            causation_id=event.causation_id,
            producer=event.producer,
            body=event.body,
            stream=FORK_STREAM,
            entry_id="-",
        )
        history: list[RecordedEvent] = []
        if event.event_id != self.run_id:
            # The worker's rule: the run's events committed before the trigger.
            history = self.planned[: self.index[event.event_id]]
        error: str | None = None
        with structlog.contextvars.bound_contextvars(
            agent=agent.name, run_id=str(self.run_id), activation_id=str(aid)
        ):
            try:
                result = await activate(
                    agent,
                    trigger,
                    activation_id=aid,
                    steps=steps,
                    services=self.services,
                    history=history,
                    spent=self.spent,
                )
                outcome, outputs, emitted = result.outcome, result.outputs, result.emitted
            except Exception as exc:
                # The handler failed where the parent did not (or did again): recorded
                # in the fork as a dead letter; the fork goes on with the others.
                error = f"{type(exc).__name__}: {exc}"
                outcome, emitted = "dead_lettered", []
                outputs = [self.dead_letter(agent, aid, event, trigger_type, exc)]
        taken = [steps.recorded[n] for n in range(1, steps.count + 1) if n in steps.recorded]
        self.write(
            activation_stream(aid),
            [NewEvent(body=s, run_id=self.run_id, causation_id=event.event_id,
                      producer=agent.name, recorded_at=steps.taken_at.get(s.step, utcnow()))
             for s in taken],
        )  # fmt: skip
        self.write(run_stream(self.run_id), [*head, *outputs])
        self.inbox.append((agent.name, event.event_id, aid, outcome, self.run_id))
        self.account(steps, taken)
        self.report.append(
            ForkedActivation(
                agent=agent.name,
                activation_id=aid,
                trigger_id=event.event_id,
                trigger_type=trigger_type,
                parent_activation_id=parent.activation_id if parent is not None else None,
                first_step=steps.first_step,
                reused=[steps.run_step(n) for n in steps.copied],
                live=[steps.run_step(n) for n in steps.live],
                outcome=outcome,
                emitted=[e.event_id for e in emitted],
                error=error,
            )
        )
        self.next_step += steps.count
        return outputs

    def dead_letter(
        self, agent: Agent, aid: UUID, event: NewEvent, trigger_type: str, exc: Exception
    ) -> NewEvent:
        code = str(exc.code) if isinstance(exc, AgentrtError) else None
        body = ActivationDeadLettered(
            agent=agent.name,
            activation_id=aid,
            trigger_id=event.event_id,
            trigger_type=trigger_type,
            stream=FORK_STREAM,
            entry_id="-",
            deliveries=1,
            error_type=type(exc).__name__,
            error=str(exc),
            error_code=code,
        )
        return NewEvent(
            body=body, run_id=self.run_id, causation_id=event.event_id, producer=agent.name
        )

    def account(self, steps: ForkSteps, taken: list[StepRecorded]) -> None:
        """The live steps' calls and usage; every step's usage into the run's spend."""
        tokens, usd = self.spent
        for record in taken:
            if record.usage is not None:
                tokens += record.usage.tokens
                usd += record.usage.cost_usd
        self.spent = (tokens, usd)
        for n in steps.live:
            record = steps.recorded[n]
            if record.kind == "llm":
                self.usage[0] += 1
            else:
                self.usage[1] += 1
            if record.usage is not None:
                self.usage[2] += record.usage.input_tokens
                self.usage[3] += record.usage.output_tokens
                self.usage[4] += record.usage.cost_usd


async def fork(
    log: EventLog, plan: ForkPlan, *, services: ForkServices, change: Change
) -> ForkReport:
    """Run the fork :func:`plan_fork` checked and commit it: a new run, whole or not at all.

    ``services.llm`` should be a :class:`ForkLLM` with the same ``at`` and ``change``
    (the change applies to model requests there)."""
    return await _Fork(log, plan, services, change).run()


async def fork_live(
    log: EventLog, plan: ForkPlan, change: Change, settings: Settings, *, redis_attempts: int = 5
) -> ForkReport:
    """Run a checked fork with this process's servers (``agentrt fork`` and the run
    explorer): a Redis connection (the tools' circuit breakers are shared with the
    workers) and the model client (the offline model without an API key)."""
    # Imported here: the model SDK comes with them, and planning a fork needs neither.
    from runtime.llm.client import model_client
    from runtime.streams.keys import connect_redis

    redis = await connect_redis(settings.require_redis_url(), attempts=redis_attempts)
    try:
        async with model_client(settings) as mc:
            llm = ForkLLM(mc.client, settings, offline=mc.offline, at=plan.at, change=change)
            services = ForkServices(log, redis, llm, settings)
            return await fork(log, plan, services=services, change=change)
    finally:
        await redis.aclose()
