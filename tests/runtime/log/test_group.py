"""Group commit of single-event appends (runtime.log.group) and of steps through it."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtime.effects.steps import StepOutput, Steps
from runtime.events.builtin import StepRecorded
from runtime.events.ids import activation_stream
from runtime.events.model import LogPosition, NewEvent
from runtime.log import audit, chain
from runtime.log.group import GroupWriter, MarkedAppends, Written, _Pending
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.events import Noted
from tests.support.proxy import Proxy


async def test_concurrent_appends_share_flushes_and_chain(log: EventLog, admin: Any,
                                                          settings: Settings) -> None:  # fmt: skip
    writer = GroupWriter(log)
    events = [NewEvent(body=Noted(text=f"e{i}")) for i in range(60)]
    results = await asyncio.gather(*(
        writer.append(f"g-{i}", ev, 1, chain.GENESIS) for i, ev in enumerate(events)
    ))  # fmt: skip
    assert all(r.ours and r.winner is None for r in results)
    # The first flush takes the first append; the rest wait behind it and share.
    assert writer.flushes <= 3 < len(events)
    second = await asyncio.gather(*(
        writer.append(f"g-{i}", NewEvent(body=Noted(text="next")), 2, r.hash)
        for i, r in enumerate(results)
    ))  # fmt: skip
    for i, (ev, r, r2) in enumerate(zip(events, results, second, strict=True)):
        stored = await log.read_stream(f"g-{i}")
        assert stored[0].event_id == ev.event_id
        assert stored[0].log_position == r.position and stored[0].hash == r.hash
        assert stored[1].hash == r2.hash and stored[1].prev_hash == r.hash
    report = await audit.verify(admin, settings.db_schema)
    assert report.ok, report


async def test_a_conflict_is_answered_to_its_caller_alone(log: EventLog) -> None:
    theirs = NewEvent(body=Noted(text="theirs"))
    await log.append("taken", [theirs], 0)
    writer = GroupWriter(log)
    mine = NewEvent(body=Noted(text="mine"))
    neighbours = [NewEvent(body=Noted(text=f"n{i}")) for i in range(8)]
    got = await asyncio.gather(
        writer.append("taken", mine, 1, chain.GENESIS),
        *(writer.append(f"free-{i}", ev, 1, chain.GENESIS) for i, ev in enumerate(neighbours)),
    )
    lost, *won = got
    assert not lost.ours and lost.winner is not None
    assert lost.winner.event_id == theirs.event_id and lost.winner.body == Noted(text="theirs")
    assert all(w.ours for w in won)
    assert [e.event_id for e in await log.read_stream("taken")] == [theirs.event_id]
    for i, ev in enumerate(neighbours):
        assert [e.event_id for e in await log.read_stream(f"free-{i}")] == [ev.event_id]


async def test_an_event_id_taken_elsewhere_fails_that_append_only(log: EventLog) -> None:
    ev = NewEvent(body=Noted(text="once"))
    await log.append("first-home", [ev], 0)
    writer = GroupWriter(log)
    other = NewEvent(body=Noted(text="other"))
    bad, good = await asyncio.gather(
        writer.append("second-home", ev, 1, chain.GENESIS),
        writer.append("fine", other, 1, chain.GENESIS),
        return_exceptions=True,
    )
    assert isinstance(bad, Exception) and "elsewhere" in str(bad)
    assert isinstance(good, Written) and good.ours


# -- the network lost mid-flush ------------------------------------------------------


@pytest.fixture
async def proxied(settings: Settings) -> AsyncIterator[tuple[EventLog, Proxy]]:
    """The log through a proxy that can lose the connection on cue."""
    proxy = await Proxy.for_url(settings.require_database_url()).start()
    via = dataclasses.replace(settings, database_url=proxy.url(settings.require_database_url()))
    pool = await open_runtime_pool(via, max_size=4)
    try:
        yield EventLog(pool, schema=settings.db_schema), proxy
    finally:
        await proxy.close()
        await pool.close()


class Flaky(GroupWriter):
    """Loses the network during the flushes the plan names: ``lost`` resets every
    connection before the statement goes out, ``cut`` as it goes out (it may or
    may not reach the server), ``mute`` lets it reach the server and commit, then
    loses the reply."""

    def __init__(self, log: EventLog, proxy: Proxy, plan: dict[int, str], **kw: Any) -> None:
        super().__init__(log, **kw)
        self.proxy, self.plan, self.tries = proxy, plan, 0

    async def _write(self, batch: list[_Pending]) -> None:
        mode = self.plan.get(self.tries)
        self.tries += 1
        if mode == "lost":
            self.proxy.cut()  # before the statement goes out: it never reaches the server
        elif mode == "cut":
            asyncio.get_running_loop().call_soon(self.proxy.cut)
        elif mode == "mute":
            self.proxy.mute(0.15)
        await super()._write(batch)


class AcksOnFailure(Flaky):
    """BROKEN on purpose: a flush that lost its connection is reported written."""

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            await self._write(batch)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            for item in batch:
                item.done.set_result(Written(LogPosition(0, 0), item.hash, True))


class IgnoresConflicts(Flaky):
    """BROKEN on purpose: a row the log refused is reported as the caller's own."""

    async def _write(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        inner = [dataclasses.replace(item, done=loop.create_future()) for item in batch]
        await super()._write(inner)
        for item, copy in zip(batch, inner, strict=True):
            written = copy.done.result()
            item.done.set_result(Written(written.position, item.hash, True))


async def test_a_reply_lost_after_commit_is_found_on_retry(proxied: Any) -> None:
    log, proxy = proxied
    writer = Flaky(log, proxy, {0: "mute"})
    ev = NewEvent(body=Noted(text="durable"))
    written = await writer.append("muted", ev, 1, chain.GENESIS)
    assert written.ours and writer.tries == 2 and proxy.cuts == 1
    stored = await log.read_stream("muted")
    assert [e.event_id for e in stored] == [ev.event_id]
    assert stored[0].log_position == written.position


async def test_every_flush_lost_fails_its_callers_and_nothing_is_claimed(proxied: Any) -> None:
    log, proxy = proxied
    writer = Flaky(log, proxy, {0: "lost", 1: "lost"}, attempts=2)
    ev = NewEvent(body=Noted(text="maybe"))
    with pytest.raises((OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
        await writer.append("lost", ev, 1, chain.GENESIS)


# -- the property: steps of many activations through one writer -----------------------

Plan = tuple[list[int], set[tuple[int, int]], dict[int, str]]

plans = st.tuples(
    st.lists(st.integers(1, 4), min_size=1, max_size=8),  # steps per activation
    st.sets(st.tuples(st.integers(0, 7), st.integers(1, 4)), max_size=6),  # conflicts
    st.dictionaries(st.integers(0, 12), st.sampled_from(["lost", "cut", "mute"]), max_size=3),
)


async def run_plan(log: EventLog, proxy: Proxy, plan: Plan,
                   writer_type: type[Flaky] = Flaky) -> None:  # fmt: skip
    """Activations take their steps concurrently through one writer; another worker records
    some of their steps first (the conflicts); the network drops during some flushes.
    Every result an activation got must be the log's, at that step."""
    shape, conflicts, drops = plan
    writer = writer_type(log, proxy, drops, attempts=4)
    got: dict[tuple[int, int], Any] = {}
    ids = [uuid.uuid4() for _ in shape]

    async def activation(a: int, n_steps: int) -> None:
        aid = ids[a]
        steps = Steps(log, activation_id=aid, run_id=aid, agent="prop", trigger_id=aid,
                      lazy=True, writer=writer)  # fmt: skip
        for n in range(1, n_steps + 1):

            async def call(a: int = a, n: int = n) -> StepOutput:
                if (a, n) in conflicts:
                    # Another worker's copy of this activation records the step first.
                    rival = StepRecorded(activation_id=aid, agent="prop", step=n, kind="tool",
                                         name="t", request_hash=steps_hash(n), request={"n": n},
                                         result={"by": "rival", "n": n})  # fmt: skip
                    await log.append(activation_stream(aid), [NewEvent(body=rival)], n - 1)
                await asyncio.sleep(0)
                return StepOutput(result={"by": "me", "a": a, "n": n})

            try:
                record = await steps.run("tool", "t", {"n": n}, call)
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
                return  # the activation fails (it would be retried): nothing was acknowledged
            got[(a, n)] = record.result

    await asyncio.gather(*(activation(a, k) for a, k in enumerate(shape)))
    for (a, n), result in got.items():
        stored = await log.read_stream(activation_stream(ids[a]), n, limit=1)
        assert stored, f"activation {a} step {n} was acknowledged but is not in the log"
        body = stored[0].body
        assert isinstance(body, StepRecorded)
        assert body.result == result, f"activation {a} step {n}: got {result}, log {body.result}"
        if (a, n) in conflicts:
            assert result == {"by": "rival", "n": n}


def steps_hash(n: int) -> str:
    from runtime.effects.steps import request_hash

    return request_hash("tool", "t", {"n": n})


prop = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@prop
@given(plan=plans)
@example(plan=([3, 3, 3, 3], {(0, 2), (2, 1)}, {0: "mute", 2: "lost", 3: "cut"}))
@example(plan=([4, 1, 2], {(1, 1)}, {1: "mute"}))
async def test_every_step_result_returned_is_the_one_in_the_log(proxied: Any, plan: Plan) -> None:
    log, proxy = proxied
    await run_plan(log, proxy, plan)


async def test_the_property_catches_a_writer_that_acknowledges_a_lost_flush(
    proxied: Any,
) -> None:
    log, proxy = proxied
    # The first flush never reaches the server, and the writer reports it written:
    # the step is missing, or (the activation went on) its next step took its place.
    plan: Plan = ([2, 2, 2], set(), {0: "lost"})
    with pytest.raises(AssertionError, match=r"acknowledged but is not in the log|got"):
        await run_plan(log, proxy, plan, AcksOnFailure)


async def test_the_property_catches_a_writer_that_ignores_conflicts(proxied: Any) -> None:
    log, proxy = proxied
    plan: Plan = ([2, 2], {(0, 1), (1, 2)}, {})
    with pytest.raises(AssertionError, match="got"):
        await run_plan(log, proxy, plan, IgnoresConflicts)


# -- activation commits, several per transaction ----------------------------------------


def _marker(consumer: str = "agent") -> tuple[Any, ...]:
    run = uuid.uuid4()
    return (consumer, uuid.uuid4(), uuid.uuid4(), "completed", run)


async def test_commits_share_a_transaction_and_answer_each_alone(
    log: EventLog, admin: Any, settings: Settings
) -> None:
    await log.append("run-taken", [Noted(text="already")], 0)
    dup = _marker()
    await log.append_marked("run-dup-first", [Noted(text="first")], dup, 0)
    group = MarkedAppends(log)
    fine = [(f"run-ok-{i}", [NewEvent(body=Noted(text=f"ok{i}"))], _marker()) for i in range(12)]
    racing = [NewEvent(body=Noted(text="a")), NewEvent(body=Noted(text="b"))]
    got = await asyncio.gather(
        *(group.append(s, evs, m, 0) for s, evs, m in fine),
        group.append("run-taken", [NewEvent(body=Noted(text="late"))], _marker(), 0),
        group.append("run-dup-second", [NewEvent(body=Noted(text="again"))], dup, None),
        # Two commits to one new stream in the same batch: one wins.
        group.append("run-shared", [racing[0]], _marker(), 0),
        group.append("run-shared", [racing[1]], _marker(), 0),
    )
    assert got[:12] == ["committed"] * 12
    assert got[12:14] == ["conflict", "duplicate"]
    assert sorted(got[14:]) == ["committed", "conflict"]
    assert group.flushes <= 3
    for s, evs, m in fine:
        assert [e.event_id for e in await log.read_stream(s)] == [evs[0].event_id]
        assert await admin.fetchval(
            f'SELECT outcome FROM "{settings.db_schema}".inbox WHERE event_id = $1', m[1]
        ) == "completed"  # fmt: skip
    # Nothing of the refused ones was written.
    assert len(await log.read_stream("run-taken")) == 1
    assert await log.read_stream("run-dup-second") == []
    assert len(await log.read_stream("run-shared")) == 1
    report = await audit.verify(admin, settings.db_schema)
    assert report.ok, report
    # The next append to a committed stream links to the head the batch reported.
    await log.append(fine[0][0], [Noted(text="next")], 1)
    assert (await audit.verify(admin, settings.db_schema)).ok


async def test_reads_of_many_streams_share_a_query(log: EventLog) -> None:
    for i in range(1, 6):  # read-0 stays empty
        await log.append(f"read-{i}", [Noted(text=f"{i}.{k}") for k in range(i)], 0)
    reads = GroupWriter(log).reads
    got = await asyncio.gather(*(reads.read(f"read-{i}") for i in range(6)))
    assert reads.flushes <= 2
    for i, events in enumerate(got):
        assert [e.body.text for e in events] == [f"{i}.{k}" for k in range(i)]  # type: ignore[attr-defined]
        assert [e.stream_version for e in events] == list(range(1, i + 1))


class YieldsBeforeQueueing(GroupWriter):
    """BROKEN on purpose: yields before its row is queued, so a cancel there loses it."""

    async def _submit(self, item: Any) -> Any:
        await asyncio.sleep(0.05)
        return await super()._submit(item)


async def _cancel_while_recording(log: EventLog, writer: GroupWriter) -> list[Any]:
    aid = uuid.uuid4()
    steps = Steps(log, activation_id=aid, run_id=aid, agent="a", trigger_id=aid, writer=writer)

    called = asyncio.Event()

    async def call() -> StepOutput:
        called.set()
        return StepOutput(result={"paid": True})

    task = asyncio.create_task(steps.run("tool", "t", {}, call))
    await called.wait()  # the tool was called; its record is on its way
    task.cancel()  # the handler's timeout, a stop
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    await writer.drain()
    return [e.body.result for e in await log.read_stream(activation_stream(aid))]  # type: ignore[attr-defined]


async def test_a_step_cancelled_while_its_row_is_queued_is_still_recorded(log: EventLog) -> None:
    assert await _cancel_while_recording(log, GroupWriter(log)) == [{"paid": True}]


async def test_a_writer_that_yields_before_queueing_loses_the_paid_result(log: EventLog) -> None:
    assert await _cancel_while_recording(log, YieldsBeforeQueueing(log)) == []


async def test_a_lone_commit_takes_the_single_statement_with_the_same_answers(
    log: EventLog,
) -> None:
    group = MarkedAppends(log)
    first = _marker()
    assert await group.append("lone", [NewEvent(body=Noted(text="a"))], first, 0) == "committed"
    again = [NewEvent(body=Noted(text="b"))]
    assert await group.append("lone-2", again, first, None) == "duplicate"
    assert await group.append("lone", again, _marker(), 0) == "conflict"
    assert await log.read_stream("lone-2") == [] and len(await log.read_stream("lone")) == 1


async def _one_bad_among_good(group: MarkedAppends, log: EventLog) -> list[Any]:
    good = [(f"run-fine-{i}", [NewEvent(body=Noted(text=f"{i}"))], _marker()) for i in range(5)]
    first = asyncio.create_task(
        group.append("run-first", [NewEvent(body=Noted(text="first"))], _marker(), 0)
    )
    for _ in range(3):  # the first goes out alone; the rest wait and share the next statement
        await asyncio.sleep(0)
    return await asyncio.gather(
        first,
        *(group.append(s, evs, m, 0) for s, evs, m in good),
        group.append("x" * 250, [NewEvent(body=Noted(text="too long"))], _marker(), 0),
        return_exceptions=True,
    )


async def test_an_item_the_database_refuses_fails_alone(log: EventLog) -> None:
    group = MarkedAppends(log)
    got = await _one_bad_among_good(group, log)
    assert got[:6] == ["committed"] * 6
    assert isinstance(got[6], asyncpg.CheckViolationError)


class FailsTogether(MarkedAppends):
    """BROKEN on purpose: one item's error fails the whole batch."""

    async def _one_by_one(self, batch: list[Any]) -> None:
        self._fail(batch, RuntimeError("the batch failed"))


async def test_without_one_by_one_the_neighbours_fail_too(log: EventLog) -> None:
    got = await _one_bad_among_good(FailsTogether(log), log)
    assert got[0] == "committed"
    assert all(isinstance(g, RuntimeError) for g in got[1:])
