"""Read models folded from the log, replay and audit (built on runtime/; see DESIGN.md)."""

from __future__ import annotations

__all__: list[str] = []
