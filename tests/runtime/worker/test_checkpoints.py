"""Checkpointed long work: a multi-step handler killed (-9) between steps resumes from its last
recorded step, so each step's side effect happens once and the run completes.

Worker processes run ``tests.support.apps.longwork``: four tool steps, each
appending a line to a file. The first process is killed after step 1, the
second after step 3 (each waits there, its step recorded), the third finishes.
The same scenario with the work done outside ``ctx`` (no steps) repeats it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from runtime.events.builtin import ActivationCompleted, StepRecorded
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support import REPO
from tests.support.apps.orders import OrderPlaced, StockReserved
from tests.support.runtime import count_type, send, worker_env
from tests.support.servers import Servers


def _command(agent: str) -> list[str]:
    return [sys.executable, "-m", "runtime", "worker",
            "--app", f"tests.support.apps.longwork:{agent}", "--partitions", "2",
            "--claim-idle", "0.5", "--max-deliveries", "10", "--no-relay"]  # fmt: skip


async def _until(
    check: Callable[[], Awaitable[bool]], proc: subprocess.Popen[bytes], err: Path, what: str
) -> None:
    deadline = time.monotonic() + 60
    while not await check():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}:\n{err.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{err.read_text()[-3000:]}")
        await asyncio.sleep(0.05)


async def run_long_job(
    agent: str,
    settings: Settings,
    log: EventLog,
    redis: aioredis.Redis,
    servers: Servers,
    tmp_path: Path,
) -> list[str]:
    """Kill -9 after step 1, then after step 3, let a third worker finish; the side effects."""
    effects, held, err = tmp_path / "effects.txt", tmp_path / "held.txt", tmp_path / "err.txt"
    await send(redis, OrderPlaced(order_id="long1", sku="SKU-9"))
    base = worker_env(settings, servers, "http://127.0.0.1:9", tmp_path / "calls.txt", 0.0)
    base |= {"LONGWORK_EFFECTS": str(effects), "LONGWORK_HELD": str(held)}
    with err.open("ab") as errors:
        for hold in ("1", "3"):
            env = {**base, "LONGWORK_HOLD_AFTER": hold}
            proc = subprocess.Popen(_command(agent), env=env, cwd=REPO, stdout=errors,
                                    stderr=errors)  # fmt: skip
            try:

                async def holding(hold: str = hold) -> bool:
                    return held.exists() and hold in held.read_text().split()

                await _until(holding, proc, err, f"the handler waiting after step {hold}")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        proc = subprocess.Popen(_command(agent), env=base, cwd=REPO, stdout=errors, stderr=errors)
        try:

            async def completed() -> bool:
                return await count_type(log, "activation.completed") >= 1

            await _until(completed, proc, err, "the run to complete")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return effects.read_text().splitlines()


async def test_a_long_handler_resumes_from_its_last_recorded_step_after_kill_9(
    settings: Settings, log: EventLog, redis: aioredis.Redis, servers: Servers, tmp_path: Path
) -> None:
    effects = await run_long_job("Checkpointed", settings, log, redis, servers, tmp_path)
    # Each step's side effect ran exactly once, across three processes.
    assert effects == ["long1 1", "long1 2", "long1 3", "long1 4"]
    events = await log.read_all()
    steps = [e.body for e in events if isinstance(e.body, StepRecorded)]
    assert [(s.step, s.result) for s in steps] == [(n, f"long1:{n}") for n in range(1, 5)]
    [done] = [e.body for e in events if isinstance(e.body, ActivationCompleted)]
    assert done.steps == 4
    [reserved] = [e.body for e in events if isinstance(e.body, StockReserved)]
    assert reserved.reservation == "long1:1,long1:2,long1:3,long1:4"


async def test_broken_variant_work_outside_steps_is_repeated_after_kill_9(
    settings: Settings, log: EventLog, redis: aioredis.Redis, servers: Servers, tmp_path: Path
) -> None:
    """What the test above guards: without checkpoints, each restart starts over."""
    effects = await run_long_job("Unchecked", settings, log, redis, servers, tmp_path)
    assert effects.count("long1 1") == 3 and effects.count("long1 3") == 2
    assert await count_type(log, "orders.stock_reserved") == 1  # it completes, repeating work
