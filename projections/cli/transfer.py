"""`agentrt` commands of the read side (being written: issue 10)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
