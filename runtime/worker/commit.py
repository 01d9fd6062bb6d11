"""An activation's commit: its outputs and its inbox row in one statement (promise 2)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from uuid import UUID

import asyncpg

from runtime.errors import ConcurrencyConflict, DuplicateEventMismatch
from runtime.events.ids import run_stream
from runtime.events.model import NewEvent
from runtime.log.group import MarkedAppends
from runtime.log.queries import LogQueries
from runtime.log.store import ANY_VERSION, NO_STREAM, EventLog
from runtime.worker.delivery import Delivery

#: How often a lost race on the run stream is retried before the activation fails.
COMMIT_ATTEMPTS = 12


async def commit_activation(
    log: EventLog,
    queries: LogQueries,
    agent: str,
    d: Delivery,
    aid: UUID,
    outputs: Sequence[NewEvent],
    trigger: NewEvent | None,
    trigger_in_log: bool,
    outcome: str,
    group: MarkedAppends | None = None,
) -> bool:
    """The activation's one transaction; False if its inbox row was there already.

    One statement (so one round trip, atomic without BEGIN/COMMIT): the
    trigger if the log lacks it, the outputs, and the inbox row. A lost
    race (another activation of the run appended first, or wrote the
    trigger) rolls it back whole; it is tried again. With ``group`` the
    first try shares its transaction with other activations committing at
    the same moment (each one's outcome its own); a lost race there is tried
    again on this activation's own.
    """
    marker = (agent, d.inbox_id, aid, outcome, d.run_id)
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        events = list(outputs)
        expected = ANY_VERSION
        if trigger is not None and not trigger_in_log:
            events.insert(0, trigger)
            if d.run_id == d.event_id and attempt == 1:
                # Most likely the run's first event, its stream new: the
                # chain is computed here and the rows go straight in (no
                # function). If the stream exists after all (a redrive,
                # another agent), the retry appends at any version.
                expected = NO_STREAM
        if group is not None and attempt == 1:
            shared = await group.append(run_stream(d.run_id), events, marker, expected)
            if shared != "conflict":
                return shared == "committed"
            if trigger is not None:
                trigger_in_log = await queries.has_event(d.event_id)
            continue
        try:
            await log.append_marked(run_stream(d.run_id), events, marker, expected)
            return True
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "inbox_pkey":
                return False
            lost: Exception = exc
        except (ConcurrencyConflict, DuplicateEventMismatch) as exc:
            lost = exc
        if attempt == COMMIT_ATTEMPTS:
            raise lost
        if attempt > 1:
            await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
        if trigger is not None:
            trigger_in_log = await queries.has_event(d.event_id)
    raise AssertionError("unreachable")
