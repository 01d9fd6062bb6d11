"""The run explorer: a web UI over the read side, served by ``agentrt api`` at ``/ui``."""

from __future__ import annotations

from projections.ui.app import UI, install

__all__ = ["UI", "install"]
