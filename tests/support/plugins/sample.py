"""Plugins as a user's package would declare them in ``agentrt.commands``."""

from __future__ import annotations

import typer

app = typer.Typer(help="A sample plugin group.")


@app.command()
def hello() -> None:
    """Say hello from a plugin."""
    print("hello from a plugin")


def register(root: typer.Typer) -> None:
    @root.command("sample-direct")
    def direct() -> None:
        """Added by a register(app) function."""
        print("direct plugin command")


not_a_command = 42
