"""The read side's commands, added to ``agentrt`` through the ``agentrt.commands`` group.

Each module registers its own commands: ``projector`` (``agentrt projector``,
``agentrt projections status|rebuild``), ``replay`` (``agentrt replay``),
``fork`` (``agentrt fork|diff``), ``runs`` (``agentrt runs [show]``, with
``transfer``'s ``export|import``), ``api`` (``agentrt api``).
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Entry point of the ``agentrt.commands`` group."""
    from projections.cli import api, fork, projector, replay, runs

    projector.register(app)
    replay.register(app)
    fork.register(app)
    runs.register(app)
    api.register(app)
