"""State machines: an agent that declares its states and transitions; ``ctx.transition`` moves it.

::

    class Review(enum.StrEnum):
        INTAKE = "intake"
        RESEARCH = "research"
        DRAFT = "draft"
        REVIEW = "review"
        COMPLETE = "complete"
        FAILED = "failed"

    class Reviewer(StateMachine):
        name = "reviewer"
        subscribes = (TicketOpened, DraftWritten)
        states = Review
        initial = Review.INTAKE
        transitions = {
            Review.INTAKE: {Review.RESEARCH, Review.FAILED},
            Review.RESEARCH: {Review.DRAFT, Review.FAILED},
            Review.DRAFT: {Review.REVIEW},
            Review.REVIEW: {Review.DRAFT, Review.COMPLETE, Review.FAILED},
        }

        async def handle(self, event, ctx):
            if ctx.state.current == Review.INTAKE:
                ctx.transition(Review.RESEARCH, reason="new ticket")

The run's current state is ``ctx.state.current`` (a :class:`MachineState`), the
fold of the run's ``state.transitioned`` events of this agent, so it is the
state as the log records it: across activations, workers and replays. A
transition the agent does not declare raises
:class:`~runtime.errors.InvalidTransition` and is recorded as
``state.transition_refused`` (see :meth:`runtime.Context.transition`).
States without outgoing transitions are final.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import msgspec

from runtime.agents.agent import Agent
from runtime.events.builtin import StateTransitioned
from runtime.events.model import RecordedEvent


class MachineState(msgspec.Struct, frozen=True, kw_only=True):
    """``ctx.state`` of a :class:`StateMachine`: where the run's machine is.

    Frozen: the state moves only by ``ctx.transition`` (recorded), never by assignment.
    Subclass it to keep more state (give ``initial_state`` the subclass, and call
    ``super().evolve`` in your ``evolve``; ``msgspec.structs.replace`` makes the next
    state): the machine's fields stay its own.
    """

    current: str
    previous: str | None = None
    #: Transitions taken so far.
    transitions: int = 0


S = TypeVar("S", bound=MachineState)


def state_name(state: str | enum.Enum) -> str:
    """A state as stored: an enum member's value, or the string itself."""
    if isinstance(state, enum.Enum):
        return str(state.value)
    return str(state)


class StateMachine(Agent):
    """An agent with declared states (``states``), a start (``initial``) and the
    transitions allowed from each state (``transitions``). States may be strings or
    the members of an enum (``states = MyStates``, a ``StrEnum`` reads best)."""

    #: Every state: an Enum class or a sequence of names (default: those named in
    #: ``initial`` and ``transitions``).
    states: ClassVar[type[enum.Enum] | Sequence[str | enum.Enum]] = ()
    #: The state of a run before the agent's first transition.
    initial: ClassVar[str | enum.Enum] = ""
    #: State -> the states it may go to. A state absent here is final.
    transitions: ClassVar[Mapping[Any, Collection[Any]]] = {}

    def initial_state(self) -> MachineState:
        return MachineState(current=state_name(self.initial))

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        body = event.body
        if type(body) is StateTransitioned and body.agent == self.name:
            return self.advance(state, body)
        return state

    def advance(self, state: S, moved: StateTransitioned) -> S:
        """``state`` after ``moved`` (the fold's step, and ``ctx.transition``'s)."""
        return msgspec.structs.replace(
            state, current=moved.to_state, previous=moved.from_state,
            transitions=state.transitions + 1,
        )  # fmt: skip

    # -- the declaration --------------------------------------------------------

    def state_names(self) -> tuple[str, ...]:
        """Every declared state, in declaration order."""
        declared = list(self.states)  # an Enum class iterates over its members
        if not declared:
            declared = [self.initial, *self.transitions]
            for targets in self.transitions.values():
                declared.extend(targets)
        return tuple(dict.fromkeys(state_name(s) for s in declared))

    def allowed(self, from_state: str | enum.Enum) -> tuple[str, ...]:
        """The states the machine may go to from ``from_state`` (sorted)."""
        here = state_name(from_state)
        for source, targets in self.transitions.items():
            if state_name(source) == here:
                return tuple(sorted(state_name(t) for t in targets))
        return ()

    def final_states(self) -> tuple[str, ...]:
        return tuple(s for s in self.state_names() if not self.allowed(s))

    def machine_problems(self) -> list[str]:
        """What is wrong with the declaration (empty: nothing); checked when the app loads."""
        if not isinstance(self.transitions, Mapping):
            return ["transitions must be a mapping of state -> next states"]
        out = []
        names = self.state_names()
        known = set(names)
        if not state_name(self.initial):
            out.append("declares no initial state (`initial = ...`)")
        elif state_name(self.initial) not in known:
            out.append(f"initial state {state_name(self.initial)!r} is not one of its states")
        if not self.transitions:
            out.append("declares no transitions (`transitions = {state: {next, ...}}`)")
        for source, targets in self.transitions.items():
            if isinstance(targets, str | enum.Enum):
                out.append(f"transitions[{state_name(source)!r}] must be a collection of "
                           "states, not one state")  # fmt: skip
                continue
            unknown = sorted({state_name(s) for s in [source, *targets]} - known)
            if unknown:
                out.append(f"transitions from {state_name(source)!r} name undeclared "
                           f"states {unknown}")  # fmt: skip
        if not isinstance(self.initial_state(), MachineState):
            out.append("initial_state() must return a MachineState (or a subclass of it)")
        return out
