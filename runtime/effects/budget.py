"""A run's spending limit, checked before every model call (see ``runtime.llm.calls``)."""

from __future__ import annotations

import msgspec


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A run's spending limit; ``None`` leaves that dimension unlimited."""

    tokens: int | None = None
    usd: float | None = None
