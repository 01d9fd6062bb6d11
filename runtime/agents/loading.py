"""Loading agents: ``--app module[:attr]``, checked before any worker starts."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Any

from runtime.agents.agent import NAME, Agent
from runtime.agents.machine import StateMachine
from runtime.errors import AppLoadError
from runtime.events.model import registry as default_registry


def validate(agents: Iterable[Agent]) -> list[Agent]:
    """Check names, subscriptions and handlers; every problem names the agent."""
    seen: dict[str, Agent] = {}
    out = []
    for agent in agents:
        where = f"agent {type(agent).__qualname__}"
        if not NAME.match(agent.name or ""):
            raise AppLoadError(
                where, f"name {agent.name!r} must match {NAME.pattern} (it names Redis keys)"
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
        for tag, wheres in sorted(agent.filters().items()):
            for w in wheres:
                if problems := w.problems(known[tag]):
                    raise AppLoadError(
                        f"agent {agent.name!r}",
                        f"filter Where({w.describe()}) on {tag}: {'; '.join(problems)}",
                    )
        if isinstance(agent, StateMachine) and (problems := agent.machine_problems()):
            raise AppLoadError(f"agent {agent.name!r}", f"state machine: {'; '.join(problems)}")
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
