"""Event filters: each predicate matches and misses, bad filters fail at load time, the
worker acknowledges a filtered-out event without an activation, the relay routes only the
events that pass (each with a broken variant the test catches)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from projections.builtin.runs import RunsProjection
from projections.fork import _subscribers
from runtime import Agent, Context, Event, NewEvent, On, RecordedEvent, Relay, Where, Worker
from runtime.agents.context import activation_id_for
from runtime.agents.filters import accepts
from runtime.agents.loading import validate
from runtime.errors import AppLoadError
from runtime.events.builtin import ActivationCompleted
from runtime.events.model import Cursor
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.streams.keys import agent_stream, ingress_stream
from tests.projections.test_builtin_properties import fold
from tests.support import REPO
from tests.support.runtime import fast_options, inbox_rows, send, wait_for
from webhooks.events import Address, EmailReceived, RowChanged


def email(sender: str = "ada@example.com", subject: str = "Refund please", **kw: Any) -> Any:
    return EmailReceived(source=kw.pop("source", "postmark"), provider="postmark",
                         message_id=f"<{uuid.uuid4()}@x>", sender=Address(sender),
                         subject=subject, **kw)  # fmt: skip


def row(table: str = "orders", op: str = "u", **after: Any) -> RowChanged:
    return RowChanged(source="debezium", provider="debezium", table=table, op=op,
                      after=after or None)  # fmt: skip


def matches(where: Where, body: Event) -> bool:
    return accepts({"t": (where,)}, "t", body)


# -- each predicate --------------------------------------------------------------------


def test_source_table_and_op() -> None:
    assert matches(Where(source="postmark"), email())
    assert not matches(Where(source="mailgun"), email())
    assert matches(Where(table="orders", op="u"), row())
    assert not matches(Where(table="orders", op="d"), row())
    assert not matches(Where(table="customers"), row())


def test_sender_domain_ignores_case_and_needs_the_exact_domain() -> None:
    assert matches(Where(sender_domain="example.com"), email("Ada@EXAMPLE.com"))
    assert not matches(Where(sender_domain="example.com"), email("ada@mail.example.com"))
    assert not matches(Where(sender_domain="example.com"), email("ada@example.org"))


def test_subject_is_a_pattern_searched_in_the_subject() -> None:
    assert matches(Where(subject=r"(?i)refund"), email(subject="Re: REFUND for #1042"))
    assert not matches(Where(subject=r"refund"), email(subject="Re: REFUND for #1042"))
    assert not matches(Where(subject=r"^Refund$"), email(subject="Refund please"))


def test_a_json_pointer_equals_a_value() -> None:
    paid = Where(pointer="/after/status", equals="paid")
    assert matches(paid, row(status="paid"))
    assert not matches(paid, row(status="pending"))
    assert not matches(paid, row())  # after is null: no such field, no match
    assert matches(Where(pointer="/after/total", equals=12.5), row(total=12.5))
    assert matches(Where(pointer="/after/n", equals=1), row(n=1))
    # JSON equality: true is not 1.
    assert not matches(Where(pointer="/after/n", equals=True), row(n=1))
    assert matches(Where(pointer="/after/flag", equals=None), row(flag=None))
    # Into lists, and RFC 6901 escapes (~1 is "/").
    assert matches(Where(pointer="/to/1/email", equals="b@x.org"),
                   email(to=[Address("a@x.org"), Address("b@x.org")]))  # fmt: skip
    assert not matches(Where(pointer="/to/5/email", equals="b@x.org"), email())
    assert matches(Where(pointer="/after/a~1b", equals=2), row(**{"a/b": 2}))


def test_conditions_of_one_where_all_hold_and_alternatives_any() -> None:
    both = Where(sender_domain="example.com", subject="(?i)refund")
    assert matches(both, email())
    assert not matches(both, email("ada@example.org"))
    assert not matches(both, email(subject="hello"))
    either = {"email.received": (Where(source="mailgun"), Where(subject="(?i)refund"))}
    assert accepts(either, "email.received", email())
    assert not accepts(either, "email.received", email(subject="hi"))
    assert accepts(either, "row.changed", row())  # no filter for the type: it passes


def test_filters_are_data() -> None:
    w = Where(sender_domain="example.com", pointer="/after/status", equals="paid")
    assert msgspec.json.decode(msgspec.json.encode(w), type=Where) == w
    assert msgspec.to_builtins(w) == {
        "sender_domain": "example.com", "pointer": "/after/status", "equals": "paid",
    }  # fmt: skip
    assert w.describe() == 'sender_domain=example.com /after/status=="paid"'
    assert Where(subject="(?i)refund").describe() == "subject~/(?i)refund/"


# -- the agent's declaration, checked when the app loads ---------------------------------


class Refunds(Agent):
    name = "refunds"
    subscribes = (
        On(EmailReceived, where=Where(sender_domain="example.com", subject="(?i)refund")),
    )

    async def handle(self, event: EmailReceived, ctx: Context) -> None:
        ctx.emit(row("refunds", "c", subject=event.subject))


def _agent(*subscribes: Any) -> Agent:
    cls = type("A", (Refunds,), {"name": "a", "subscribes": subscribes})
    return cls()  # type: ignore[no-any-return]


def test_an_agent_subscribes_by_type_and_by_filter() -> None:
    a = _agent(On(EmailReceived, where=(Where(source="x"), Where(source="y"))), RowChanged)
    assert a.subscribed_types() == {"email.received", "row.changed"}
    assert a.filters() == {"email.received": (Where(source="x"), Where(source="y"))}
    assert a.accepts("row.changed", row()) and not a.accepts("email.received", email())
    # The same type also subscribed whole: it takes every event of it.
    assert _agent(On(RowChanged, where=Where(table="x")), RowChanged).filters() == {}
    assert validate([a, Refunds()])


@pytest.mark.parametrize(
    ("subscription", "problem"),
    [
        (On(EmailReceived, where=Where(table="orders")), "email.received has no /table"),
        (On(RowChanged, where=Where(sender_domain="x.com")), "row.changed has no /sender/email"),
        (On(RowChanged, where=Where(subject="x")), "row.changed has no /subject"),
        (On(EmailReceived, where=Where(pointer="/sender/phone", equals=1)),
         "email.received has no /sender/phone"),
        (On(EmailReceived, where=Where(pointer="/to/first", equals=1)), "not an index"),
        (On(EmailReceived, where=Where(pointer="/subject/x", equals=1)), "not an object"),
        (On(EmailReceived, where=Where(pointer="/subject")), "needs `equals=`"),
        (On(EmailReceived, where=Where(equals=3)), "`equals` needs a `pointer`"),
        (On(EmailReceived, where=Where(pointer="after", equals=3)), "must be empty or start"),
        (On(EmailReceived, where=Where(subject="(unclosed")), "is not a regular expression"),
        (On(EmailReceived, where=Where()), "states no condition"),
        (On(RowChanged, where=Where(pointer="/op", equals="u", subject="x")), "no /subject"),
    ],
)  # fmt: skip
def test_a_filter_on_a_field_the_type_lacks_fails_at_load_time(
    subscription: On, problem: str
) -> None:
    with pytest.raises(AppLoadError) as failed:
        validate([_agent(subscription)])
    assert problem in str(failed.value)
    assert "agent 'a'" in str(failed.value) and "filter Where(" in str(failed.value)


def test_pointers_into_free_form_fields_and_tags_load() -> None:
    ok = _agent(
        On(RowChanged, where=Where(pointer="/after/status", equals="paid")),
        On(EmailReceived, where=(Where(pointer="/to/0/email", equals="a@b.c"),
                                 Where(pointer="/headers/0/1", equals="x"),
                                 Where(pointer="/type", equals="email.received"))),
    )  # fmt: skip
    assert validate([ok])


def test_a_where_that_is_not_a_where_is_refused() -> None:
    with pytest.raises(AppLoadError, match="takes Where filters"):
        validate([_agent(On(EmailReceived, where=[{"source": "x"}]))])  # type: ignore[list-item]


# -- the worker: a filtered-out event is acknowledged without an activation ---------------


class Unfiltering(Worker):
    """Broken: ignores the agents' filters (activates on every event of the type)."""

    def _passes(self, g: Any, d: Any) -> bool:
        return True


async def _worker_run(
    redis: aioredis.Redis, log: EventLog, worker_cls: type[Worker] = Worker
) -> list[Any]:
    await send(redis, email("ada@example.org", "Refund please"))  # another domain
    await send(redis, email("ada@example.com", "Hello"))  # another subject
    await send(redis, email("Ada@Example.COM", "re: REFUND #12"))  # passes
    worker = worker_cls([Refunds()], redis=redis, log=log,
                        options=fast_options(partitions=1))  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_for(lambda: _all_acked(redis, ingress_stream(0), "refunds"),
                       what="every entry read and acknowledged")  # fmt: skip
    finally:
        stop.set()
        await task
    return await inbox_rows(log)


async def _all_acked(redis: aioredis.Redis, stream: str, group: str) -> bool:
    groups = [g for g in await redis.xinfo_groups(stream) if g["name"] == group.encode()]
    if not groups:
        return False
    entries = await redis.xrange(stream, "-", "+")
    return entries[-1][0] == groups[0]["last-delivered-id"] and int(groups[0]["pending"]) == 0


async def test_the_worker_skips_events_its_filters_refuse(
    redis: aioredis.Redis, log: EventLog
) -> None:
    rows = await _worker_run(redis, log)
    assert [(agent, outcome) for agent, _, outcome in rows] == [("refunds", "completed")]
    [trigger] = [e for e in await log.read_all() if e.event_type == "email.received"]
    assert isinstance(trigger.body, EmailReceived) and trigger.body.subject == "re: REFUND #12"
    assert [e.event_type for e in await log.read_all()].count("activation.completed") == 1


async def test_a_worker_ignoring_filters_is_caught(redis: aioredis.Redis, log: EventLog) -> None:
    """The check above can fail: a worker that ignores filters activates on all three."""
    rows = await _worker_run(redis, log, Unfiltering)
    assert len(rows) == 3


# -- the relay routes only the events that pass -------------------------------------------


class Watcher(Agent):
    name = "watcher"
    subscribes = (On(RowChanged, where=Where(table="orders", pointer="/after/status",
                                             equals="paid")),)  # fmt: skip
    reads_ingress = False

    async def handle(self, event: RowChanged, ctx: Context) -> None:
        return None


class Everything(Agent):
    name = "everything"
    subscribes = (RowChanged,)
    reads_ingress = False

    async def handle(self, event: RowChanged, ctx: Context) -> None:
        return None


class Unfiltered(Relay):
    """Broken: routes by type alone."""

    def route(self, event: RecordedEvent) -> list[str]:
        return list(self.routes.get(event.event_type, []))


async def _emitted(log: EventLog) -> list[RecordedEvent]:
    """A run whose agent emitted three row changes (one paid order among them)."""
    run_id = uuid.uuid4()
    bodies = [row(status="pending"), row(status="paid"), row("customers", status="paid")]
    at = datetime.now(UTC)
    await log.append(f"run-{run_id}", [
        NewEvent(body=b, run_id=run_id, causation_id=run_id, producer="shop", recorded_at=at)
        for b in bodies
    ])  # fmt: skip
    return await log.read_all()


async def _relayed(log: EventLog, redis: aioredis.Redis, relay_cls: type[Relay]) -> list[int]:
    events = await _emitted(log)
    relay = relay_cls(log, redis, [Watcher(), Everything()], poll_interval=0.05, backfill=True)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    end = Cursor.of(events[-1])

    async def caught_up() -> bool:
        return await relay.checkpoint() == end

    try:
        await wait_for(caught_up, what="the relay past the last event")
    finally:
        stop.set()
        await task
    return [await redis.xlen(agent_stream(a)) for a in ("watcher", "everything")]


async def test_the_relay_routes_only_events_that_pass(redis: aioredis.Redis, log: EventLog) -> None:
    assert await _relayed(log, redis, Relay) == [1, 3]
    [(_, fields)] = await redis.xrange(agent_stream("watcher"))
    body = msgspec.json.decode(fields[b"body"], type=RowChanged)
    assert (body.table, body.after) == ("orders", {"status": "paid"})


async def test_a_relay_ignoring_filters_is_caught(redis: aioredis.Redis, log: EventLog) -> None:
    assert await _relayed(log, redis, Unfiltered) == [3, 3]


async def test_the_runs_read_model_waits_only_for_agents_an_event_passes(
    log: EventLog, settings: Settings
) -> None:
    """The run is complete once the watcher handled the one paid order: the other row
    changes never reach it, so the run does not wait for them."""
    events = await _emitted(log)
    paid = events[1]
    run = paid.run_id
    done = []
    for agent, trigger in [("everything", e) for e in events] + [("watcher", paid)]:
        done.append(NewEvent(body=_completed(agent, trigger), run_id=run, producer=agent,
                             causation_id=trigger.event_id))  # fmt: skip
    await log.append(f"run-{run}", done)
    events = await log.read_all()
    for p, status in ((RunsProjection([Watcher(), Everything()]), "completed"),
                      (_TypeOnlyRuns([Watcher(), Everything()]), "running")):  # fmt: skip
        rows = (await fold(log.pool, p, settings.read_schema, events, [len(events)]))["runs"]
        assert [r[4] for r in rows] == [status], type(p).__name__


class _TypeOnlyRuns(RunsProjection):
    """Broken: expects every subscriber of the type, filters ignored."""

    def _targets(self, e: RecordedEvent) -> list[str]:
        return list(self._routes.get(e.event_type, []))


def _completed(agent: str, trigger: RecordedEvent) -> Event:
    aid = activation_id_for(agent, trigger.event_id)
    return ActivationCompleted(agent=agent, activation_id=aid, trigger_id=trigger.event_id,
                               trigger_type=trigger.event_type, steps=0)  # fmt: skip


# -- agentrt agents: the app's subscriptions with their filters ------------------------------


class Misfiltered(Refunds):
    name = "misfiltered"
    subscribes = (On(EmailReceived, where=Where(table="orders")),)


def _agentrt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "runtime", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_agentrt_agents_lists_filters_and_refuses_a_bad_one() -> None:
    listed = _agentrt("agents", "--app", f"{__name__}:Refunds", "--json")
    assert listed.returncode == 0, listed.stderr
    [doc] = json.loads(listed.stdout)
    assert doc["subscribes"] == ["email.received"]
    assert doc["filters"] == {"email.received": ["sender_domain=example.com subject~/(?i)refund/"]}
    table = _agentrt("agents", "--app", f"{__name__}:Refunds")
    assert "where sender_domain=example.com subject~/(?i)refund/" in table.stdout
    bad = _agentrt("agents", "--app", f"{__name__}:Misfiltered")
    assert bad.returncode == 1
    assert "email.received has no /table" in " ".join(bad.stderr.split())


def test_a_fork_routes_by_the_same_filters() -> None:
    agents: dict[str, Agent] = {"watcher": Watcher(), "everything": Everything()}
    paid, pending = row(status="paid"), row(status="pending")
    assert [a.name for a in _subscribers(agents, paid, ingress=False)] == ["watcher", "everything"]
    assert [a.name for a in _subscribers(agents, pending, ingress=False)] == ["everything"]
    assert _subscribers(agents, paid, ingress=True) == []  # neither reads the ingress
