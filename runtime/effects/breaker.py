"""Circuit breakers per tool, shared by every worker through Redis.

A breaker is one Redis hash, ``agentrt:breaker:<name>``, and every change to
it is made by a Lua script, so concurrent workers cannot interleave a
read-modify-write. The scripts read the clock with ``redis.call('TIME')``:
workers whose clocks disagree still agree on when a breaker may be probed.

States and rules:

- ``closed``: calls pass. ``failure_threshold`` *consecutive* failures open
  the breaker; any success resets the count. Consecutive failures need no
  window to tune and no per-call history in Redis; a tool that fails one
  call in two is slow rather than down and is left to the retry policy.
- ``open``: calls fail fast with :class:`CircuitOpen` until ``reset_timeout``
  seconds have passed since it opened.
- ``half_open``: the first caller after that gets the one *probe* permit;
  everyone else fails fast while it is in flight. The probe's success closes
  the breaker, its failure opens it again for another ``reset_timeout``. A
  probe that never reports (its worker died) holds the slot for at most
  ``probe_timeout`` seconds; then the next caller becomes the probe, and
  the first probe's report, should it come after all, is ignored.

Every permit carries the breaker's *generation*, bumped at each state change,
and a probe also carries a random token. A result reported under an older
generation, or by a probe whose slot has expired, is ignored: a call that
started before the breaker opened must not reopen a breaker that has since
been closed by a successful probe, nor count twice.

Calls that change the state return a :class:`Transition` (``before_call``
puts it on the permit) so the caller can append a ``circuit.*`` event.

A closed breaker need not cost two round trips per call. With ``cache_ttl``
(the worker's ``AGENTRT_BREAKER_CACHE``) a breaker that Redis reported
closed is trusted here for that many seconds: ``before_call`` grants a
permit locally, and a success is not reported while no failure is counted
(the script would change nothing). Failures are always reported at once,
and a failure reported under an older generation (the breaker changed
elsewhere) ends the trust at once. The bound: a breaker opened by another
worker is seen here within ``cache_ttl`` or at this worker's next failure,
whichever is first; a success here resets another worker's failure count
within ``cache_ttl``. Open and half-open are never cached, and the trust is
capped at ``reset_timeout``, so by the time an open breaker may be probed no
worker still trusts a closed state from before it opened: one probe at a
time holds as before, and every transition is still made (and logged) by
the scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from runtime.errors import CircuitOpen
from runtime.streams.keys import KEY_PREFIX

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "Permit",
    "State",
    "Transition",
    "breaker_key",
]

log = structlog.get_logger(__name__)


def breaker_key(name: str) -> str:
    return f"{KEY_PREFIX}breaker:{name}"


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """A state change, timed by the Redis server's clock."""

    name: str
    from_state: State
    to_state: State
    at: datetime
    failures: int
    """Consecutive failures counted when the change happened."""


class Permit(msgspec.Struct, frozen=True, kw_only=True):
    """Leave to make one call; hand it back to ``record_success`` / ``record_failure``."""

    name: str
    generation: int
    probe_token: str | None = None
    """Set when this call is the half-open probe."""
    transition: Transition | None = None
    """open → half_open, when taking this permit made that change."""

    @property
    def probe(self) -> bool:
        return self.probe_token is not None


class BreakerState(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a breaker, as stored (nothing is changed by reading it)."""

    name: str
    state: State
    failures: int
    generation: int
    opened_at: datetime | None
    retry_in: float
    """Seconds until ``before_call`` would grant a permit (0: it would now)."""
    probe_in_flight: bool


# All times are integer milliseconds of the Redis server's clock. Lua numbers
# are doubles (exact to 2**53, about 285 000 years of ms) but a script's reply
# truncates them to integers, hence ms rather than fractional seconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] breaker; ARGV reset_ms, probe_ms, token.
# -> {verdict, generation, wait_ms, now_ms, failures, from_state}
# verdict: 'pass' (closed), 'probe' (token holds the slot), 'open', 'busy'.
_BEFORE_CALL = (
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures', 'opened_at', 'probe_until')
local state = h[1] or 'closed'
local gen = tonumber(h[2] or '0')
local failures = tonumber(h[3] or '0')
if state == 'closed' then
  return {'pass', gen, 0, now, failures, ''}
end
local probe_until = now + tonumber(ARGV[2])
if state == 'open' then
  local ready = tonumber(h[4]) + tonumber(ARGV[1])
  if now < ready then
    return {'open', gen, ready - now, now, failures, ''}
  end
  gen = gen + 1
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'gen', gen,
             'probe_token', ARGV[3], 'probe_until', probe_until)
  return {'probe', gen, 0, now, failures, 'open'}
end
local busy_until = tonumber(h[5] or '0')
if now < busy_until then
  return {'busy', gen, busy_until - now, now, failures, ''}
end
redis.call('HSET', KEYS[1], 'probe_token', ARGV[3], 'probe_until', probe_until)
return {'probe', gen, 0, now, failures, ''}
"""
)

# KEYS[1] breaker; ARGV outcome ('success' | 'failure' | 'release'), generation,
# token ('' unless a probe), failure_threshold.
# -> {verdict, generation, failures, now_ms, from_state}
# verdict: 'counted', 'stale' (ignored), or the new state.
_RECORD = (
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures', 'probe_token')
local state = h[1] or 'closed'
local gen = tonumber(h[2] or '0')
local failures = tonumber(h[3] or '0')
local outcome = ARGV[1]
if tonumber(ARGV[2]) ~= gen then
  return {'stale', gen, failures, now, ''}
end
if state == 'closed' then
  if outcome == 'success' and failures ~= 0 then
    redis.call('HSET', KEYS[1], 'failures', 0)
    return {'counted', gen, 0, now, ''}
  end
  if outcome ~= 'failure' then
    return {'counted', gen, failures, now, ''}
  end
  failures = failures + 1
  if failures < tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'gen', gen, 'failures', failures)
    return {'counted', gen, failures, now, ''}
  end
  gen = gen + 1
  redis.call('HSET', KEYS[1], 'state', 'open', 'gen', gen, 'failures', failures, 'opened_at', now)
  return {'open', gen, failures, now, 'closed'}
end
-- Only the probe holding the slot may report in half_open. A slow probe
-- whose slot expired still may, as long as no other caller has taken it.
if state ~= 'half_open' or h[4] ~= ARGV[3] then
  return {'stale', gen, failures, now, ''}
end
if outcome == 'release' then
  redis.call('HDEL', KEYS[1], 'probe_token', 'probe_until')
  return {'counted', gen, failures, now, ''}
end
gen = gen + 1
redis.call('HDEL', KEYS[1], 'probe_token', 'probe_until')
if outcome == 'success' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'gen', gen, 'failures', 0)
  redis.call('HDEL', KEYS[1], 'opened_at')
  return {'closed', gen, 0, now, 'half_open'}
end
failures = failures + 1
redis.call('HSET', KEYS[1], 'state', 'open', 'gen', gen, 'failures', failures, 'opened_at', now)
return {'open', gen, failures, now, 'half_open'}
"""
)

# KEYS[1] breaker; ARGV reset_ms.
# -> {state, generation, failures, opened_at_ms (or -1), wait_ms, probe_in_flight}
_STATE = (
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures', 'opened_at', 'probe_until')
local state = h[1] or 'closed'
local opened_at = tonumber(h[4] or '-1')
local wait, busy = 0, 0
if state == 'open' then
  wait = math.max(0, opened_at + tonumber(ARGV[1]) - now)
elseif state == 'half_open' and now < tonumber(h[5] or '0') then
  wait, busy = tonumber(h[5]) - now, 1
end
return {state, tonumber(h[2] or '0'), tonumber(h[3] or '0'), opened_at, wait, busy}
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class CircuitBreaker:
    """One named breaker; any number of instances, in any processes, share its state.

    ``redis`` may decode responses or not. Timeouts are in seconds and are
    sent with every call, so all workers should use the same settings for a
    given name (the last caller's values are the ones applied).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        probe_timeout: float = 60.0,
        cache_ttl: float = 0.0,
    ) -> None:
        if not name:
            raise ValueError("a breaker needs a name")
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout < 0 or probe_timeout <= 0:
            raise ValueError("reset_timeout must be >= 0 and probe_timeout > 0")
        if cache_ttl < 0:
            raise ValueError("cache_ttl must be >= 0")
        self.name = name
        self.key = breaker_key(name)
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.probe_timeout = probe_timeout
        #: Seconds a closed state read from Redis is trusted here (see the module doc).
        self.cache_ttl = min(cache_ttl, reset_timeout)
        #: Monotonic time until which the breaker is trusted closed (0: ask Redis).
        self._closed_until = 0.0
        #: The generation and failure count Redis reported with that closed state.
        self._gen = 0
        self._failures = 0
        self._redis = redis
        self._before_call = redis.register_script(_BEFORE_CALL)
        self._record = redis.register_script(_RECORD)
        self._state = redis.register_script(_STATE)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r})"

    @property
    def _reset_ms(self) -> int:
        return round(self.reset_timeout * 1000)

    def _trusted(self) -> bool:
        return self._closed_until > 0 and time.monotonic() < self._closed_until

    def _trust(self, sent: float, generation: int, failures: int) -> None:
        """Redis reported the breaker closed in a reply to a request sent at ``sent``."""
        if self.cache_ttl > 0:
            self._closed_until = sent + self.cache_ttl
            self._gen, self._failures = generation, failures

    def _distrust(self) -> None:
        self._closed_until = 0.0

    async def before_call(self) -> Permit:
        """A permit for one call, or :class:`CircuitOpen` if the breaker refuses it."""
        if self._trusted():
            return Permit(name=self.name, generation=self._gen)
        token = secrets.token_hex(8)
        sent = time.monotonic()
        reply = await self._before_call(
            keys=[self.key], args=[self._reset_ms, round(self.probe_timeout * 1000), token]
        )
        verdict, gen, wait_ms, now_ms, failures, from_state = reply
        verdict = _text(verdict)
        if verdict == "pass":
            self._trust(sent, int(gen), int(failures))
        else:
            self._distrust()
        if verdict in ("open", "busy"):
            raise CircuitOpen(self.name, int(wait_ms) / 1000)
        transition = None
        if _text(from_state):
            transition = Transition(
                name=self.name,
                from_state=State(_text(from_state)),
                to_state=State.HALF_OPEN,
                at=_at(int(now_ms)),
                failures=int(failures),
            )
        return Permit(
            name=self.name,
            generation=int(gen),
            probe_token=token if verdict == "probe" else None,
            transition=transition,
        )

    async def record_success(self, permit: Permit) -> Transition | None:
        """Count a success; returns the transition if it closed the breaker."""
        if (not permit.probe and self._trusted() and permit.generation == self._gen
                and self._failures == 0):  # fmt: skip
            return None  # closed with no failure counted: the script would change nothing
        return await self._report("success", permit)

    async def record_failure(self, permit: Permit) -> Transition | None:
        """Count a failure; returns the transition if it opened the breaker."""
        return await self._report("failure", permit)

    async def release(self, permit: Permit) -> None:
        """Give up a permit without a verdict (the call was cancelled, or proved nothing).

        A probe's slot is freed so the next caller can probe at once rather
        than after ``probe_timeout``; other permits need no bookkeeping.
        """
        if permit.probe:
            await self._report("release", permit)

    async def _report(self, outcome: str, permit: Permit) -> Transition | None:
        if permit.name != self.name:
            raise ValueError(f"permit for {permit.name!r} reported to breaker {self.name!r}")
        sent = time.monotonic()
        reply = await self._record(
            keys=[self.key],
            args=[outcome, permit.generation, permit.probe_token or "", self.failure_threshold],
        )
        verdict, gen, failures, now_ms, from_state = reply
        verdict, from_state = _text(verdict), _text(from_state)
        if verdict == "closed" or (verdict == "counted" and not permit.probe):
            # Still (or again) closed under this generation, with this many failures.
            self._trust(sent, int(gen), int(failures))
        elif verdict != "counted":
            self._distrust()  # opened, or a report under an older generation: ask next time
        if not from_state:
            if verdict == "stale":
                log.debug("breaker.stale_report", breaker=self.name, outcome=outcome)
            return None
        return Transition(
            name=self.name,
            from_state=State(from_state),
            to_state=State(verdict),
            at=_at(int(now_ms)),
            failures=int(failures),
        )

    async def state(self) -> BreakerState:
        """The stored state; an open breaker past its reset_timeout reads open, retry_in 0."""
        reply = await self._state(keys=[self.key], args=[self._reset_ms])
        state, gen, failures, opened_ms, wait_ms, busy = reply
        return BreakerState(
            name=self.name,
            state=State(_text(state)),
            failures=int(failures),
            generation=int(gen),
            opened_at=_at(int(opened_ms)) if int(opened_ms) >= 0 else None,
            retry_in=int(wait_ms) / 1000,
            probe_in_flight=bool(int(busy)),
        )

    @contextlib.asynccontextmanager
    async def call(
        self,
        *,
        wait: float | None = None,
        is_failure: Callable[[Exception], bool] = lambda exc: True,
    ) -> AsyncIterator[Permit]:
        """Guard the body: its exception is a failure, its normal exit a success.

        ``wait`` (seconds) waits for a permit (:meth:`acquire`) instead of
        failing fast. Exceptions always propagate. One for which
        ``is_failure`` is false (a validation error the tool never saw, say)
        and ``CancelledError`` count as neither: the permit is released.
        A Redis error while recording is logged, not raised, so that it can
        neither hide the body's own error nor turn a call that succeeded (and
        may have had effects) into an apparent failure.
        """
        permit = await (self.before_call() if wait is None else self.acquire(wait))
        try:
            yield permit
        except asyncio.CancelledError:
            with contextlib.suppress(RedisError, OSError):
                await self.release(permit)
            raise
        except Exception as exc:
            if is_failure(exc):
                await self._record_quietly(self.record_failure, permit)
            else:
                await self._record_quietly(self.release, permit)
            raise
        else:
            await self._record_quietly(self.record_success, permit)

    async def _record_quietly(self, record: Callable[[Permit], Any], permit: Permit) -> None:
        try:
            await record(permit)
        except (RedisError, OSError) as exc:
            log.warning("breaker.record_failed", breaker=self.name, error=str(exc))

    # `timeout` rather than asyncio.timeout(): running out is an answer
    # (CircuitOpen, False), not a cancellation in the middle of a Redis call.
    async def acquire(self, timeout: float) -> Permit:  # noqa: ASYNC109
        """Like :meth:`before_call`, but waits up to ``timeout`` seconds for a permit.

        The caller may be handed the probe, which is what keeps waiting live:
        if every run only waited for someone else to probe, nobody would.
        Raises the last :class:`CircuitOpen` when time runs out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = 0.05
        while True:
            try:
                return await self.before_call()
            except CircuitOpen as refused:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
                # Poll at least every `backoff` so a probe that closes the
                # breaker early is noticed; never sleep past the deadline.
                await asyncio.sleep(min(refused.retry_in, backoff, remaining) + 0.001)
                backoff = min(backoff * 2, 1.0)

    async def wait_until_closed(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Poll until the breaker is closed; False if it is not within ``timeout`` seconds.

        This only watches: it never takes the probe. If nobody else calls
        through the breaker it cannot close, so a run that wants to go ahead
        as soon as it may should use :meth:`acquire` (or ``call(wait=...)``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = 0.05
        while True:
            snapshot = await self.state()
            if snapshot.state is State.CLOSED:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 1.0)
