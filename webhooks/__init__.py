"""The HTTP ingress: sources, signatures, dedupe, back-pressure, XADD (see DESIGN.md)."""

from __future__ import annotations

__all__: list[str] = []
