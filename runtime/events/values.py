"""Value structs stored inside the log's events: a step's error, a model call's usage, a
failed attempt. Plain data (msgspec), so every layer can read them."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

import msgspec

Reason = Literal[
    "rate_limited",
    "overloaded",
    "server_error",
    "timeout",
    "connection",
    "conflict",
    "retry_requested",
]
"""Why an attempt may be retried; stable strings, safe to store in the log (``conflict``:
a 409, which the Messages API uses for lock timeouts; ``retry_requested``: the server sent
``x-should-retry: true`` on a status that is otherwise final)."""


class StepError(msgspec.Struct, frozen=True, kw_only=True):
    """A step's final error, as recorded: a retry or replay raises it again."""

    type: str
    message: str
    code: str | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens one model response used, and what they cost by the settings' price table."""

    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    #: True when the offline model answered (its tokens are estimates, its cost 0).
    offline: bool = False

    @property
    def tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )


class StepRef(msgspec.Struct, frozen=True, kw_only=True):
    """Where one step is in the log: the stream ``act-<activation_id>`` at version ``step``."""

    activation_id: UUID
    step: int


class AttemptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One failed attempt, as the log should record it."""

    attempt: int
    """1 for the first call."""
    reason: Reason | None
    """None when the error is not retryable."""
    error_type: str
    error: str
    delay: float | None
    """Seconds slept before the next attempt; None when none follows."""
    retry_after: float | None = None
    """The server's hint, before the policy capped it."""

    @property
    def will_retry(self) -> bool:
        return self.delay is not None
