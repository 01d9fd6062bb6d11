"""SIGTERM stops every worker, busy or not, within its drain timeout (a deploy never hangs).

Several ``agentrt worker`` processes work through a stream of events (a model
step and a tool step each) with CPU-bound processes beside them; all of them
get SIGTERM at once, and each must exit by itself (exit code 0, not the hard
exit that fires later) within the drain timeout plus the last read and the
closing of connections. Then a worker finishes what they left: nothing lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from runtime.llm.offline import OfflineServer
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.worker import worker as worker_module
from runtime.worker.worker import Worker
from tests.support import REPO
from tests.support.apps.orders import OrderPlaced
from tests.support.runtime import inbox_rows, send, worker_env
from tests.support.servers import Servers

#: Processes start slowly on a machine kept busy on purpose.
pytestmark = pytest.mark.timeout(400)

WORKERS = 4
ROUNDS = 2
EVENTS = 300
DRAIN = 3.0
#: What a stop may take beyond the drain: the last XREADGROUP (1 s blocks), the
#: relay's stop and the pools' close, on a machine kept busy on purpose.
SLACK = 10.0


def _command(drain: float) -> list[str]:
    return [sys.executable, "-m", "runtime", "worker", "--app", "tests.support.apps.crash",
            "--partitions", "2", "--claim-idle", "2", "--concurrency", "8",
            "--drain-timeout", str(drain), "--max-deliveries", "50", "--no-relay"]  # fmt: skip


def _burn() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


async def test_sigterm_stops_every_busy_worker_within_the_drain_timeout(
    settings: Settings, log: EventLog, redis: aioredis.Redis, servers: Servers, tmp_path: Path
) -> None:
    for i in range(EVENTS):
        await send(redis, OrderPlaced(order_id=f"s{i}", sku=f"SKU-{i}"), partition=i % 2)
    slow: list[str] = []
    logs: list[Path] = []

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        path = tmp_path / f"worker-{len(logs)}.txt"
        logs.append(path)
        with path.open("ab") as f:
            return subprocess.Popen(_command(DRAIN), env=env, cwd=REPO, stdout=f, stderr=f)

    def tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in logs)

    with OfflineServer() as server:
        env = worker_env(settings, servers, server.base_url, tmp_path / "calls.txt", 0.05)
        for _ in range(ROUNDS):
            burners = [_burn(), _burn()]
            procs = [start(env) for _ in range(WORKERS)]
            mine = logs[-WORKERS:]
            try:
                before = len(await inbox_rows(log))
                # Every worker is up (its signal handlers installed) and the group is busy.
                deadline = time.monotonic() + 90
                while not (
                    all("SIGTERM drains and stops" in p.read_text() for p in mine)
                    and len(await inbox_rows(log)) >= before + 2 * WORKERS
                ):
                    assert time.monotonic() < deadline, tails()
                    assert all(p.poll() is None for p in procs), tails()
                    await asyncio.sleep(0.05)
                sent = time.monotonic()
                print(f"round up after {sent - deadline + 90:.1f} s; SIGTERM to {WORKERS}")
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    left = max(sent + DRAIN + SLACK - time.monotonic(), 0.1)
                    try:
                        code = await asyncio.to_thread(p.wait, left)
                    except subprocess.TimeoutExpired:
                        slow.append(f"pid {p.pid} still running {DRAIN + SLACK:g} s after SIGTERM")
                        continue
                    if code != 0:
                        slow.append(f"pid {p.pid} exited {code}")
                print(f"stopped in {time.monotonic() - sent:.1f} s")
            finally:
                for p in [*procs, *burners]:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
        assert not slow, "\n".join(slow) + "\n" + tails()
        # What the stopped workers left pending is finished by another: nothing lost.
        last = start(env)
        try:
            deadline = time.monotonic() + 120
            while len(await inbox_rows(log)) < EVENTS:
                assert last.poll() is None, tails()
                assert time.monotonic() < deadline, f"{len(await inbox_rows(log))} of {EVENTS}"
                await asyncio.sleep(0.1)
        finally:
            last.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(last.wait, DRAIN + SLACK) == 0
    assert len(await inbox_rows(log)) == EVENTS


# -- a lost cancellation ---------------------------------------------------------------


class LosesACancellation(Worker):
    """Its acknowledgement task swallows its cancellation, as Python 3.11's
    ``asyncio.wait_for`` (inside redis-py) can when it arrives as the inner call
    completes, and then ignores the stop flag too."""

    async def _ack_loop(self) -> None:
        try:
            while True:
                await self._ack_wake.wait()
                await self._flush_acks()
        except asyncio.CancelledError:
            await asyncio.sleep(3600)  # the lost cancellation: still running


async def _stop_with_a_lost_cancellation(redis: aioredis.Redis, log: EventLog) -> float:
    from tests.support.apps.orders import Fulfilment
    from tests.support.runtime import fast_options

    worker = LosesACancellation([Fulfilment()], redis=redis, log=log, options=fast_options())
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), 20)
        return time.monotonic() - started
    finally:
        for t in asyncio.all_tasks():
            if t.get_name() == "acks":
                t.cancel()  # the second cancellation ends it, for the test's own cleanup
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def test_a_stop_ends_even_when_a_task_loses_its_cancellation(
    redis: aioredis.Redis, log: EventLog
) -> None:
    seconds = await _stop_with_a_lost_cancellation(redis, log)
    assert seconds < 15  # the task is abandoned after _STOP_WAIT, not waited for


async def test_an_unbounded_wait_hangs_on_a_lost_cancellation(
    redis: aioredis.Redis, log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broken variant (waiting for cancelled tasks without a bound): the stop hangs."""

    async def unbounded(tasks: Any, what: str) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)

    monkeypatch.setattr(worker_module, "_bounded", unbounded)
    with pytest.raises(TimeoutError):
        await _stop_with_a_lost_cancellation(redis, log)
