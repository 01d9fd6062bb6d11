"""Supervisor-worker: plan (offline model), assign, gather, time out, synthesise."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from projections.replay import replay_run
from runtime import Agent, Context, Relay, SupervisionFinished, TaskAssigned, Worker
from runtime.effects.retry import RetryPolicy
from runtime.events.model import RecordedEvent
from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.llm.offline import OfflineServer
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.worker.relay import TIMERS_KEY
from tests.support import REPO
from tests.support.apps.supervised import Broken as BrokenSpecialist
from tests.support.apps.supervised import Lead, Researcher, Slow, Unplannable, Writer, request
from tests.support.runtime import (
    count_type,
    fast_options,
    inbox_rows,
    send,
    wait_for,
    worker_env,
)
from tests.support.servers import Servers


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[LLM]:
    async with model_client(settings) as mc:
        assert mc.offline
        yield LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))


@contextlib.asynccontextmanager
async def running(
    agents: Sequence[Agent], redis: aioredis.Redis, log: EventLog, llm: LLM,
    relay: type[Relay] = Relay,
) -> AsyncIterator[Worker]:  # fmt: skip
    """A worker and a relay (of class ``relay``) in this loop until the block ends."""
    worker = Worker(agents, redis=redis, log=log, llm=llm, options=fast_options(drain_timeout=2))
    stop = asyncio.Event()
    r = relay(log, redis, agents, poll_interval=0.05, timer_interval=0.05)
    tasks = [asyncio.create_task(worker.run(stop)), asyncio.create_task(r.run(stop))]
    try:
        await worker.setup()
        yield worker
    finally:
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result


async def _events(log: EventLog) -> list[RecordedEvent]:
    out: list[RecordedEvent] = []
    while page := await log.read_all(*([out[-1].log_position] if out else [])):
        out += page
    return out


async def _finished(log: EventLog) -> list[SupervisionFinished]:
    return [e.body for e in await _events(log) if isinstance(e.body, SupervisionFinished)]


async def _has(log: EventLog, event_type: str, n: int = 1) -> bool:
    return await count_type(log, event_type) >= n


def _statuses(finished: SupervisionFinished) -> list[tuple[str, str]]:
    return [(t.worker, t.status) for t in finished.outcomes]


async def test_plan_assign_gather_synthesise(
    redis: aioredis.Redis, log: EventLog, llm: LLM, settings: Settings
) -> None:
    run_id = await send(redis, request("researcher", "writer", "researcher", timeout=120))
    agents = [Lead(), Researcher(), Writer()]
    async with running(agents, redis, log, llm):
        await wait_for(lambda: _has(log, "supervision.finished"), seconds=60, what="synthesis")
    [finished] = await _finished(log)
    assert _statuses(finished) == [
        ("researcher", "completed"),
        ("writer", "completed"),
        ("researcher", "completed"),
    ]
    assert (finished.completed, finished.failed, finished.timed_out) == (3, 0, 0)
    assert [t.description for t in finished.outcomes] == [
        "task for researcher",
        "task for writer",
        "task for researcher",
    ]
    # Each specialist answered with its own model call (offline text) on its task.
    assert all(str(t.result).startswith("[offline]") for t in finished.outcomes)
    assert finished.result["from"] == ["researcher", "writer", "researcher"]
    assert finished.result["summary"].startswith("[offline]")
    events = await _events(log)
    assert all(e.run_id == run_id for e in events if e.event_type.startswith(("task.", "sup")))
    # Each task went to its named worker only (the relay routes task.assigned by address).
    assigned = {e.event_id: e.body.worker for e in events if isinstance(e.body, TaskAssigned)}
    handled = [(who, eid) for who, eid, _ in await inbox_rows(log) if eid in assigned]
    assert sorted(handled) == sorted((w, eid) for eid, w in assigned.items())
    assert await count_type(log, "timer.scheduled") == 3
    # The run replays identically: the deadlines came from a recorded clock step.
    report = await replay_run(log, agents, run_id, settings=settings)
    assert report.identical, report.divergent
    assert len(report.activations) >= 7  # plan, 3 tasks, 3 results


async def test_broken_variant_deadlines_from_the_wall_clock_do_not_replay(
    redis: aioredis.Redis, log: EventLog, llm: LLM, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """What the replay check above guards: a clock that is not a recorded step."""

    async def wall_clock(self: Context) -> datetime:
        return datetime.now(UTC)

    monkeypatch.setattr(Context, "now", wall_clock)
    run_id = await send(redis, request("researcher", "writer", "researcher", timeout=120))
    agents = [Lead(), Researcher(), Writer()]
    async with running(agents, redis, log, llm):
        await wait_for(lambda: _has(log, "supervision.finished"), seconds=60, what="synthesis")
    report = await replay_run(log, agents, run_id, settings=settings)
    [planning] = report.divergent
    assert planning.divergence is not None and planning.divergence.kind == "emit"
    assert "due_at" in planning.divergence.diff


async def test_a_failing_subtask_is_reported_not_hidden(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    await send(redis, request("researcher", "broken", "writer", timeout=120))
    agents = [Lead(), Researcher(), Writer(), BrokenSpecialist()]
    async with running(agents, redis, log, llm):
        await wait_for(lambda: _has(log, "supervision.finished"), seconds=60, what="synthesis")
    [finished] = await _finished(log)
    assert _statuses(finished) == [
        ("researcher", "completed"),
        ("broken", "failed"),
        ("writer", "completed"),
    ]
    assert (finished.completed, finished.failed, finished.timed_out) == (2, 1, 0)
    failed = finished.outcomes[1]
    assert failed.error == "nothing found for 'task for broken'" and failed.result is None
    assert finished.result["from"] == ["researcher", "writer"]
    assert "failed" in finished.result["summary"]  # the synthesis was told, too


async def test_a_worker_the_plan_invents_fails_that_subtask(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    await send(redis, request("researcher", "nobody", "writer", timeout=120))
    async with running([Lead(), Researcher(), Writer()], redis, log, llm):
        await wait_for(lambda: _has(log, "supervision.finished"), seconds=60, what="synthesis")
    [finished] = await _finished(log)
    assert _statuses(finished)[1] == ("nobody", "failed")
    assert finished.outcomes[1].error == (
        "no worker named 'nobody' (workers: broken, researcher, slow, writer)"
    )
    assert (finished.completed, finished.failed) == (2, 1)


async def test_a_plan_of_only_invented_workers_is_finished_once(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    """Every subtask fails at once (in the planning activation): each failure comes back to
    the supervisor, and only the last one's activation may synthesise."""
    await send(redis, request("nobody", "noone", "nothing", timeout=120))
    async with running([Lead(), Researcher(), Writer()], redis, log, llm):
        await wait_for(lambda: _has(log, "supervision.finished"), seconds=60, what="synthesis")
        # The plan's activation and one per failure: every delivery handled.
        await wait_for(lambda: _has(log, "activation.completed", 4), seconds=60,
                       what="every failure handled")  # fmt: skip
    [finished] = await _finished(log)
    assert (finished.completed, finished.failed) == (0, 3)


async def test_a_plan_that_cannot_be_made_ends_the_request_saying_why(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    await send(redis, request("researcher", "writer", "researcher", timeout=120))
    async with running([Unplannable(), Researcher(), Writer()], redis, log, llm):
        await wait_for(lambda: _has(log, "supervision.finished"), seconds=60, what="the end")
    [finished] = await _finished(log)
    assert finished.outcomes == [] and finished.supervisor == "unplannable"
    assert finished.error is not None and "every subtask needs a budget line" in finished.error
    assert await count_type(log, "task.assigned") == 0
    assert await count_type(log, "step.recorded") == 3  # the first answer and 2 reflections


async def test_a_subtask_past_its_timeout_is_given_up_and_its_late_result_ignored(
    redis: aioredis.Redis, log: EventLog, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLOW_SECONDS", "9")
    await send(redis, request("researcher", "slow", "writer", timeout=5))
    agents = [Lead(), Researcher(), Writer(), Slow()]
    async with running(agents, redis, log, llm):
        await wait_for(lambda: _has(log, "supervision.finished"), seconds=60, what="synthesis")
        # The slow worker's answer still comes, after the synthesis: it changes nothing.
        await wait_for(lambda: _has(log, "task.completed", 3), seconds=60, what="the late result")
        await wait_for(lambda: _handled_all(log), seconds=30, what="the late result handled")
    [finished] = await _finished(log)
    assert _statuses(finished) == [
        ("researcher", "completed"),
        ("slow", "timed_out"),
        ("writer", "completed"),
    ]
    assert (finished.completed, finished.failed, finished.timed_out) == (2, 0, 1)
    assert finished.outcomes[1].error == "no result within 5 s"
    assert await count_type(log, "timer.fired") == 3  # the others' fire later, ignored


async def _handled_all(log: EventLog) -> bool:
    """Every task.completed has been handled by the supervisor."""
    completed = {e.event_id for e in await _events(log) if e.event_type == "task.completed"}
    handled = {eid for who, eid, _ in await inbox_rows(log) if who == "lead"}
    return completed <= handled


class ForgetfulRelay(Relay):
    """Broken on purpose: its timer store does not survive a restart (as if it lived in
    the process's memory, or in a Redis without persistence)."""

    async def run(self, stop: asyncio.Event) -> None:
        await self.redis.delete(TIMERS_KEY)
        await super().run(stop)


async def _timeout_across_restart(
    redis: aioredis.Redis, log: EventLog, llm: LLM, relay: type[Relay]
) -> list[SupervisionFinished]:
    """Plan and assign, stop everything once the timers are set and the fast subtasks are
    done, start anew; the synthesis made within 20 s of the restart, if any."""
    await send(redis, request("researcher", "slow", "writer", timeout=10))
    # The slow worker runs nowhere (its pool is down): only the timeout settles it.
    agents = [Lead(), Researcher(), Writer()]
    async with running(agents, redis, log, llm, relay=relay):
        await wait_for(lambda: _zcard(redis, 3), seconds=30, what="3 timers scheduled")
        await wait_for(lambda: _has(log, "task.completed", 2), seconds=30, what="2 results")
    assert await count_type(log, "timer.fired") == 0
    assert await _finished(log) == []
    async with running(agents, redis, log, llm, relay=relay):
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: _has(log, "supervision.finished"), seconds=20,
                           what="synthesis")  # fmt: skip
    return await _finished(log)


async def _zcard(redis: aioredis.Redis, n: int) -> bool:
    return int(await redis.zcard(TIMERS_KEY)) >= n


async def test_a_timeout_fires_across_a_restart_of_worker_and_relay(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    [finished] = await _timeout_across_restart(redis, log, llm, Relay)
    assert _statuses(finished) == [
        ("researcher", "completed"),
        ("slow", "timed_out"),
        ("writer", "completed"),
    ]
    assert finished.timed_out == 1


async def test_broken_variant_timers_lost_in_a_restart_never_time_out(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    """The test above catches a timer store that does not survive the restart."""
    assert await _timeout_across_restart(redis, log, llm, ForgetfulRelay) == []


def test_a_supervisor_subscribes_to_its_results_and_timers() -> None:
    assert Lead().subscribed_types() == {
        "tests.research_requested",
        "task.completed",
        "task.failed",
        "timer.fired",
    }
    assert Researcher().subscribed_types() == {"task.assigned"}


async def test_a_timeout_fires_after_kill_9_of_the_worker_process_that_set_it(
    redis: aioredis.Redis, log: EventLog, settings: Settings, servers: Servers, tmp_path: Path
) -> None:
    """The same across real processes: the worker (and its relay) killed with SIGKILL once
    the timers are set; a new process fires them and the synthesis reports the timeout."""
    command = [sys.executable, "-m", "runtime", "worker", "--app",
               "tests.support.apps.supervised:team", "--partitions", "2",
               "--claim-idle", "0.5"]  # fmt: skip
    err = tmp_path / "worker.txt"
    await send(redis, request("researcher", "slow", "writer", timeout=15))
    with OfflineServer() as server, err.open("ab") as errors:
        env = worker_env(settings, servers, server.base_url, tmp_path / "calls.txt", 0.0)
        first = subprocess.Popen(command, env=env, cwd=REPO, stdout=errors, stderr=errors)
        try:
            await wait_for(lambda: _zcard(redis, 3), seconds=60, what="3 timers scheduled")
            await wait_for(lambda: _has(log, "task.completed", 2), seconds=60, what="2 results")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert await count_type(log, "timer.fired") == 0, err.read_text()[-2000:]
        second = subprocess.Popen(command, env=env, cwd=REPO, stdout=errors, stderr=errors)
        try:
            await wait_for(lambda: _has(log, "supervision.finished"), seconds=90,
                           what="the synthesis")  # fmt: skip
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=30)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()
    [finished] = await _finished(log)
    assert _statuses(finished) == [
        ("researcher", "completed"),
        ("slow", "timed_out"),
        ("writer", "completed"),
    ]
