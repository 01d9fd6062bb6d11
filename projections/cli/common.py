"""What the read side's commands share: their settings, and quiet logs for commands whose
output is the answer (a table, a report), not a stream of log lines."""

from __future__ import annotations

import os

import typer

from runtime.cli import configure_logging, settings_of
from runtime.settings import Settings


def command_settings(ctx: typer.Context, *, quiet: bool = False) -> Settings:
    """The root command's settings. ``quiet``: log warnings and errors only, unless a level
    was asked for (``--log-level`` or ``AGENTRT_LOG_LEVEL``)."""
    settings = settings_of(ctx)
    if quiet and "AGENTRT_LOG_LEVEL" not in os.environ and settings.log_level == "info":
        configure_logging("warning", json=settings.log_json)
    return settings
