"""Durable steps: each LLM or tool call of an activation, recorded before the handler goes on."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from uuid import UUID

import asyncpg
import msgspec
import structlog
from opentelemetry.trace import StatusCode

from runtime.errors import ClaimLost, ConcurrencyConflict, StepDivergence, StepFailed
from runtime.events.builtin import StepRecorded
from runtime.events.ids import activation_stream
from runtime.events.model import NewEvent, RecordedEvent
from runtime.events.values import AttemptRecord, StepError, StepRef, Usage
from runtime.log import chain
from runtime.log.group import GroupWriter
from runtime.log.store import EventLog
from runtime.ops.tracing import current_traceparent, span

log = structlog.get_logger(__name__)

_canonical = msgspec.json.Encoder(order="sorted")
#: Tries to record a step's result when the connection drops meanwhile.
_APPEND_ATTEMPTS = 5


def request_hash(kind: str, name: str, request: Any) -> str:
    """sha256 over the canonical JSON of what a step asks for."""
    digest = hashlib.sha256()
    digest.update(kind.encode())
    digest.update(b"\0")
    digest.update(name.encode())
    digest.update(b"\0")
    digest.update(_canonical.encode(request))
    return digest.hexdigest()


class StepOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What one executed step produced: a JSON result or a final error."""

    result: Any = None
    error: StepError | None = None
    attempts: tuple[AttemptRecord, ...] = ()
    usage: Usage | None = None
    #: A cached answer (``runtime.llm.cache``): the step it repeats and what that one cost.
    cached_from: StepRef | None = None
    saved: Usage | None = None


StepCall = Callable[[], Awaitable[StepOutput]]


class StepGuard(Protocol):
    """Makes an activation's steps exclusive (the worker's claim, ``runtime.worker.claims``)."""

    async def before_load(self) -> None:
        """Before the record is read: take the activation's claim (may wait for another)."""

    async def before_execute(self) -> bool:
        """Before a step is executed (not answered from the record): the claim still holds
        (False), or lapsed and was taken again (True: the record is checked again)."""


class Steps:
    """The durable steps of one activation.

    ``run`` numbers calls 1, 2, ...; a step already in the log returns its
    recorded output (after checking that the handler asks for the same thing),
    any other is executed and appended at version = its number before ``run``
    returns. Two workers executing the same step (a reclaimed activation whose
    first worker is still alive) meet at the log's unique (stream, version)
    index: the loser takes the winner's result, so every later step sees one
    history.

    With ``log=None`` the steps are only those given as ``recorded`` (replay,
    fork, time travel: no SQL); a step beyond them is executed and kept here,
    not written, and its number listed in ``executed``.

    With a ``writer`` (the worker's :class:`~runtime.log.group.GroupWriter`)
    a step's record joins the other activations' in one statement: the same
    guarantee (``run`` returns only once it is durable, or with the result
    another worker recorded first), a share of a flush instead of one each.
    """

    def __init__(
        self,
        log: EventLog | None,
        *,
        activation_id: UUID,
        run_id: UUID,
        agent: str,
        trigger_id: UUID,
        recorded: dict[int, StepRecorded] | None = None,
        lazy: bool = False,
        guard: StepGuard | None = None,
        writer: GroupWriter | None = None,
    ) -> None:
        """``lazy``: read the recorded steps from the log only when the first step is taken
        (an activation that takes none then costs no read). ``guard``: called before
        the record is read and before each executed step (the worker's claim)."""
        self._log = log
        self._guard = guard
        self._writer = writer if log is not None else None
        #: version -> hash of the activation stream's events known here (the chain
        #: link a group-written step needs); 0 is the empty stream's.
        self._hashes: dict[int, bytes] = {0: chain.GENESIS}
        self._loaded = not lazy or log is None
        self.activation_id = activation_id
        self.run_id = run_id
        self.agent = agent
        self.trigger_id = trigger_id
        self.stream = activation_stream(activation_id)
        self.recorded: dict[int, StepRecorded] = dict(recorded or {})
        #: Steps taken by this attempt so far (recorded or executed).
        self.count = 0
        #: How many of them were answered from the log.
        self.reused = 0
        #: Numbers of the steps this attempt executed (called, not answered from the record).
        self.executed: list[int] = []

    @classmethod
    async def load(
        cls, log: EventLog, *, activation_id: UUID, run_id: UUID, agent: str, trigger_id: UUID
    ) -> Steps:
        steps = cls(log, activation_id=activation_id, run_id=run_id, agent=agent,
                    trigger_id=trigger_id, lazy=True)  # fmt: skip
        await steps.ensure_loaded()
        return steps

    async def ensure_loaded(self) -> None:
        """Read the steps earlier attempts recorded (once)."""
        if self._loaded or self._log is None:
            return
        if self._guard is not None:
            # The claim first: once it is ours nobody else adds to the record.
            await self._guard.before_load()
        if self._writer is not None:
            # With the other activations' reads, in one query.
            self._learn(await self._writer.reads.read(self.stream))
        else:
            after = 1
            while True:
                page = await self._log.read_stream(self.stream, after, limit=1000)
                self._learn(page)
                if len(page) < 1000:
                    break
                after = page[-1].stream_version + 1
        self._loaded = True

    def _learn(self, events: list[RecordedEvent]) -> None:
        for ev in events:
            self._hashes[ev.stream_version] = ev.hash
            if isinstance(ev.body, StepRecorded):
                self.recorded.setdefault(ev.stream_version, ev.body)

    @property
    def log(self) -> EventLog | None:
        """The log these steps are written to (None: replay, fork and time travel)."""
        return self._log

    @property
    def next_step(self) -> int:
        return self.count + 1

    async def run(self, kind: str, name: str, request: Any, call: StepCall) -> StepRecorded:
        """The recorded step for this call: from the log, or executed and appended now.

        Raises :class:`StepDivergence` when the log holds a different call at
        this step. The caller turns a recorded error into an exception
        (:func:`raise_if_failed`).
        """
        await self.ensure_loaded()
        self.count += 1
        n = self.count
        wanted = request_hash(kind, name, request)
        recorded = self.recorded.get(n)
        if recorded is not None:
            self._check(recorded, kind, name, wanted)
            self.reused += 1
            return recorded
        # An executed step is a span, a child of the activation's; a step answered
        # from the record above is none (the activation's span counts them).
        with (
            structlog.contextvars.bound_contextvars(step=n),
            span(
                f"{kind} {name}",
                attributes={"agentrt.step": n, "agentrt.step.kind": kind,
                            "agentrt.step.name": name},
            ) as step_span,
        ):  # fmt: skip
            if self._guard is not None and await self._guard.before_execute():
                await self._check_untouched(n)
            started = time.perf_counter()
            output = await call()
            if output.cached_from is not None:  # answered by the response cache, not called
                step_span.set_attribute("agentrt.step.cached", True)
            if output.error is not None:
                step_span.set_status(
                    StatusCode.ERROR, f"{output.error.type}: {output.error.message}"
                )
            body = StepRecorded(
                activation_id=self.activation_id,
                agent=self.agent,
                step=n,
                kind=kind,
                name=name,
                request_hash=wanted,
                request=request,
                result=output.result,
                error=output.error,
                attempts=list(output.attempts),
                usage=output.usage,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                cached_from=output.cached_from,
                saved=output.saved,
            )
            event = NewEvent(
                body=body, run_id=self.run_id, causation_id=self.trigger_id, producer=self.agent,
                trace=current_traceparent(),
            )  # fmt: skip
            self.executed.append(n)
            if self._log is not None:
                # A handler cancelled now (its timeout, a stop) still leaves the
                # result it paid for in the log: the group writer has queued the
                # row before this first yields; the single path is shielded.
                winner = await self._record(event, n)
                if winner is not None:
                    # Another worker recorded this step first: its result is the one.
                    log.warning("step.lost_race", step=n, kind=kind, name=name)
                    self._check(winner, kind, name, wanted)
                    body = winner
            self.recorded[n] = body
            log.info("step.recorded", kind=kind, name=name, ms=body.duration_ms,
                     failed=body.error is not None, retries=len(body.attempts))  # fmt: skip
            return body

    async def _check_untouched(self, n: int) -> None:
        """After the claim lapsed and was taken again: nobody recorded step ``n`` meanwhile
        (if someone did, that worker ran this activation on; this one stops)."""
        if self._log is not None and await self._log.read_stream(self.stream, n, limit=1):
            raise ClaimLost(f"activation {self.activation_id}: step {n} was recorded by "
                            "another worker while this one's claim had lapsed")  # fmt: skip

    async def _record(self, event: NewEvent, n: int) -> StepRecorded | None:
        """Write step ``n``; the step another worker recorded there first, if one did."""
        prev = self._hashes.get(n - 1)
        if self._writer is not None and prev is not None:
            written = await self._writer.append(self.stream, event, n, prev)
            self._hashes[n] = written.hash
            if written.winner is None:
                return None
            if not isinstance(written.winner.body, StepRecorded):
                raise ConcurrencyConflict(self.stream, n - 1, None)
            return written.winner.body
        try:
            await asyncio.shield(self._append(event, n))
        except ConcurrencyConflict:
            assert self._log is not None
            page = await self._log.read_stream(self.stream, n, limit=1)
            if not page or not isinstance(page[0].body, StepRecorded):
                raise
            self._hashes[n] = page[0].hash
            return page[0].body
        return None

    async def _append(self, event: NewEvent, n: int) -> None:
        """Append the step's record, retrying a dropped connection: the result may have
        cost money or had effects, and ``expected_version`` makes a repeat safe (the
        same event id re-appended is a no-op; another worker's step is a conflict)."""
        assert self._log is not None
        delay = 0.05
        for attempt in range(1, _APPEND_ATTEMPTS + 1):
            try:
                await self._log.append(self.stream, [event], expected_version=n - 1)
                return
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
                if attempt == _APPEND_ATTEMPTS:
                    raise
                log.warning("step.append_retry", step=n, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _check(self, recorded: StepRecorded, kind: str, name: str, wanted: str) -> None:
        if (recorded.kind, recorded.name, recorded.request_hash) != (kind, name, wanted):
            raise StepDivergence(
                self.activation_id,
                recorded.step,
                recorded=f"{recorded.kind} {recorded.name!r}",
                requested=f"{kind} {name!r}",
                same_call=(recorded.kind, recorded.name) == (kind, name),
            )

    def check_complete(self) -> None:
        """After the handler returned: the log must not hold steps it no longer takes.

        (A lazy Steps that took no step has read nothing: the worker loads
        eagerly for every redelivery, where that check matters.)"""
        extra = sorted(k for k in self.recorded if k > self.count)
        if extra:
            step = self.recorded[extra[0]]
            raise StepDivergence(
                self.activation_id,
                step.step,
                recorded=f"{step.kind} {step.name!r}",
                requested="no call (the handler returned)",
                same_call=False,
            )


def raise_if_failed(step: StepRecorded) -> None:
    """Raise the step's recorded final error, the same on every retry and replay."""
    if step.error is not None:
        raise StepFailed(step.step, step.kind, step.name, step.error.type, step.error.message,
                         step.error.code)  # fmt: skip
