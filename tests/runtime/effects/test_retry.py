"""The retry policy: jitter bounds, Retry-After, classification of SDK errors, the attempt loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anthropic
import httpx
import httpx2
import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from runtime.effects.retry import (
    RetriesExhausted,
    Retryable,
    RetryPolicy,
    classify,
    parse_retry_after,
    retry_after_from_headers,
    run_with_retries,
)
from runtime.errors import AgentrtError, ErrorCode
from runtime.events.values import AttemptRecord

# -- the policy ---------------------------------------------------------------

policies = st.builds(
    lambda base, extra, multiplier, max_retry_after: RetryPolicy(
        base_delay=base,
        max_delay=base + extra,
        multiplier=multiplier,
        max_retry_after=max_retry_after,
    ),
    st.floats(0, 10),
    st.floats(0, 100),
    st.floats(1, 10),
    st.floats(0, 120),
)


@given(
    base=st.floats(0, 10),
    cap=st.floats(0, 100),
    attempt=st.integers(0, 2000),
    seed=st.integers(0, 2**32),
)
# The smallest float as a base, past attempt 1000: 2**attempt is still finite.
@example(base=5e-324, cap=1.0, attempt=1001, seed=0)
def test_full_jitter_stays_within_the_exponential_window(
    base: float, cap: float, attempt: int, seed: int
) -> None:
    policy = RetryPolicy(base_delay=min(base, cap), max_delay=cap)  # multiplier 2
    try:
        window = min(cap, policy.base_delay * 2.0**attempt)
    except OverflowError:  # 2.0 ** attempt past the float range: the cap holds
        window = cap
    delay = policy.delay(attempt, random.Random(seed))
    assert 0 <= delay <= window


@given(
    policy=policies,
    attempt=st.integers(0, 10**6),
    retry_after=st.floats(0, 10**6),
    seed=st.integers(0, 2**32),
)
def test_retry_after_is_a_floor_capped_by_max_retry_after(
    policy: RetryPolicy, attempt: int, retry_after: float, seed: int
) -> None:
    delay = policy.delay(attempt, random.Random(seed), retry_after=retry_after)
    floor = min(retry_after, policy.max_retry_after)
    assert floor <= delay <= max(floor, policy.ceiling(attempt))
    assert delay <= max(policy.max_delay, policy.max_retry_after)


def test_jitter_spreads_over_the_whole_window() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=60.0)
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(2000)]
    assert min(delays) < 0.5 and max(delays) > 7.5  # window is [0, 8]
    assert all(0 <= d <= 8 for d in delays)


def test_the_window_grows_by_the_multiplier_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=10.0, multiplier=3.0)
    assert [policy.ceiling(n) for n in range(5)] == [0.5, 1.5, 4.5, 10.0, 10.0]
    assert policy.ceiling(10**9) == 10.0  # no OverflowError


def test_the_same_seed_gives_the_same_delays() -> None:
    policy = RetryPolicy()
    a, b = random.Random(42), random.Random(42)
    assert [policy.delay(n, a) for n in range(6)] == [policy.delay(n, b) for n in range(6)]


def test_a_zero_or_missing_retry_after_leaves_the_jitter_alone() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=1.0)
    assert policy.delay(0, random.Random(1), retry_after=0.0) == policy.delay(0, random.Random(1))


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 0},
        {"base_delay": -1.0},
        {"base_delay": 5.0, "max_delay": 1.0},
        {"multiplier": 0.5},
        {"max_retry_after": -1.0},
        {"max_delay": float("inf")},
    ],
)
def test_nonsense_policies_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message names the field
        RetryPolicy(**fields)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(fields, RetryPolicy)


def test_a_policy_converts_from_configuration() -> None:
    policy = msgspec.convert({"max_attempts": 3, "base_delay": 0.1}, RetryPolicy)
    assert policy == RetryPolicy(max_attempts=3, base_delay=0.1)


# -- Retry-After ----------------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),  # not RFC 9110, but servers send it and the SDK accepts it
        ("-3", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Saturday, 01-Mar-25 12:00:30 GMT", 30.0),  # obsolete RFC 850 form
        ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),  # in the past
        ("Sat, 01 Mar 2025 12:00:10 -0000", 10.0),
    ],
)
def test_retry_after_values(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", [None, "", "soon", "1e3", "inf", "nan", "9" * 400, "12 seconds", "Sat, 99 Foo"]
)
def test_unreadable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_an_http_date_is_measured_from_the_clock_by_default() -> None:
    later = datetime.now(UTC) + timedelta(seconds=100)
    assert 95 < (parse_retry_after(format_datetime(later, usegmt=True)) or 0) <= 100


@given(st.text())
def test_retry_after_never_raises_and_is_never_negative(value: str) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or 0 <= seconds < float("inf")


def test_retry_after_ms_wins_over_retry_after() -> None:
    headers = httpx2.Headers({"Retry-After": "2", "Retry-After-Ms": "1500"})
    assert retry_after_from_headers(headers) == 1.5


def test_header_names_are_case_insensitive_even_in_a_dict() -> None:
    assert retry_after_from_headers({"Retry-After-Ms": "250"}) == 0.25
    assert retry_after_from_headers({"RETRY-AFTER": "4"}) == 4.0


def test_an_unreadable_ms_header_falls_back_to_retry_after() -> None:
    assert retry_after_from_headers({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0
    assert retry_after_from_headers({"retry-after-ms": "-20"}) == 0.0
    assert retry_after_from_headers({"retry-after-ms": "soon"}) is None
    assert retry_after_from_headers({}) is None
    assert retry_after_from_headers(None) is None


# -- classification of the SDK's own exceptions ---------------------------------

REQUEST = httpx2.Request("POST", "https://api.anthropic.com/v1/messages")


def status_error(
    cls: type[anthropic.APIStatusError],
    status: int,
    headers: dict[str, str] | None = None,
    body: object = None,
) -> anthropic.APIStatusError:
    """As the SDK builds them: anthropic 2.x uses httpx2 for its transport."""
    response = httpx2.Response(status, headers=headers, request=REQUEST)
    return cls(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (status_error(anthropic.RateLimitError, 429), Retryable("rate_limited")),
        (
            status_error(anthropic.RateLimitError, 429, {"retry-after": "2"}),
            Retryable("rate_limited", 2.0),
        ),
        (
            status_error(
                anthropic.RateLimitError, 429, {"retry-after": "2", "retry-after-ms": "1234"}
            ),
            Retryable("rate_limited", 1.234),
        ),
        (status_error(anthropic.OverloadedError, 529), Retryable("overloaded")),
        (status_error(anthropic.InternalServerError, 500), Retryable("server_error")),
        (
            status_error(anthropic.ServiceUnavailableError, 503, {"retry-after": "5"}),
            Retryable("server_error", 5.0),
        ),
        (status_error(anthropic.GatewayTimeoutError, 504), Retryable("server_error")),
        (status_error(anthropic.RequestTimeoutError, 408), Retryable("timeout")),
        (anthropic.APITimeoutError(request=REQUEST), Retryable("timeout")),
        (anthropic.APIConnectionError(request=REQUEST), Retryable("connection")),
        (TimeoutError(), Retryable("timeout")),
        (ConnectionResetError(), Retryable("connection")),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_transient_errors_are_retryable(exc: BaseException, expected: Retryable) -> None:
    assert classify(exc) == expected


def test_an_error_inside_a_stream_is_classified_by_its_body() -> None:
    # The SDK raises a plain APIStatusError carrying the stream's 200 response.
    def streamed(kind: str) -> anthropic.APIStatusError:
        body = {"type": "error", "error": {"type": kind, "message": "..."}}
        return status_error(anthropic.APIStatusError, 200, body=body)

    assert classify(streamed("overloaded_error")) == Retryable("overloaded")
    assert classify(streamed("rate_limit_error")) == Retryable("rate_limited")
    assert classify(streamed("api_error")) == Retryable("server_error")
    assert classify(streamed("invalid_request_error")) is None


@pytest.mark.parametrize(
    "exc",
    [
        status_error(anthropic.BadRequestError, 400),
        status_error(anthropic.AuthenticationError, 401),
        status_error(anthropic.PermissionDeniedError, 403),
        status_error(anthropic.NotFoundError, 404),
        status_error(anthropic.ContentTooLargeError, 413),
        status_error(anthropic.UnprocessableEntityError, 422),
        status_error(anthropic.RateLimitError, 429, {"x-should-retry": "false"}),
        status_error(anthropic.OverloadedError, 529, {"x-should-retry": "false"}),
        ValueError("bad arguments"),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_errors_are_not_retryable(exc: BaseException) -> None:
    assert classify(exc) is None


@pytest.fixture(scope="module")
def sdk() -> Any:
    client = anthropic.Anthropic(api_key="unused", max_retries=0)
    yield client
    client.close()


STATUSES = [400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529]


@pytest.mark.parametrize("header", [None, "true", "false", "TRUE", "False", "1", ""])
@pytest.mark.parametrize("status", STATUSES)
def test_status_errors_are_retried_exactly_when_the_sdk_would(
    sdk: Any, status: int, header: str | None
) -> None:
    # The SDK's retries are off, so classify() must keep its rule: its own
    # _should_retry(response) and its own exception for the status.
    headers = {"x-should-retry": header} if header is not None else {}
    response = httpx2.Response(status, headers=headers, request=REQUEST)
    exc = sdk._make_status_error_from_response(response)
    assert (classify(exc) is not None) == sdk._should_retry(response)


def test_409_and_x_should_retry_true_have_reasons_of_their_own() -> None:
    assert classify(status_error(anthropic.ConflictError, 409)) == Retryable("conflict")
    told = status_error(anthropic.BadRequestError, 400, {"x-should-retry": "true"})
    assert classify(told) == Retryable("retry_requested")
    # A status with a reason keeps it; the header only makes it retryable.
    told = status_error(anthropic.InternalServerError, 500, {"x-should-retry": "true"})
    assert classify(told) == Retryable("server_error")
    false = status_error(anthropic.ConflictError, 409, {"x-should-retry": "false"})
    assert classify(false) is None


def test_the_httpx_recipe_classifies_too() -> None:
    response = httpx.Response(
        429, headers={"retry-after": "2"}, request=httpx.Request("POST", "https://x")
    )
    exc = anthropic.RateLimitError("slow down", response=response, body=None)  # type: ignore[arg-type]
    assert classify(exc) == Retryable("rate_limited", 2.0)


def test_a_wrapped_timeout_is_the_wrappers_business() -> None:
    class ToolError(Exception):
        pass

    try:
        try:
            raise TimeoutError
        except TimeoutError as inner:
            raise ToolError("search failed") from inner
    except ToolError as exc:
        assert classify(exc) is None


# -- the attempt loop -----------------------------------------------------------


class FakeSleep:
    def __init__(self, events: list[str] | None = None) -> None:
        self.delays: list[float] = []
        self.events = events

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.events is not None:
            self.events.append(f"sleep {delay:.6f}")


def failing(
    *errors: BaseException, then: object = "ok"
) -> tuple[Callable[[], Awaitable[Any]], list[int]]:
    """fn() raising ``errors`` in turn, then returning ``then``; and its call count."""
    calls = [0]

    async def fn() -> object:
        calls[0] += 1
        if calls[0] <= len(errors):
            raise errors[calls[0] - 1]
        return then

    return fn, calls


def rate_limited(retry_after: str | None = None) -> anthropic.APIStatusError:
    headers = {"retry-after": retry_after} if retry_after else None
    return status_error(anthropic.RateLimitError, 429, headers)


POLICY = RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=10.0)


async def test_success_after_two_failures_returns_two_records() -> None:
    events: list[str] = []
    sleep = FakeSleep(events)
    fn, calls = failing(status_error(anthropic.OverloadedError, 529), TimeoutError("read"))

    async def on_attempt(record: AttemptRecord) -> None:
        events.append(f"record {record.attempt} {record.delay:.6f}")

    outcome = await run_with_retries(
        fn, POLICY, on_attempt=on_attempt, sleep=sleep, rng=random.Random(3)
    )

    assert outcome.value == "ok" and outcome.calls == 3 and calls == [3]
    first, second = outcome.attempts
    assert (first.attempt, first.reason, first.error_type) == (1, "overloaded", "OverloadedError")
    assert (second.attempt, second.reason, second.error) == (2, "timeout", "read")
    assert first.will_retry and second.will_retry
    assert sleep.delays == [first.delay, second.delay]
    # Each record reaches the log before the sleep it announces.
    assert events == [
        f"record 1 {first.delay:.6f}",
        f"sleep {first.delay:.6f}",
        f"record 2 {second.delay:.6f}",
        f"sleep {second.delay:.6f}",
    ]
    rng = random.Random(3)
    assert [first.delay, second.delay] == [POLICY.delay(0, rng), POLICY.delay(1, rng)]


async def test_a_first_time_success_has_no_records() -> None:
    sleep = FakeSleep()
    outcome = await run_with_retries(failing()[0], POLICY, sleep=sleep)
    assert outcome.attempts == () and outcome.calls == 1 and sleep.delays == []


async def test_exhaustion_raises_with_every_record() -> None:
    records: list[AttemptRecord] = []

    async def on_attempt(record: AttemptRecord) -> None:
        records.append(record)

    errors = [anthropic.APIConnectionError(request=REQUEST) for _ in range(4)]
    fn, calls = failing(*errors)
    sleep = FakeSleep()
    with pytest.raises(RetriesExhausted) as caught:
        await run_with_retries(fn, POLICY, on_attempt=on_attempt, sleep=sleep)

    exc = caught.value
    assert calls == [4] and len(sleep.delays) == 3
    assert exc.attempts == tuple(records) and [r.attempt for r in records] == [1, 2, 3, 4]
    assert all(r.reason == "connection" for r in records)
    assert records[-1].delay is None and not records[-1].will_retry
    assert exc.last_error is errors[-1] and exc.__cause__ is errors[-1]
    assert isinstance(exc, AgentrtError) and exc.code is ErrorCode.RETRIES_EXHAUSTED
    assert "4 attempts" in str(exc)


async def test_a_non_retryable_error_propagates_at_once_after_its_record() -> None:
    records: list[AttemptRecord] = []

    async def on_attempt(record: AttemptRecord) -> None:
        records.append(record)

    bad = status_error(anthropic.BadRequestError, 400)
    fn, calls = failing(rate_limited(), bad)
    sleep = FakeSleep()
    with pytest.raises(anthropic.BadRequestError) as caught:
        await run_with_retries(fn, POLICY, on_attempt=on_attempt, sleep=sleep)

    assert caught.value is bad and calls == [2] and len(sleep.delays) == 1
    assert [(r.attempt, r.reason, r.delay is None) for r in records] == [
        (1, "rate_limited", False),
        (2, None, True),
    ]


async def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.01, max_retry_after=20.0)
    fn, _ = failing(rate_limited("7"), rate_limited("3600"))
    sleep = FakeSleep()
    outcome = await run_with_retries(fn, policy, sleep=sleep)
    assert sleep.delays == [7.0, 20.0]
    assert [r.retry_after for r in outcome.attempts] == [7.0, 3600.0]


async def test_one_attempt_means_no_retry() -> None:
    fn, calls = failing(rate_limited())
    with pytest.raises(RetriesExhausted):
        await run_with_retries(fn, RetryPolicy(max_attempts=1), sleep=FakeSleep())
    assert calls == [1]


async def test_a_custom_classifier_decides_for_a_tool() -> None:
    class Flaky(Exception):
        pass

    def classifier(exc: BaseException) -> Retryable | None:
        return Retryable("server_error") if isinstance(exc, Flaky) else classify(exc)

    fn, _ = failing(Flaky("502 from the search backend"))
    outcome = await run_with_retries(fn, POLICY, classifier=classifier, sleep=FakeSleep())
    assert [r.reason for r in outcome.attempts] == ["server_error"]


async def test_a_failing_on_attempt_stops_the_loop() -> None:
    async def on_attempt(record: AttemptRecord) -> None:
        raise RuntimeError("log is down")

    fn, calls = failing(rate_limited())
    with pytest.raises(RuntimeError, match="log is down"):
        await run_with_retries(fn, POLICY, on_attempt=on_attempt, sleep=FakeSleep())
    assert calls == [1]


async def test_cancellation_inside_the_call_is_never_retried() -> None:
    records: list[AttemptRecord] = []

    async def on_attempt(record: AttemptRecord) -> None:
        records.append(record)

    fn, calls = failing(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await run_with_retries(fn, POLICY, on_attempt=on_attempt, sleep=FakeSleep())
    assert calls == [1] and records == []


async def test_cancellation_while_waiting_to_retry_propagates() -> None:
    asleep = asyncio.Event()

    async def sleep_forever(delay: float) -> None:
        asleep.set()
        await asyncio.Event().wait()

    fn, calls = failing(rate_limited(), rate_limited())
    task = asyncio.create_task(run_with_retries(fn, POLICY, sleep=sleep_forever))
    await asleep.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [1]


async def test_an_asyncio_timeout_inside_the_call_is_retried() -> None:
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:  # asyncio.TimeoutError, which is TimeoutError since 3.11
            await asyncio.wait_for(asyncio.Event().wait(), 0.001)
        return "ok"

    outcome = await run_with_retries(fn, POLICY, sleep=FakeSleep())
    assert outcome.value == "ok" and [r.reason for r in outcome.attempts] == ["timeout"]


async def test_real_sleep_is_the_default() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001)
    outcome = await run_with_retries(failing(TimeoutError())[0], policy)
    assert outcome.calls == 2
