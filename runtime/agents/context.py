"""The handler's context: each call that touches the world is a durable step or a buffered event."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol
from uuid import UUID

import asyncpg
import msgspec
import structlog
from redis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from runtime.agents.agent import Agent
from runtime.agents.machine import MachineState, StateMachine, state_name
from runtime.effects.breaker import CircuitBreaker, Transition
from runtime.effects.steps import StepOutput, Steps, raise_if_failed
from runtime.effects.tools import Tool, ToolContext
from runtime.errors import (
    AgentrtError,
    AlreadyDecided,
    ApprovalNotFound,
    InvalidTransition,
    UnknownTool,
)
from runtime.events.builtin import (
    APPROVAL_DEADLINE,
    ApprovalRequested,
    CircuitTransitioned,
    StateTransitioned,
    StateTransitionRefused,
    TimerCancelled,
    TimerScheduled,
)
from runtime.events.model import Event, NewEvent, RecordedEvent, new_event_id
from runtime.events.values import StepError
from runtime.log import approvals
from runtime.log.store import EventLog
from runtime.ops.tracing import current_traceparent

if TYPE_CHECKING:
    from runtime.llm.calls import LLM, LLMResult

#: uuid5 namespace of activation ids.
ACTIVATION_NAMESPACE = uuid.UUID("6f1c3a52-5d0e-4c55-9a7e-2f4b8f0f6a11")


def activation_id_for(agent: str, trigger_id: UUID, generation: int = 0) -> UUID:
    """The same id for every delivery of one event to one agent (a redrive starts a new one)."""
    suffix = f"/{generation}" if generation else ""
    return uuid.uuid5(ACTIVATION_NAMESPACE, f"{agent}/{trigger_id}{suffix}")


class _FromStart:
    def __repr__(self) -> str:
        return "FROM_START"


#: ``state=`` for "fold the history from ``Agent.initial_state()``" (no snapshot).
FROM_START: Any = _FromStart()


class Services(Protocol):
    """What a context borrows from its worker."""

    @property
    def llm(self) -> LLM: ...

    def breaker(self, name: str) -> CircuitBreaker: ...

    async def record_transition(self, transition: Transition, *, run_id: UUID | None) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Trigger:
    """The event that started this activation, with its envelope."""

    event_id: UUID
    type: str
    run_id: UUID
    causation_id: UUID | None
    producer: str | None
    body: Event
    #: Where it came from: the Redis stream and entry id.
    stream: str
    entry_id: str


class Context:
    """What ``handle(event, ctx)`` uses for everything outside pure computation."""

    def __init__(
        self,
        *,
        agent: Agent,
        trigger: Trigger,
        activation_id: UUID,
        steps: Steps,
        services: Services,
        history: list[RecordedEvent],
        spent: tuple[int, float] | Callable[[], Awaitable[tuple[int, float]]] = (0, 0.0),
        state: Any = FROM_START,
    ) -> None:
        self.agent = agent
        self.trigger = trigger
        self.run_id = trigger.run_id
        self.activation_id = activation_id
        self.steps = steps
        self.services = services
        #: The run's events in the log before this activation (the trigger excluded)
        #: that ``state`` was folded from: after the nearest snapshot, when one was
        #: loaded (``ctx.state`` always covers the whole run).
        self.history = history
        if state is FROM_START:
            state = agent.initial_state()
        for event in history:
            state = agent.evolve(state, event)
        #: The run's folded state (``Agent.evolve`` over ``history``).
        self.state = state
        self._spent = spent
        self.emitted: list[NewEvent] = []
        self.log: FilteringBoundLogger = structlog.get_logger("agentrt.agent")
        self._activation_text = str(activation_id)
        self._scope: str | None = None
        #: ``state.transitioned`` events at the head of ``emitted`` (see ``transition``).
        self._moves = 0

    @property
    def _key_scope(self) -> str:
        """The idempotency keys' scope: the event's first activation (once per activation)."""
        if self._scope is None:
            self._scope = str(activation_id_for(self.agent.name, self.trigger.event_id))
        return self._scope

    async def run_spend(self) -> tuple[int, float]:
        """Tokens and dollars the run spent in other activations (read once, when needed)."""
        if not isinstance(self._spent, tuple):
            self._spent = await self._spent()
        return self._spent

    # -- events ---------------------------------------------------------------

    def emit(self, body: Event) -> UUID:
        """Add an event to the run; it commits with the activation, or not at all."""
        if not isinstance(body, Event):
            raise TypeError(f"emit() takes an agentrt Event, got {type(body).__name__}")
        event = NewEvent(
            body=body,
            event_id=new_event_id(),
            run_id=self.run_id,
            causation_id=self.trigger.event_id,
            producer=self.agent.name,
            # The activation's span: the subscribers' activations continue its trace.
            trace=current_traceparent(),
        )
        self.emitted.append(event)
        return event.event_id

    def transition(self, to: str | enum.Enum, *, reason: str = "") -> str:
        """Move the run's state machine to ``to`` (the agent is a :class:`~runtime.StateMachine`).

        Checked against ``ctx.state.current``, the state as the log records it
        (plus this activation's own transitions). An allowed transition records
        ``state.transitioned``, committed with the activation ahead of what it
        emits (so an event this activation emits is handled in the new state),
        and updates ``ctx.state``. Any other raises
        :class:`~runtime.errors.InvalidTransition` and records
        ``state.transition_refused``: catch it to go on (the refusal commits with
        the activation), or let it end the activation (outcome
        ``transition_refused``: only the refusal commits). Returns the new state.
        """
        machine = self.agent
        if not isinstance(machine, StateMachine):
            raise TypeError(f"agent {machine.name!r} is not a StateMachine: it has no states")
        state = self.state
        if not isinstance(state, MachineState):
            raise TypeError(
                f"agent {machine.name!r}: ctx.state is a {type(state).__name__}, not a "
                "MachineState (initial_state() must return one and evolve() must call "
                "super().evolve())"
            )
        target = state_name(to)
        allowed = machine.allowed(state.current)
        if target not in allowed:
            refused = StateTransitionRefused(agent=machine.name, from_state=state.current,
                                             to_state=target, allowed=list(allowed),
                                             reason=reason)  # fmt: skip
            self.emit(refused)
            raise InvalidTransition(machine.name, state.current, target, allowed, event=refused)
        moved = StateTransitioned(
            agent=machine.name, from_state=state.current, to_state=target, reason=reason
        )
        self.emit(moved)
        # Ahead of the activation's other events: a later activation triggered by one
        # of them folds the run's events before its trigger, this transition included.
        self.emitted.insert(self._moves, self.emitted.pop())
        self._moves += 1
        self.state = machine.advance(state, moved)
        return target

    def sleep_until(self, when: datetime, name: str = "timer", payload: Any = None) -> UUID:
        """Schedule a durable ``timer.fired`` for this agent at ``when`` (it survives restarts).

        The handler does not block: it returns, and the agent handles the
        ``timer.fired`` event (subscribe to :class:`~runtime.agent_events.TimerFired`).
        """
        if when.tzinfo is None:
            raise ValueError("sleep_until needs a timezone-aware datetime")
        timer_id = uuid.uuid5(self.activation_id, f"timer/{len(self.emitted)}/{name}")
        self.emit(
            TimerScheduled(
                timer_id=timer_id,
                agent=self.agent.name,
                name=name,
                due_at=when.astimezone(UTC),
                payload=payload,
            )
        )
        return timer_id

    def cancel_timer(self, timer_id: UUID) -> None:
        """Unschedule a timer of this agent's (``sleep_until``'s id): it will not fire.

        Recorded as ``timer.cancelled`` (it commits with the activation, or not at all);
        the relay drops the timer, and the run no longer waits for it. A timer that
        fired already is not taken back (its ``timer.fired`` is in the log).
        """
        self.emit(TimerCancelled(timer_id=timer_id, agent=self.agent.name))

    def request_approval(
        self,
        subject: str,
        details: Any = None,
        *,
        deadline: datetime | None = None,
        default: Literal["approve", "deny", "escalate"] | None = None,
        escalate_to: str | None = None,
    ) -> UUID:
        """Ask a human; the run resumes when an ``approval.decided`` with this id arrives.

        With a ``deadline`` (timezone-aware; ``await ctx.now()`` plus a delta), a
        durable timer applies ``default`` when it passes with no decision:
        ``approve`` or ``deny`` record the ``approval.decided`` (``by="deadline"``;
        a human's later answer is refused, as a second answer always is), and
        ``escalate`` sends an ``approval.escalated`` to the agent ``escalate_to``.
        """
        if (deadline is None) != (default is None):
            raise ValueError("request_approval: give both deadline and default, or neither")
        if default is not None and default not in ("approve", "deny", "escalate"):
            raise ValueError(f"request_approval: default must be approve, deny or escalate, "
                             f"not {default!r}")  # fmt: skip
        if (default == "escalate") != (escalate_to is not None):
            raise ValueError("request_approval: escalate_to goes with default='escalate'")
        if deadline is not None and deadline.tzinfo is None:
            raise ValueError("request_approval needs a timezone-aware deadline")
        approval_id = uuid.uuid5(self.activation_id, f"approval/{len(self.emitted)}")
        due = None if deadline is None else deadline.astimezone(UTC)
        self.emit(
            ApprovalRequested(
                approval_id=approval_id,
                agent=self.agent.name,
                subject=subject,
                details=details,
                deadline=due,
                default=default,
                escalate_to=escalate_to,
            )
        )
        if due is not None:
            # The relay applies the default when this fires (runtime.log.approvals).
            self.sleep_until(due, APPROVAL_DEADLINE, payload={"approval_id": str(approval_id)})
        return approval_id

    async def decide_approval(
        self, approval_id: UUID, *, approved: bool, comment: str = ""
    ) -> bool:
        """Decide an approval as this agent (``by="agent:<name>"``): what the target of an
        escalation does. A durable step (a retry does not decide again); True if this is
        the approval's decision, False if someone decided first (that one stands)."""
        by = f"agent:{self.agent.name}"

        async def decide() -> StepOutput:
            log = getattr(self.services, "log", None)
            if not isinstance(log, EventLog):
                raise RuntimeError("deciding an approval needs a worker's event log")
            try:
                await approvals.decide(log, approval_id, approved=approved, by=by,
                                       comment=comment, producer=self.agent.name)  # fmt: skip
            except AlreadyDecided as exc:
                return StepOutput(result={"decided": False, "approved": exc.approved,
                                          "by": exc.by})  # fmt: skip
            except ApprovalNotFound as exc:
                error = StepError(type=type(exc).__name__, message=str(exc), code=str(exc.code))
                return StepOutput(error=error)
            return StepOutput(result={"decided": True, "approved": approved, "by": by})

        request = {"approval_id": str(approval_id), "approved": approved, "comment": comment}
        record = await self.steps.run("approval", "decide", request, decide)
        raise_if_failed(record)
        return bool(record.result["decided"])

    async def now(self) -> datetime:
        """The current time, as a durable step: a retry or a replay gets the recorded time
        back, so what the handler derives from it (a deadline, a timer) stays the same."""

        async def read() -> StepOutput:
            return StepOutput(result=datetime.now(UTC).isoformat())

        record = await self.steps.run("clock", "now", None, read)
        return datetime.fromisoformat(record.result)

    # -- steps ----------------------------------------------------------------

    async def llm(self, prompt: Any = None, /, **options: Any) -> LLMResult[Any]:
        """A model call (tools and reflection included, as steps): :meth:`runtime.llm.LLM.call`."""
        return await self.services.llm.call(self, prompt, **options)

    async def tool(
        self,
        tool: Tool[..., Any] | str,
        /,
        input: Mapping[str, Any] | None = None,
        *,
        wait_for_circuit: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call a tool as a durable step and return its typed result.

        Input is validated first (:class:`~runtime.errors.ToolInputError`).
        An open circuit fails fast with :class:`~runtime.errors.CircuitOpen`
        (nothing is recorded: the tool was not called), or waits up to
        ``wait_for_circuit`` seconds for it to close.
        """
        t = self.resolve_tool(tool)
        raw = dict(input) if input is not None else kwargs
        params = t.parse_input(raw)
        request = msgspec.to_builtins(params, str_keys=True)
        return await self.tool_step(t, request, wait_for_circuit=wait_for_circuit, params=params)

    def resolve_tool(self, tool: Tool[..., Any] | str) -> Tool[..., Any]:
        if isinstance(tool, Tool):
            return tool
        for t in self.agent.tools:
            if t.name == tool:
                return t
        raise UnknownTool(tool, tuple(t.name for t in self.agent.tools))

    async def tool_step(
        self,
        t: Tool[..., Any],
        request: Any,
        *,
        wait_for_circuit: float | None = None,
        params: msgspec.Struct | None = None,
    ) -> Any:
        """Run an already validated tool request as a step; the typed result.

        ``params``: ``request`` parsed already (saves parsing it again)."""

        def call() -> Awaitable[StepOutput]:
            return self._call_tool(t, request, wait_for_circuit, params)

        record = await self.steps.run("tool", t.name, request, call)
        raise_if_failed(record)
        return t.decode_output(record.result)

    async def _call_tool(
        self, t: Tool[..., Any], request: Any, wait: float | None, params: msgspec.Struct | None
    ) -> StepOutput:
        breaker = self.services.breaker(t.name)
        permit = await (breaker.before_call() if wait is None else breaker.acquire(wait))
        if permit.transition is not None:
            await self.services.record_transition(permit.transition, run_id=self.run_id)
        # Keyed by the event's first activation: a redrive (a new activation of
        # the same event) sends the original's key, so an idempotent tool
        # answers with its earlier result instead of acting again.
        step = self.steps.count

        def context() -> ToolContext:
            return ToolContext.for_step(self.run_id, self._activation_text, step,
                                        key_scope=self._key_scope)  # fmt: skip

        try:
            data = await t.call(t.parse_input(request) if params is None else params, context)
        except asyncio.CancelledError:
            await breaker.release(permit)
            raise
        except Exception as exc:  # the tool's failure is its step's recorded result
            await self._bookkeeping(breaker.record_failure(permit))
            code = str(exc.code) if isinstance(exc, AgentrtError) else None
            return StepOutput(error=StepError(type=type(exc).__name__, message=str(exc), code=code))
        await self._bookkeeping(breaker.record_success(permit))
        return StepOutput(result=data)

    async def _bookkeeping(self, report: Awaitable[Transition | None]) -> None:
        """The breaker's count and transition event, after the call: never at the cost of
        the step's record (losing it would run the tool again on retry)."""
        try:
            transition = await report
            if transition is not None:
                await self.services.record_transition(transition, run_id=self.run_id)
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.log.warning("breaker.bookkeeping_failed", error=f"{type(exc).__name__}: {exc}")


def transition_event(transition: Transition) -> CircuitTransitioned:
    return CircuitTransitioned(
        name=transition.name,
        from_state=transition.from_state.value,
        to_state=transition.to_state.value,
        failures=transition.failures,
    )
