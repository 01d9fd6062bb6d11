"""Agents: small typed objects that react to events, and loading them from a module path."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from runtime.effects.tools import Tool
from runtime.errors import AppLoadError
from runtime.events.model import Event, RecordedEvent
from runtime.events.model import registry as default_registry

if TYPE_CHECKING:
    from runtime.agents.context import Context

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A run's spending limit; ``None`` leaves that dimension unlimited."""

    tokens: int | None = None
    usd: float | None = None


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
    #: Event types (classes or dotted tags) this agent handles.
    subscribes: ClassVar[Sequence[type[Event] | str]] = ()
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

    def initial_state(self) -> Any:
        """``ctx.state`` before the run's first event."""
        return None

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        """Fold one of the run's events into ``ctx.state`` (default: no state)."""
        return state

    async def handle(self, event: Any, ctx: Context) -> None:
        raise NotImplementedError(f"agent {self.name!r} has no handle() method")

    # -- derived --------------------------------------------------------------

    def subscribed_types(self) -> frozenset[str]:
        return frozenset(_tag(t) for t in self.subscribes)

    def __repr__(self) -> str:
        return f"<agent {self.name!r} on {sorted(self.subscribed_types())}>"


def _tag(t: type[Event] | str) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, type) and issubclass(t, Event):
        tag = t.__struct_config__.tag
        if isinstance(tag, str):
            return tag
    raise TypeError(f"subscribes must hold Event classes or dotted tags, got {t!r}")


def validate(agents: Iterable[Agent]) -> list[Agent]:
    """Check names, subscriptions and handlers; every problem names the agent."""
    seen: dict[str, Agent] = {}
    out = []
    for agent in agents:
        where = f"agent {type(agent).__qualname__}"
        if not _NAME.match(agent.name or ""):
            raise AppLoadError(
                where, f"name {agent.name!r} must match {_NAME.pattern} (it names Redis keys)"
            )
        if agent.name in seen:
            raise AppLoadError(where, f"two agents are named {agent.name!r}")
        try:
            types = agent.subscribed_types()
        except TypeError as exc:
            raise AppLoadError(f"agent {agent.name!r}", str(exc)) from None
        if not types:
            raise AppLoadError(f"agent {agent.name!r}", "subscribes to no event types")
        known = default_registry.types()
        unknown = sorted(t for t in types if t not in known)
        if unknown:
            raise AppLoadError(
                f"agent {agent.name!r}",
                f"subscribes to {unknown}, which no imported module defines "
                "(import the module that declares the event class)",
            )
        if type(agent).handle is Agent.handle:
            raise AppLoadError(f"agent {agent.name!r}", "has no handle(event, ctx) method")
        if not inspect.iscoroutinefunction(agent.handle):
            raise AppLoadError(f"agent {agent.name!r}", "handle must be `async def`")
        names = [t.name for t in agent.tools]
        if len(set(names)) != len(names):
            raise AppLoadError(f"agent {agent.name!r}", f"two tools share a name: {names}")
        seen[agent.name] = agent
        out.append(agent)
    return out


def load_app(target: str) -> list[Agent]:
    """The agents of ``module`` or ``module:attribute``.

    ``module:attr`` names an Agent, an Agent class, or a list of them; a bare
    module gives its ``agents`` list if it has one, else every Agent subclass
    defined in it (instantiated with no arguments).
    """
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise AppLoadError(target, "name a module, like `mypkg.agents` or `mypkg.agents:agents`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(target, f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module failed while importing: say where
        raise AppLoadError(
            target, f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if attr:
        try:
            found: Any = getattr(module, attr)
        except AttributeError:
            raise AppLoadError(target, f"module {module_name!r} has no {attr!r}") from None
    elif hasattr(module, "agents"):
        found = module.agents
    else:
        found = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, Agent)
            and obj is not Agent
            and obj.__module__ == module.__name__
        ]
    items = found if isinstance(found, (list, tuple)) else [found]
    agents: list[Agent] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, Agent):
            agents.append(item())
        elif isinstance(item, Agent):
            agents.append(item)
        else:
            raise AppLoadError(target, f"{item!r} is not an Agent")
    if not agents:
        raise AppLoadError(target, "defines no agents")
    return validate(agents)


def subscribers(agents: Iterable[Agent]) -> dict[str, list[str]]:
    """Event type -> names of the agents that handle it."""
    out: dict[str, list[str]] = {}
    for agent in agents:
        for t in sorted(agent.subscribed_types()):
            out.setdefault(t, []).append(agent.name)
    return out
