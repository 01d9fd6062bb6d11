"""``python -m runtime`` runs the ``agentrt`` command."""

from __future__ import annotations

from runtime.cli import main

main()
