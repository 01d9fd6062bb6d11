"""The ``agentrt`` command: ``services``, ``db``, ``audit``, ``log``, ``worker``, ``relay``,
``dlq``, ``approve``; packages add theirs through the ``agentrt.commands`` entry-point group.

Command plugins use the helpers exported here (``run``, ``fail``, ``with_servers``,
``open_log``, ``out``, ``err``, ``configure_logging``, ``settings_of``, ``load_agents``,
``importable_cwd``), as ``webhooks`` and ``projections`` do.
"""

from __future__ import annotations

from runtime.cli.helpers import (
    err,
    fail,
    importable_cwd,
    load_agents,
    open_log,
    out,
    run,
    settings_of,
    with_servers,
)
from runtime.ops.logconfig import configure_logging


def main() -> None:
    """The ``agentrt`` console script."""
    from runtime.cli.app import main as run_main

    run_main()


__all__ = [
    "configure_logging",
    "err",
    "fail",
    "importable_cwd",
    "load_agents",
    "main",
    "open_log",
    "out",
    "run",
    "settings_of",
    "with_servers",
]
