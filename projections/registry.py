"""Which projections run: the built-ins, the ``--app`` module's, the entry-point group's.

Projections register the way agents load: a ``projections`` list in the module
``--app`` names, or the ``agentrt.projections`` entry-point group (an instance, a
class, or a list of them).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

import structlog

from projections.builtin import builtin_projections
from projections.engine import Projection
from runtime.agents.agent import Agent
from runtime.errors import AppLoadError
from runtime.settings import Settings

log = structlog.get_logger(__name__)

#: Projections other packages declare (an instance, a class, or a list of them).
ENTRY_POINT_GROUP = "agentrt.projections"


def _as_projections(obj: Any, where: str) -> list[Projection]:
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    out: list[Projection] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, Projection):
            out.append(item())
        elif isinstance(item, Projection):
            out.append(item)
        else:
            raise AppLoadError(where, f"{item!r} is not a Projection")
    return out


def load_app_projections(target: str) -> tuple[list[Agent], list[Projection]]:
    """The agents and projections of ``module[:attr]``: its ``agents`` (as ``--app``
    loads them for a worker, if it has any) and its ``projections`` attribute."""
    from runtime.agents.loading import load_app

    module_name = target.partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(target, f"cannot import {module_name!r}: {exc}") from None
    agents: list[Agent] = []
    try:
        agents = load_app(target)
    except AppLoadError as exc:
        if "defines no agents" not in exc.message:
            raise
    found = getattr(module, "projections", [])
    return agents, _as_projections(found, target)


def registered(
    app: str | None = None,
    *,
    agents: Sequence[Agent] = (),
    builtin: bool = True,
    settings: Settings | None = None,
) -> list[Projection]:
    """The built-in projections, those of ``app`` and those of the entry-point group.

    The app's agents feed the built-ins that need them (agent state folds with
    their ``evolve``; runs know who subscribes to what).
    """
    app_agents = list(agents)
    extra: list[Projection] = []
    if app is not None:
        loaded, extra = load_app_projections(app)
        app_agents = app_agents or loaded
    out = list(builtin_projections(app_agents, settings)) if builtin else []
    out += extra
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            out += _as_projections(ep.load(), f"entry point {ep.name} ({ep.value})")
        except AppLoadError:
            raise
        except Exception as exc:  # a plugin's import error: say which, keep the others
            log.warning("projection.plugin_failed", entry_point=ep.name, error=str(exc))
    return out
