"""The dead-letter stream: entries whose activations kept failing; listing, showing and
redriving them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import redis.asyncio as aioredis
import structlog

from runtime.agents.context import activation_id_for
from runtime.errors import AgentrtError, DeadLetterNotFound, RedriveRefused
from runtime.events.builtin import ActivationDeadLettered, DeadLetterRedriven
from runtime.events.ids import dead_letters_stream, run_stream
from runtime.events.model import NewEvent
from runtime.log.queries import LogQueries
from runtime.log.store import EventLog
from runtime.ops import metrics
from runtime.ops.tracing import current_traceparent
from runtime.streams.keys import DLQ_STREAM, agent_stream, is_cluster
from runtime.worker.delivery import Delivery, inbox_id

log = structlog.get_logger(__name__)

#: uuid5 namespace of the log events the worker writes about dead letters.
_DLQ_NAMESPACE = uuid.UUID("0b7d2d6e-8f0a-4c2e-9a51-3c1f3e9f2a77")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    agent: str
    stream: str
    entry_id: str
    deliveries: int
    error_type: str
    error: str
    at: str
    event_id: str | None
    type: str | None
    run_id: str | None
    generation: int
    #: The original entry's fields (bodies as text).
    fields: dict[str, str]
    #: Sent by a forced redrive (``--force``): keyed in the inbox apart from the event.
    forced: bool = False

    @property
    def inbox_id(self) -> UUID | None:
        if self.event_id is None:
            return None
        return inbox_id(UUID(self.event_id), self.generation, forced=self.forced)


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _parse(entry_id: Any, raw: dict[Any, Any]) -> DeadLetter:
    f = {_text(k): _text(v) for k, v in raw.items()}
    original = {k: v for k, v in f.items() if not k.startswith("dlq_")}
    return DeadLetter(
        id=_text(entry_id),
        agent=f.get("dlq_agent", "?"),
        stream=f.get("dlq_stream", "?"),
        entry_id=f.get("dlq_entry_id", "?"),
        deliveries=int(f.get("dlq_deliveries", "0")),
        error_type=f.get("dlq_error_type", "?"),
        error=f.get("dlq_error", ""),
        at=f.get("dlq_at", ""),
        event_id=original.get("event_id"),
        type=original.get("type"),
        run_id=original.get("run_id") or original.get("event_id"),
        generation=int(original.get("generation", "0") or 0),
        fields=original,
        forced=original.get("forced") == "1",
    )


async def list_dead_letters(
    redis: aioredis.Redis, *, agent: str | None = None, count: int = 100
) -> list[DeadLetter]:
    """Oldest first, at most ``count`` (after filtering by ``agent``)."""
    out: list[DeadLetter] = []
    start = "-"
    while len(out) < count:
        page = await redis.xrange(DLQ_STREAM, min=start, count=500)
        if not page:
            break
        for entry_id, raw in page:
            letter = _parse(entry_id, raw or {})
            if agent is None or letter.agent == agent:
                out.append(letter)
        last = _text(page[-1][0])
        ms, _, seq = last.partition("-")
        start = f"{ms}-{int(seq) + 1}"
        if len(page) < 500:
            break
    return out[:count]


async def _entry(redis: aioredis.Redis, dead_letter_id: str) -> dict[Any, Any]:
    """The dead letter's raw fields (bytes as stored); raises DeadLetterNotFound."""
    page = await redis.xrange(DLQ_STREAM, min=dead_letter_id, max=dead_letter_id, count=1)
    if not page:
        raise DeadLetterNotFound(dead_letter_id, DLQ_STREAM)
    return page[0][1] or {}


async def get_dead_letter(redis: aioredis.Redis, dead_letter_id: str) -> DeadLetter:
    return _parse(dead_letter_id, await _entry(redis, dead_letter_id))


class RedrivePlan(msgspec.Struct, frozen=True, kw_only=True):
    """What a redrive did: the new entry, and whether it was forced past the inbox."""

    dead_letter_id: str
    entry_id: str
    generation: int
    forced: bool


async def redrive(
    redis: aioredis.Redis, log: EventLog, dead_letter_id: str, *, force: bool = False
) -> RedrivePlan:
    """Send a dead letter back to its agent as a fresh activation.

    Refused (:class:`RedriveRefused`) when the agent has handled the event
    since (a worker that lost its lease committed it while another
    dead-lettered it, say): a redrive would run the handler again. With
    ``force`` it goes anyway, as a second activation of the event with an
    inbox row of its own.

    The entry goes to the agent's own stream with its generation bumped, so
    the activation starts with no recorded steps (the failed attempt's steps
    stay in the log, under the old activation); its tool calls carry the
    original activation's idempotency keys, so an idempotent tool answers
    with its earlier result. Recorded in the log as ``dead_letter.redriven``,
    then removed from the dead-letter stream, in one MULTI with the XADD (one
    after the other on a Redis Cluster, where the two streams are in different
    slots).
    """
    entry = await _entry(redis, dead_letter_id)
    letter = _parse(dead_letter_id, entry)
    forced = letter.forced
    if letter.inbox_id is not None:
        row = await LogQueries(log).inbox_row(letter.agent, letter.inbox_id)
        if row is not None:
            if not force:
                raise RedriveRefused(
                    f"dead letter {dead_letter_id}: agent {letter.agent!r} has handled event "
                    f"{letter.event_id} since (activation {row.activation_id}, outcome "
                    f"{row.outcome}, at {row.committed_at.isoformat(timespec='seconds')}); "
                    "a redrive would run its handler a second time. --force does that: a new "
                    "activation whose model calls are made again, whose tool calls carry the "
                    "original idempotency keys (an idempotent tool answers with its earlier "
                    "result), and whose emitted events commit as a second activation of the event"
                )
            forced = True
    # The original fields as stored (bytes: `raw` bodies are not text).
    raw: dict[Any, Any] = {_text(k): v for k, v in entry.items() if not _text(k).startswith("dlq_")}
    generation = letter.generation + 1
    raw["generation"] = str(generation)
    if forced:
        raw["forced"] = "1"
    target = agent_stream(letter.agent)
    if letter.event_id is not None:
        event_id = UUID(letter.event_id)
        run_id = UUID(letter.run_id) if letter.run_id else event_id
        await log.append(
            run_stream(run_id),
            [
                NewEvent(
                    body=DeadLetterRedriven(
                        agent=letter.agent,
                        trigger_id=event_id,
                        dead_letter_id=dead_letter_id,
                        generation=generation,
                        to_stream=target,
                        forced=forced,
                    ),
                    run_id=run_id,
                    causation_id=event_id,
                    producer="operator",
                )
            ],
        )
    if is_cluster(redis):
        # The agent's stream and the dead-letter stream are in different slots
        # of a Redis Cluster, and no MULTI spans two. Write first, then delete:
        # a crash in between leaves the dead letter in place, and redriving it
        # again is refused once the first copy was handled (the inbox, above) or,
        # if both copies are in the stream at once, runs once (the activation
        # claim and the inbox: they share the generation, so the activation id).
        new_id = await redis.xadd(target, raw)
        await redis.xdel(DLQ_STREAM, dead_letter_id)
    else:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(target, raw)
            pipe.xdel(DLQ_STREAM, dead_letter_id)
            new_id, _ = await pipe.execute()
    return RedrivePlan(dead_letter_id=dead_letter_id, entry_id=_text(new_id),
                       generation=generation, forced=forced)  # fmt: skip


async def dead_letter(
    lg: EventLog,
    redis: aioredis.Redis,
    agent: str,
    stream: str,
    entry_id: str,
    fields: dict[Any, Any],
    d: Delivery | None,
    exc: BaseException,
    deliveries: int,
) -> bool:
    """Record the error in the log, move the entry to the DLQ stream, acknowledge it.

    ``d`` is None for an entry that never decoded into an event (poison): its
    record goes to the agent's ``dead-letters-<agent>`` stream. An event whose
    activation committed meanwhile (another worker's copy) is acknowledged
    instead: False.
    """
    if d is not None and await LogQueries(lg).handled(agent, d.inbox_id):
        await redis.xack(stream, agent, entry_id)
        log.info("activation.duplicate", reason="committed elsewhere; not dead-lettered")
        return False
    code = str(exc.code) if isinstance(exc, AgentrtError) else None
    trigger_id = d.event_id if d is not None else uuid.uuid5(_DLQ_NAMESPACE, f"{stream}/{entry_id}")
    aid = activation_id_for(agent, trigger_id, d.generation if d else 0)
    event = ActivationDeadLettered(
        agent=agent,
        activation_id=aid,
        trigger_id=trigger_id,
        trigger_type=d.type if d is not None else "",
        stream=stream,
        entry_id=entry_id,
        deliveries=deliveries,
        error_type=type(exc).__name__,
        error=str(exc),
        error_code=code,
    )
    # A deterministic id: a crash before the XACK repeats this append as a no-op.
    new = NewEvent(
        body=event,
        event_id=uuid.uuid5(_DLQ_NAMESPACE, f"{agent}/{stream}/{entry_id}"),
        run_id=d.run_id if d is not None else None,
        causation_id=d.event_id if d is not None else None,
        producer=agent,
        trace=current_traceparent(),  # the failed activation's span
    )
    target = run_stream(d.run_id) if d is not None else dead_letters_stream(agent)
    await lg.append(target, [new])
    dlq_fields: dict[Any, Any] = dict(fields)
    dlq_fields.update(
        {
            "dlq_agent": agent,
            "dlq_stream": stream,
            "dlq_entry_id": entry_id,
            "dlq_deliveries": str(deliveries),
            "dlq_error_type": type(exc).__name__,
            "dlq_error": str(exc)[:4000],
            "dlq_at": datetime.now(UTC).isoformat(),
        }
    )
    if is_cluster(redis):
        # The entry's stream and the dead-letter stream are in different slots
        # of a Redis Cluster, and no MULTI spans two. Write, then acknowledge:
        # a crash in between leaves the entry pending, so it is delivered again
        # and dead-lettered again (a second dead letter of the same event, never
        # none); redriving both runs it once (see :func:`redrive`), and its log
        # record above has a deterministic id, so it is not doubled.
        await redis.xadd(DLQ_STREAM, dlq_fields)
        await redis.xack(stream, agent, entry_id)
    else:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(DLQ_STREAM, dlq_fields)
            pipe.xack(stream, agent, entry_id)
            await pipe.execute()
    metrics.DEAD_LETTERS.labels(agent).inc()
    metrics.ACTIVATIONS.labels(agent, "dead_lettered").inc()
    log.error("activation.dead_lettered", deliveries=deliveries, error=str(exc))
    return True
