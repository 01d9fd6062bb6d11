"""``agentrt runs``: the runs table, one run's timeline, export and import.

``runs_app`` is shared: ``projections.cli.transfer`` adds ``export`` and ``import`` to it.
"""

from __future__ import annotations

import typer

runs_app = typer.Typer(help="Inspect, export and import runs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``agentrt runs ...`` to ``app``."""
    from projections.cli import transfer  # noqa: F401  (adds export/import to runs_app)

    app.add_typer(runs_app, name="runs")
