"""Retries for LLM and tool calls: backoff with full jitter, Retry-After, and a record per attempt.

The Anthropic client runs with ``max_retries=0``: the runtime owns retries so
that every failed attempt can be written to the log, not hidden inside the
SDK. This module therefore never retries silently. :func:`run_with_retries`
hands each failed attempt to an ``on_attempt`` callback *before* it sleeps (or
gives up), and returns or raises every record with the outcome.

Pieces, each usable alone:

- :class:`RetryPolicy` decides how long to wait: exponential backoff with
  "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"),
  raised to the server's Retry-After when it sent one.
- :func:`parse_retry_after` / :func:`retry_after_from_headers` read RFC 9110
  ``Retry-After`` (delta-seconds or HTTP-date) and Anthropic's
  ``retry-after-ms``.
- :func:`classify` says whether an exception is worth retrying, and why.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import anthropic
import msgspec

from runtime.errors import RetriesExhausted
from runtime.events.values import AttemptRecord, Reason

__all__ = [
    "AttemptRecord",
    "Outcome",
    "Reason",
    "RetriesExhausted",
    "RetryPolicy",
    "Retryable",
    "classify",
    "parse_retry_after",
    "retry_after_from_headers",
    "run_with_retries",
]

T = TypeVar("T")


# The error ``type`` in an Anthropic error body. An error that arrives inside a
# streamed response carries the stream's HTTP status (200), so its body is the
# only sign that it was, say, an overload.
_BODY_TYPES: dict[str, Reason] = {
    "rate_limit_error": "rate_limited",
    "overloaded_error": "overloaded",
    "api_error": "server_error",
    "timeout_error": "timeout",
}

# delta-seconds is ``1*DIGIT``; fractions are accepted (as the SDK does), signs
# so that a negative value can be clamped to 0 rather than rejected.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How many times to try, and how long to wait between tries.

    ``delay(n)`` is drawn uniformly from ``[0, min(max_delay, base_delay *
    multiplier**n)]`` ("full jitter"): spreading retries over the whole window
    keeps many workers that failed together from retrying together.

    When the server sent Retry-After, the delay is ``max(retry_after, jittered)``
    so we never come back earlier than asked, except that the server's value is
    first capped at ``max_retry_after``: a rate limit that asks for ten minutes
    must not park a run for ten minutes without the runtime deciding so. A run
    that retries before the server's time is up will most likely be refused
    again and use up an attempt; that is the intended, bounded, cost.
    """

    max_attempts: int = 5
    """Calls in all, the first one included (1 means no retries)."""
    base_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.base_delay <= self.max_delay or not math.isfinite(self.max_delay):
            raise ValueError("need 0 <= base_delay <= max_delay < inf")
        if not 1 <= self.multiplier < math.inf:
            raise ValueError("multiplier must be finite and at least 1")
        if not 0 <= self.max_retry_after < math.inf:
            raise ValueError("max_retry_after must be finite and not negative")

    def ceiling(self, attempt: int) -> float:
        """The largest jittered delay before retry number ``attempt`` (0 for the first retry)."""
        if self.base_delay == 0:
            return 0.0
        try:
            return min(self.max_delay, self.base_delay * self.multiplier ** max(attempt, 0))
        except OverflowError:
            return self.max_delay

    def delay(
        self,
        attempt: int,
        rng: random.Random | None = None,
        retry_after: float | None = None,
    ) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry).

        ``rng`` makes the jitter reproducible; ``retry_after`` is the server's
        hint in seconds (see the class docstring for how it is honoured).
        """
        jittered = (rng.random() if rng is not None else random.random()) * self.ceiling(attempt)
        if retry_after is None or not retry_after > 0:
            return jittered
        return max(jittered, min(retry_after, self.max_retry_after))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from an RFC 9110 ``Retry-After`` value, or None if there is none.

    Accepts delta-seconds (fractions too) and an HTTP-date, which is measured
    from ``now`` (default: this machine's clock, in UTC). A value in the past
    or negative gives 0; anything unreadable gives None.
    """
    if value is None:
        return None
    text = value.strip()
    if _NUMBER.fullmatch(text):
        seconds = float(text)  # a 400-digit number is inf, not an error
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" in a date means UTC with no source zone
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def retry_after_from_headers(
    headers: Mapping[str, str] | None, now: datetime | None = None
) -> float | None:
    """The server's wait hint in seconds: ``retry-after-ms`` when readable, else ``Retry-After``.

    Anthropic sends ``retry-after-ms`` alongside ``retry-after``; it is the more
    precise of the two, so it wins. Header names are matched case-insensitively
    whatever the mapping.
    """
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None and _NUMBER.fullmatch(millis.strip()):
        seconds = float(millis) / 1000
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return parse_retry_after(lowered.get("retry-after"), now)


class Retryable(msgspec.Struct, frozen=True):
    """An error worth retrying: why, and how long the server asked us to wait."""

    reason: Reason
    retry_after: float | None = None


def classify(exc: BaseException) -> Retryable | None:
    """Whether ``exc`` is transient, and why; None means retrying cannot help.

    For HTTP status errors this is the Anthropic SDK's own rule
    (``BaseClient._should_retry``), so that turning the SDK's retries off loses
    nothing: the server's ``x-should-retry`` header wins when it says exactly
    ``true`` (retry whatever the status: ``retry_requested`` unless the status
    has a reason of its own) or ``false`` (never retry); otherwise 408
    (``timeout``), 409 (``conflict``: the API's lock timeouts), 429
    (``rate_limited``), 529 (``overloaded``) and every other 5xx
    (``server_error``) are retried. Client-side timeouts (``timeout``) and
    connection failures (``connection``) are too, and, beyond the SDK, the
    same error types when they arrive in a streamed body (whose status is the
    stream's 200). The caller's own mistakes (400, 401, 403, 404, 413, 422,
    ...) are not. ``TimeoutError`` (which ``asyncio.TimeoutError`` is) and
    ``ConnectionError`` count for tools too. ``CancelledError`` and other
    ``BaseException`` s are never retryable.

    Only ``exc`` itself is looked at, not its ``__cause__``: a tool that wraps
    a timeout in its own error has decided what that error means.
    """
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, anthropic.APITimeoutError):  # before its base class
        return Retryable("timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return Retryable("connection")
    if isinstance(exc, anthropic.APIStatusError):
        return _classify_status(exc)
    if isinstance(exc, TimeoutError):
        return Retryable("timeout")
    if isinstance(exc, ConnectionError):
        return Retryable("connection")
    return None


def _classify_status(exc: anthropic.APIStatusError) -> Retryable | None:
    headers = exc.response.headers
    # Compared as the SDK does: exactly "true" or "false", anything else is no opinion.
    should_retry = headers.get("x-should-retry")
    if should_retry == "false":
        return None
    status = exc.status_code
    reason: Reason | None
    if isinstance(exc, anthropic.RateLimitError) or status == 429:
        reason = "rate_limited"
    elif isinstance(exc, anthropic.OverloadedError) or status == 529:
        reason = "overloaded"
    elif status == 408:
        reason = "timeout"
    elif status == 409:
        reason = "conflict"
    elif isinstance(exc, anthropic.InternalServerError) or status >= 500:
        reason = "server_error"
    else:
        reason = _BODY_TYPES.get(exc.type or "")
    if reason is None and should_retry == "true":
        reason = "retry_requested"
    if reason is None:
        return None
    return Retryable(reason, retry_after_from_headers(headers))


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """A successful call's value, and the failed attempts that came before it."""

    value: T
    attempts: tuple[AttemptRecord, ...]

    @property
    def calls(self) -> int:
        return len(self.attempts) + 1


async def run_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_attempt: Callable[[AttemptRecord], Awaitable[None]] | None = None,
    classifier: Callable[[BaseException], Retryable | None] = classify,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> Outcome[T]:
    """Call ``fn()`` until it succeeds, the error is not retryable, or attempts run out.

    Every failed attempt produces one :class:`AttemptRecord`, passed to
    ``on_attempt`` before anything else happens (before the sleep, before
    giving up), so the log holds the attempt even if the process dies while
    waiting. That includes the last attempt and a non-retryable failure
    (``reason=None``, ``delay=None``): the log then shows every call that was
    made, and the error itself propagates unchanged straight after its record.
    An error raised by ``on_attempt`` propagates as is, and nothing is retried
    on its account.

    On exhaustion raises :class:`RetriesExhausted` (``from`` the last error)
    with all records. ``asyncio.CancelledError`` (and any other
    ``BaseException``) is never caught: a cancelled call is not an attempt.
    ``classifier`` (default :func:`classify`) and ``sleep`` are replaceable,
    for tools with errors of their own and for tests.
    """
    records: list[AttemptRecord] = []
    for attempt in range(1, policy.max_attempts + 1):
        try:
            value = await fn()
        except Exception as exc:
            verdict = classifier(exc)
            last = verdict is None or attempt == policy.max_attempts
            hint = verdict.retry_after if verdict is not None else None
            delay = None if last else policy.delay(attempt - 1, rng, hint)
            record = AttemptRecord(
                attempt=attempt,
                reason=verdict.reason if verdict is not None else None,
                error_type=type(exc).__name__,
                error=str(exc),
                delay=delay,
                retry_after=hint,
            )
            records.append(record)
            if on_attempt is not None:
                await on_attempt(record)
            if verdict is None:
                raise
            if delay is None:
                raise RetriesExhausted(tuple(records), exc) from exc
            await sleep(delay)
        else:
            return Outcome(value, tuple(records))
    raise AssertionError("unreachable: max_attempts >= 1")
