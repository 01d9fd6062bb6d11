"""The ``agentrt`` command: ``services``, ``db``, ``audit``, ``log``, ``worker``, ``relay``,
``dlq``, ``approve``; packages add theirs through the ``agentrt.commands`` entry-point group.

Command plugins use the helpers exported here (``run``, ``fail``, ``with_servers``,
``open_log``, ``out``, ``err``), as ``webhooks`` does.
"""

from __future__ import annotations

from runtime.cli.helpers import err, fail, open_log, out, run, with_servers


def main() -> None:
    """The ``agentrt`` console script."""
    from runtime.cli.app import main as run_main

    run_main()


__all__ = ["err", "fail", "main", "open_log", "out", "run", "with_servers"]
