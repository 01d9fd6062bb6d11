"""Agents: small typed objects that react to events; what a user subclasses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from runtime.agents.filters import On, Where, accepts
from runtime.effects.budget import Budget
from runtime.effects.tools import Tool
from runtime.events.model import Event, RecordedEvent

if TYPE_CHECKING:
    from runtime.llm.cache import Cache

#: What an agent may be called (it names Redis keys and consumer groups).
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class Agent:
    """Subclass this, set the class attributes, write ``handle``.

    ::

        class Triage(Agent):
            name = "triage"
            subscribes = (EmailReceived,)
            system = "Classify the email. Reply with one of: billing, support, spam."
            tier = "fast"
            tools = (lookup_customer,)

            async def handle(self, event: EmailReceived, ctx: Context) -> None:
                answer = await ctx.llm(event.text)
                ctx.emit(Classified(label=answer.text))

    Everything that touches the world goes through ``ctx`` (LLM and tool
    calls are durable steps; emitted events commit with the inbox marker), so
    a retried activation repeats nothing and loses nothing.
    """

    #: The agent's name: its consumer group and its own stream ``agentrt:agent:{name}``.
    name: ClassVar[str] = ""
    #: Event types (classes or dotted tags) this agent handles; ``On(type, where=Where(...))``
    #: takes only the events of a type that pass a filter (:mod:`runtime.agents.filters`).
    subscribes: ClassVar[Sequence[type[Event] | str | On]] = ()
    #: System prompt of ``ctx.llm`` calls.
    system: ClassVar[str] = ""
    #: Model tier of ``ctx.llm`` calls (mapped to a model id by the settings).
    tier: ClassVar[str] = "fast"
    #: Tools ``ctx.llm`` offers the model and ``ctx.tool`` may call.
    tools: ClassVar[Sequence[Tool[..., Any]]] = ()
    #: Whether the agent reads the webhook ingress streams (besides its own stream).
    reads_ingress: ClassVar[bool] = True
    #: The run's budget (None: the settings' default).
    budget: ClassVar[Budget | None] = None
    #: The agent's response cache for ``ctx.llm`` steps (None: every call asks the
    #: model), e.g. ``Cache(exact=True, semantic=0.92)``: see :class:`runtime.Cache`.
    cache: ClassVar[Cache | None] = None
    #: Seconds one activation's handler may run (None: the worker's default, the
    #: ``handler_timeout`` setting); past it the handler is cancelled and the
    #: delivery counts as failed (dead-lettered after ``max_deliveries``).
    timeout: ClassVar[float | None] = None
    #: The version of the fold (``initial_state`` + ``evolve``): bump it when either
    #: changes, so snapshots of the old fold are never read and the agent-state
    #: projection is rebuilt.
    state_version: ClassVar[int] = 1
    #: The type a snapshot of ``ctx.state`` decodes to (None: the type of
    #: ``initial_state()``). A state that does not survive the round trip through
    #: JSON is simply not snapshotted (folded from the start every time).
    state_type: ClassVar[Any] = None

    def initial_state(self) -> Any:
        """``ctx.state`` before the run's first event."""
        return None

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        """Fold one of the run's events into ``ctx.state`` (default: no state)."""
        return state

    async def handle(self, event: Any, ctx: Any) -> None:
        """React to ``event``; ``ctx`` is the activation's :class:`runtime.Context`."""
        raise NotImplementedError(f"agent {self.name!r} has no handle() method")

    # -- derived --------------------------------------------------------------

    @property
    def folds_state(self) -> bool:
        """Whether the agent keeps state (overrides ``evolve``)."""
        return type(self).evolve is not Agent.evolve

    @property
    def fold_version(self) -> str:
        """The key of this agent's snapshots: a snapshot of another fold is never read."""
        return f"v{self.state_version}"

    def state_decode_type(self) -> Any:
        """The type snapshots of this agent's state decode to."""
        if self.state_type is not None:
            return self.state_type
        initial = self.initial_state()
        return Any if initial is None else type(initial)

    def subscribed_types(self) -> frozenset[str]:
        return frozenset(_tag(t) for t in self.subscribes)

    def filters(self) -> dict[str, tuple[Where, ...]]:
        """Event type -> the filters its events must pass (any one of them); a type
        without an entry is taken whole (it is also subscribed without a filter)."""
        filtered: dict[str, list[Where]] = {}
        whole = set()
        for s in self.subscribes:
            tag = _tag(s)
            wheres = s.alternatives() if isinstance(s, On) else ()
            if wheres:
                filtered.setdefault(tag, []).extend(wheres)
            else:
                whole.add(tag)
        return {t: tuple(ws) for t, ws in filtered.items() if t not in whole}

    def accepts(self, event_type: str, body: Event) -> bool:
        """Whether this agent handles ``body`` (an event of a subscribed type): its filters."""
        return accepts(self.filters(), event_type, body)

    def __repr__(self) -> str:
        return f"<agent {self.name!r} on {sorted(self.subscribed_types())}>"


def _tag(t: type[Event] | str | On) -> str:
    if isinstance(t, On):
        for w in t.alternatives():
            if not isinstance(w, Where):
                raise TypeError(f"On(..., where=) takes Where filters, got {w!r}")
        return _tag(t.event)
    if isinstance(t, str):
        return t
    if isinstance(t, type) and issubclass(t, Event):
        tag = t.__struct_config__.tag
        if isinstance(tag, str):
            return tag
    raise TypeError(f"subscribes must hold Event classes, dotted tags or On(...), got {t!r}")
