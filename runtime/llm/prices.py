"""What model calls cost: the settings' price table, cache factors, a response's usage."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import structlog

from runtime.events.values import Usage
from runtime.settings import Settings

log = structlog.get_logger(__name__)

#: Anthropic bills cache writes at 1.25x and cache reads at 0.1x the input price.
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1

_DATED = re.compile(r"-\d{8}$")


def price_for(settings: Settings, model: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens; a dated id (``claude-haiku-4-5-20251001``) too."""
    return settings.prices.get(_DATED.sub("", model)) or settings.prices.get(model)


def cost_usd(
    settings: Settings,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
) -> float:
    """What the tokens cost by the settings' price table (0 for a model it does not list)."""
    price = price_for(settings, model)
    if price is None:
        log.warning("llm.no_price", model=model, key="AGENTRT_PRICES")
        return 0.0
    inp, out = price
    total = (
        input_tokens * inp
        + output_tokens * out
        + cache_creation_input_tokens * inp * CACHE_WRITE_FACTOR
        + cache_read_input_tokens * inp * CACHE_READ_FACTOR
    )
    return round(total / 1_000_000, 10)


def usage_of(settings: Settings, model: str, usage: Any, *, offline: bool) -> Usage:
    """A response's ``usage`` (SDK object or dict) as recorded: offline usage costs nothing."""
    raw = usage if isinstance(usage, Mapping) else usage.model_dump()
    counts = {
        k: int(raw.get(k) or 0)
        for k in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        )
    }
    cost = 0.0 if offline else cost_usd(settings, model, **counts)
    return Usage(model=model, cost_usd=cost, offline=offline, **counts)
