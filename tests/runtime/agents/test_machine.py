"""State machine agents without servers: the declaration's checks, ``ctx.transition``
against the folded state, what an activation commits for an allowed, a caught and an
uncaught refused transition."""

from __future__ import annotations

import enum
import re
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec
import pytest

from runtime import (
    Agent,
    Context,
    Event,
    InvalidTransition,
    MachineState,
    RecordedEvent,
    StateMachine,
    StateTransitioned,
    StateTransitionRefused,
)
from runtime.agents.context import Trigger
from runtime.agents.loading import validate
from runtime.effects.steps import Steps
from runtime.errors import AppLoadError, ErrorCode
from runtime.events.builtin import ActivationCompleted
from runtime.events.model import event_type_of
from runtime.worker.activation import activate
from tests.runtime.worker.test_activation import NoServices


class Phase(enum.StrEnum):
    INTAKE = "intake"
    RESEARCH = "research"
    DRAFT = "draft"
    DONE = "done"


class Poked(Event, tag="test.machine.poked"):
    to: str
    catch: bool = False


class Noted(Event, tag="test.machine.noted"):
    n: int


class Desk(StateMachine):
    name = "desk"
    subscribes = (Poked,)
    states = Phase
    initial = Phase.INTAKE
    transitions: ClassVar[dict[Any, Any]] = {
        Phase.INTAKE: {Phase.RESEARCH},
        Phase.RESEARCH: {Phase.DRAFT},
        Phase.DRAFT: {Phase.RESEARCH, Phase.DONE},
    }

    async def handle(self, event: Poked, ctx: Context) -> None:
        ctx.emit(Noted(n=1))  # before the transition: it still commits after it
        try:
            ctx.transition(event.to, reason="poked")
        except InvalidTransition:
            if not event.catch:
                raise
        ctx.emit(Noted(n=2))


def _recorded(body: Event, run_id: uuid.UUID, n: int) -> RecordedEvent:
    return RecordedEvent(
        n, 1, uuid.uuid4(), f"run-{run_id}", n, event_type_of(body), 1, run_id, None, "desk",
        datetime.now(UTC), None, body, b"", b"",
    )  # fmt: skip


async def _activate(agent: Agent, body: Poked, history: list[Event]) -> Any:
    run_id = uuid.uuid4()
    trigger = Trigger(event_id=uuid.uuid4(), type=event_type_of(body), run_id=run_id,
                      causation_id=run_id, producer="desk", body=body, stream="-",
                      entry_id="-")  # fmt: skip
    aid = uuid.uuid4()
    steps = Steps(None, activation_id=aid, run_id=run_id, agent=agent.name,
                  trigger_id=trigger.event_id, recorded={})  # fmt: skip
    events = [_recorded(b, run_id, n) for n, b in enumerate(history, 1)]
    return await activate(agent, trigger, activation_id=aid, steps=steps, services=NoServices(),
                          history=events)  # fmt: skip


def moved(a: str, b: str) -> StateTransitioned:
    return StateTransitioned(agent="desk", from_state=a, to_state=b, reason="poked")


async def test_an_allowed_transition_is_checked_against_the_folded_state() -> None:
    # The log says research (two transitions ago): research -> draft is allowed.
    result = await _activate(Desk(), Poked(to="draft"), [moved("intake", "research")])
    assert result.outcome == "completed"
    bodies = [e.body for e in result.outputs]
    # The transition leads the activation's events, ahead of what was emitted before it.
    assert bodies[:3] == [moved("research", "draft"), Noted(n=1), Noted(n=2)]
    assert isinstance(bodies[3], ActivationCompleted)
    assert bodies[3].emitted == [e.event_id for e in result.emitted]
    # From the initial state the same request is refused: the fold decides, not the request.
    refused = await _activate(Desk(), Poked(to="draft"), [])
    assert refused.outcome == "transition_refused"


async def test_a_caught_refusal_commits_with_the_rest_of_the_activation() -> None:
    result = await _activate(Desk(), Poked(to="done", catch=True), [moved("intake", "research")])
    assert result.outcome == "completed"
    bodies = [e.body for e in result.outputs[:-1]]
    refusal = StateTransitionRefused(
        agent="desk", from_state="research", to_state="done", allowed=["draft"], reason="poked"
    )
    assert bodies == [Noted(n=1), refusal, Noted(n=2)]


async def test_an_uncaught_refusal_ends_the_activation_with_only_the_refusal() -> None:
    history = [moved("intake", "research"), moved("research", "draft")]
    result = await _activate(Desk(), Poked(to="intake"), history)
    assert result.outcome == "transition_refused"
    assert result.emitted == []
    refusal, completed = (e.body for e in result.outputs)
    assert refusal == StateTransitionRefused(
        agent="desk", from_state="draft", to_state="intake", allowed=["done", "research"],
        reason="poked",
    )  # fmt: skip
    assert isinstance(completed, ActivationCompleted)
    assert completed.outcome == "transition_refused"


async def test_the_error_is_clear_and_catchable() -> None:
    trigger = Trigger(event_id=uuid.uuid4(), type="x", run_id=uuid.uuid4(), causation_id=None,
                      producer=None, body=Poked(to="x"), stream="-", entry_id="-")  # fmt: skip
    steps = Steps(None, activation_id=uuid.uuid4(), run_id=trigger.run_id, agent="desk",
                  trigger_id=trigger.event_id, recorded={})  # fmt: skip
    ctx = Context(agent=Desk(), trigger=trigger, activation_id=uuid.uuid4(), steps=steps,
                  services=NoServices(), history=[])  # fmt: skip
    assert ctx.state == MachineState(current="intake")
    with pytest.raises(InvalidTransition) as refused:
        ctx.transition(Phase.DONE)
    assert refused.value.code == ErrorCode.INVALID_TRANSITION == "invalid_transition"
    assert str(refused.value) == (
        "agent 'desk' refused the transition intake -> done: from intake it may go to research"
    )
    assert ctx.transition(Phase.RESEARCH) == "research"
    assert ctx.state == MachineState(current="research", previous="intake", transitions=1)
    assert ctx.transition("draft") == "draft"
    assert ctx.transition("done") == "done"
    with pytest.raises(InvalidTransition, match=r"may go to nowhere \(it is a final state\)"):
        ctx.transition("draft")
    assert Desk().final_states() == ("done",)


class Plain(Agent):
    name = "plain"
    subscribes = (Poked,)

    async def handle(self, event: Poked, ctx: Context) -> None:
        ctx.transition("anywhere")


async def test_transition_needs_a_state_machine() -> None:
    with pytest.raises(TypeError, match="is not a StateMachine"):
        await _activate(Plain(), Poked(to="x"), [])


def _machine(**attrs: Any) -> StateMachine:
    cls = type("M", (Desk,), {"name": "m", **attrs})
    return cls()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("attrs", "problem"),
    [
        ({"initial": ""}, "declares no initial state"),
        ({"initial": "limbo"}, "initial state 'limbo' is not one of its states"),
        ({"transitions": {}}, "declares no transitions"),
        ({"transitions": {"intake": {"nowhere"}}}, "name undeclared states ['nowhere']"),
        ({"transitions": {"intake": "research"}}, "must be a collection of states"),
        ({"transitions": [("intake", "research")]}, "must be a mapping"),
        ({"initial_state": lambda self: {"current": "intake"}}, "must return a MachineState"),
    ],
)
def test_a_bad_declaration_fails_at_load_time(attrs: dict[str, Any], problem: str) -> None:
    with pytest.raises(AppLoadError, match="state machine: .*" + re.escape(problem)):
        validate([_machine(**attrs)])


def test_a_good_declaration_loads_and_strings_work_as_states() -> None:
    class Words(StateMachine):
        name = "words"
        subscribes = (Poked,)
        initial = "a"
        transitions: ClassVar[dict[Any, Any]] = {"a": ["b"], "b": ("a", "c")}

        async def handle(self, event: Poked, ctx: Context) -> None:
            return None

    [w] = validate([Words()])
    assert w.state_names() == ("a", "b", "c")
    assert w.allowed("b") == ("a", "c") and w.final_states() == ("c",)
    assert validate([Desk()])[0].state_names() == ("intake", "research", "draft", "done")


class Counted(MachineState):
    drafts: int = 0


class Drafter(Desk):
    """Keeps more state beside the machine's: how many times it entered draft."""

    name = "drafter"

    def initial_state(self) -> Counted:
        return Counted(current="intake")

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        state = super().evolve(state, event)
        body = event.body
        if (
            isinstance(body, StateTransitioned)
            and body.agent == self.name
            and (body.to_state == "draft")
        ):
            state = msgspec.structs.replace(state, drafts=state.drafts + 1)
        return state


async def test_a_machine_state_subclass_keeps_its_fields_and_cannot_be_assigned() -> None:
    steps = [("intake", "research"), ("research", "draft"), ("draft", "research")]
    history = [msgspec.structs.replace(moved(a, b), agent="drafter") for a, b in steps]
    history.append(moved("research", "draft"))  # another machine's: not this one's state
    drafter = Drafter()
    state = drafter.initial_state()
    for e in [_recorded(b, uuid.uuid4(), n) for n, b in enumerate(history, 1)]:
        state = drafter.evolve(state, e)
    assert state == Counted(current="research", previous="draft", transitions=3, drafts=1)
    with pytest.raises(AttributeError):
        state.current = "done"  # type: ignore[misc]
    [d] = validate([drafter])
    assert d.state_decode_type() is Counted
