"""Generated logs for the built-in projections' tests: runs with steps (retries, usage,
response-cache hits), emitted events, dead letters, redrives, approvals, budget stops,
circuit transitions, forks and state machine transitions (allowed and refused), several
runs interleaved, appended with real builtin event bodies."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import msgspec
from hypothesis import strategies as st

from runtime.agents.agent import Agent
from runtime.agents.context import activation_id_for
from runtime.agents.machine import StateMachine
from runtime.events.builtin import (
    ActivationCompleted,
    ActivationDeadLettered,
    ApprovalDecided,
    ApprovalRequested,
    CircuitTransitioned,
    DeadLetterRedriven,
    RunBudgetExceeded,
    RunForked,
    StateTransitioned,
    StateTransitionRefused,
    StepRecorded,
)
from runtime.events.ids import run_stream
from runtime.events.model import Event, NewEvent, RecordedEvent
from runtime.events.values import AttemptRecord, StepError, StepRef, Usage
from runtime.log.store import EventLog


class Received(Event, tag="bt.received"):
    source: str
    n: int


class Noted(Event, tag="bt.noted"):
    n: int


class Never(Event, tag="bt.never"):
    """Never appended: what the stateful test agents subscribe to."""


class _Quiet(Agent):
    async def handle(self, event: Any, ctx: Any) -> None:
        return None


class Alpha(_Quiet):
    name = "alpha"
    subscribes = (Received,)


class Beta(_Quiet):
    name = "beta"
    subscribes = (Noted,)
    reads_ingress = False


class Counter(_Quiet):
    """Stateful, JSON-exact: counts the run's events by type."""

    name = "counter"
    subscribes = (Never,)
    state_type = dict[str, int]

    def initial_state(self) -> dict[str, int]:
        return {}

    def evolve(self, state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        return {**state, event.event_type: state.get(event.event_type, 0) + 1}


class Box:
    """A state msgspec cannot encode: the agent-state fold must refold it from the log."""

    def __init__(self, items: tuple[str, ...] = ()) -> None:
        self.items = items

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and other.items == self.items

    __hash__ = None  # type: ignore[assignment]


class Boxer(_Quiet):
    name = "boxer"
    subscribes = (Never,)

    def initial_state(self) -> Box:
        return Box()

    def evolve(self, state: Box, event: RecordedEvent) -> Box:
        return Box((*state.items[-3:], event.event_type))


class Flow(StateMachine, _Quiet):
    """A state machine: its state is folded (agent state) and projected (machines)."""

    name = "flow"
    subscribes = (Never,)
    initial = "intake"
    transitions: ClassVar[dict[str, tuple[str, ...]]] = {
        "intake": ("research",),
        "research": ("draft",),
        "draft": ("research", "done"),
    }


FLOW_STATES = ("intake", "research", "draft", "done")

AGENTS: list[Agent] = [Alpha(), Beta(), Counter(), Boxer(), Flow()]
MODELS = ("claude-small", "claude-large")
ERRORS = ("StepFailed", "HandlerTimeout", "RetriesExhausted", "ConnectionError")

# One op: (kind, run index, a, b, c) with small ints the interpreter reads as it needs.
op = st.tuples(
    st.sampled_from(
        [
            "activate",
            "activate",
            "activate",
            "dead",
            "redrive",
            "ask",
            "decide",
            "budget",
            "circuit",
            "fork",
            "emit_root",
            "move",
        ]
    ),
    st.integers(0, 2),
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(0, 1000),
)
ops = st.lists(op, min_size=1, max_size=30)


@dataclasses.dataclass
class _Run:
    run_id: uuid.UUID
    root_in_log: bool = False
    #: Events waiting for an agent: (agent, trigger id, trigger type).
    pending: list[tuple[str, uuid.UUID, str]] = dataclasses.field(default_factory=list)
    generations: dict[tuple[str, uuid.UUID], int] = dataclasses.field(default_factory=dict)
    dead: list[tuple[str, uuid.UUID, str]] = dataclasses.field(default_factory=list)
    approvals: list[uuid.UUID] = dataclasses.field(default_factory=list)
    #: Where the run's ``flow`` machine is.
    flow: str = "intake"


class Generator:
    """Turns ops into appends. Run ids are fresh per generator (uuid4 from a seeded
    Random would do as well; uniqueness is what matters across examples)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.runs: list[_Run] = []
        self.at = datetime(2026, 1, 1, 22, tzinfo=UTC)
        self.count = 0

    def _tick(self) -> datetime:
        self.at += timedelta(hours=5, minutes=7)
        return self.at

    def _new(self, body: Event, run: _Run, **kw: Any) -> NewEvent:
        return NewEvent(body=body, run_id=run.run_id, recorded_at=self._tick(), **kw)

    def _run(self, i: int) -> _Run:
        while len(self.runs) <= i:
            rid = uuid.uuid4()
            run = _Run(rid)
            run.pending.append(("alpha", rid, "bt.received"))
            self.runs.append(run)
        return self.runs[i]

    async def _append(self, stream: str, events: list[NewEvent]) -> None:
        await self.log.append(stream, events)
        self.count += len(events)

    def _root(self, run: _Run, n: int) -> NewEvent:
        run.root_in_log = True
        return NewEvent(
            body=Received(source=f"src{n % 2}", n=n),
            event_id=run.run_id,
            run_id=run.run_id,
            producer="ingress:test",
            recorded_at=self._tick(),
        )

    async def apply(self, ops: list[tuple[str, int, int, int, int]]) -> None:
        for kind, r, a, b, c in ops:
            await getattr(self, f"_{kind}")(self._run(r), a, b, c)

    async def _emit_root(self, run: _Run, a: int, b: int, c: int) -> None:
        if not run.root_in_log:
            await self._append(run_stream(run.run_id), [self._root(run, c)])

    async def _activate(
        self, run: _Run, a: int, b: int, c: int, outcome: str = "completed"
    ) -> None:
        if not run.pending:
            return
        agent, trigger, ttype = run.pending.pop(0)
        gen = run.generations.get((agent, trigger), 0)
        aid = activation_id_for(agent, trigger, gen)
        steps = []
        for n in range(1, a + 1):
            llm = (n + c) % 3 != 0
            attempts = [
                AttemptRecord(
                    attempt=k + 1,
                    reason="rate_limited",
                    error_type="RateLimited",
                    error="429",
                    delay=0.1,
                )
                for k in range((b + n) % 3)
            ]
            usage = None
            if llm:
                tokens = 17 * n + c
                usage = Usage(
                    model=MODELS[(c + n) % 2],
                    input_tokens=tokens,
                    output_tokens=tokens // 3,
                    cache_read_input_tokens=n,
                    cost_usd=tokens * 3.1e-6 + n * 1.7e-7,
                )
            error = StepError(type="ToolError", message="boom") if not llm and c % 5 == 0 else None
            # Some model steps are response-cache hits: no usage, the repeated call's saved.
            cached_from, saved = None, None
            if llm and (n + b) % 4 == 3:
                cached_from, saved, usage = StepRef(activation_id=aid, step=1), usage, None
            steps.append(
                NewEvent(
                    body=StepRecorded(
                        activation_id=aid,
                        agent=agent,
                        step=n,
                        kind="llm" if llm else "tool",
                        name="claude" if llm else "lookup_customer",
                        request_hash="h",
                        request={"n": n},
                        result={"ok": n},
                        error=error,
                        attempts=attempts,
                        usage=usage,
                        duration_ms=1.5 * n,
                        cached_from=cached_from,
                        saved=saved,
                    ),
                    run_id=run.run_id,
                    causation_id=trigger,
                    producer=agent,
                    recorded_at=self._tick(),
                )
            )
        if steps:
            await self._append(f"act-{aid}", steps)
        out: list[NewEvent] = []
        if trigger == run.run_id and not run.root_in_log:
            out.append(self._root(run, c))
        emitted = []
        if agent == "alpha" and outcome == "completed":
            for k in range(b % 3):
                e = self._new(Noted(n=k), run, causation_id=trigger, producer=agent)
                emitted.append(e.event_id)
                out.append(e)
                run.pending.append(("beta", e.event_id, "bt.noted"))
        out.append(
            self._new(
                ActivationCompleted(
                    agent=agent,
                    activation_id=aid,
                    trigger_id=trigger,
                    trigger_type=ttype,
                    steps=a,
                    emitted=emitted,
                    duration_ms=2.5 * (a + 1),
                    outcome=outcome,
                ),
                run,
                causation_id=trigger,
                producer=agent,
            )
        )
        await self._append(run_stream(run.run_id), out)

    async def _dead(self, run: _Run, a: int, b: int, c: int) -> None:
        if not run.pending:
            return
        agent, trigger, ttype = run.pending.pop(0)
        gen = run.generations.get((agent, trigger), 0)
        err = ERRORS[(a + c) % len(ERRORS)]
        body = ActivationDeadLettered(
            agent=agent,
            activation_id=activation_id_for(agent, trigger, gen),
            trigger_id=trigger,
            trigger_type=ttype,
            stream=f"agentrt:agent:{agent}",
            entry_id=f"{c}-{b}",
            deliveries=3,
            error_type=err,
            error=f"{err}: failed at {c}",
            error_code="step_failed" if err == "StepFailed" else None,
        )
        await self._append(
            run_stream(run.run_id), [self._new(body, run, causation_id=trigger, producer=agent)]
        )
        run.dead.append((agent, trigger, ttype))

    async def _redrive(self, run: _Run, a: int, b: int, c: int) -> None:
        if not run.dead:
            return
        agent, trigger, ttype = run.dead.pop(0)
        gen = run.generations.get((agent, trigger), 0) + 1
        run.generations[(agent, trigger)] = gen
        body = DeadLetterRedriven(
            agent=agent,
            trigger_id=trigger,
            dead_letter_id=f"{c}-0",
            generation=gen,
            to_stream=f"agentrt:agent:{agent}",
            forced=b == 3,
        )
        await self._append(
            run_stream(run.run_id),
            [self._new(body, run, causation_id=trigger, producer="operator")],
        )
        run.pending.insert(0, (agent, trigger, ttype))

    async def _ask(self, run: _Run, a: int, b: int, c: int) -> None:
        approval = uuid.uuid4()
        run.approvals.append(approval)
        body = ApprovalRequested(approval_id=approval, agent="alpha", subject=f"refund {c}")
        await self._append(
            run_stream(run.run_id),
            [self._new(body, run, causation_id=run.run_id, producer="alpha")],
        )

    async def _decide(self, run: _Run, a: int, b: int, c: int) -> None:
        if not run.approvals:
            return
        approval = run.approvals.pop(0)
        body = ApprovalDecided(
            approval_id=approval, approved=a % 2 == 0, by=f"user{b}", comment="ok" if a else ""
        )
        await self._append(
            run_stream(run.run_id), [self._new(body, run, producer=f"human:user{b}")]
        )

    async def _budget(self, run: _Run, a: int, b: int, c: int) -> None:
        if not run.pending:
            return
        agent, trigger, _ = run.pending[0]
        aid = activation_id_for(agent, trigger, run.generations.get((agent, trigger), 0))
        body = RunBudgetExceeded(
            agent=agent,
            activation_id=aid,
            step=a + 1,
            spent_tokens=c,
            spent_usd=c * 1e-5,
            requested_tokens=100,
            requested_usd=0.01,
            budget_tokens=1000,
        )
        # The budget stop goes in with the activation's completion (outcome budget_exceeded).
        await self._append(
            run_stream(run.run_id), [self._new(body, run, causation_id=trigger, producer=agent)]
        )
        await self._activate(run, 0, b, c, outcome="budget_exceeded")

    async def _circuit(self, run: _Run, a: int, b: int, c: int) -> None:
        states = ("closed", "open", "half_open")
        body = CircuitTransitioned(
            name=f"tool{b % 2}",
            from_state=states[a % 3],
            to_state=states[(a + 1) % 3],
            failures=c % 7,
            reason="errors" if c % 2 else "",
        )
        await self._append(
            f"circuit-tool{b % 2}",
            [
                NewEvent(
                    body=body,
                    run_id=run.run_id if c % 3 else None,
                    producer="breaker",
                    recorded_at=self._tick(),
                )
            ],
        )

    async def _move(self, run: _Run, a: int, b: int, c: int) -> None:
        """``flow`` asks for a transition: allowed ones move it, the others are refused."""
        to = FLOW_STATES[a]
        allowed = Flow().allowed(run.flow)
        body: Event
        if to in allowed:
            body = StateTransitioned(agent="flow", from_state=run.flow, to_state=to,
                                     reason=f"r{c}" if c % 2 else "")  # fmt: skip
            run.flow = to
        else:
            body = StateTransitionRefused(agent="flow", from_state=run.flow, to_state=to,
                                          allowed=list(allowed))  # fmt: skip
        await self._append(
            run_stream(run.run_id), [self._new(body, run, causation_id=run.run_id, producer="flow")]
        )

    async def _fork(self, run: _Run, a: int, b: int, c: int) -> None:
        child = self._run(len(self.runs))
        body = RunForked(
            parent_run_id=run.run_id,
            at_step=a + 1,
            trigger_id=child.run_id,
            model=MODELS[b % 2] if b else None,
            input_changed=c % 2 == 0,
        )
        await self._append(run_stream(child.run_id), [self._new(body, child, producer="operator")])


def dump(value: Any) -> Any:
    """A row value in a comparable form (JSON text as parsed JSON)."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            return value
    return value


#: For ``--app tests.projections.builtin_gen`` (the projector's agents).
agents = AGENTS
