"""Kill -9 workers at random instants: nothing lost, nothing doubled, no recorded step re-run.

Worker processes run ``tests.support.apps.crash`` (an LLM step, a tool step, an
emitted event per order) against a shared offline model server, which logs
every model call with its arrival time; the tool logs its calls to a file.
Workers are killed with SIGKILL several times while they work, then one is
left to finish. The same scenario run with a deliberately broken worker
(XACK on receipt, before the commit) must fail the same checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from runtime.events.builtin import StepRecorded
from runtime.llm.offline import OfflineServer
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.streams.keys import ingress_stream
from tests.support import REPO
from tests.support.apps.orders import OrderPlaced
from tests.support.runtime import inbox_rows, send, worker_env
from tests.support.servers import Servers

EVENTS = 60
KILLS = 4
AGENT = "crashy"

CORRECT = [sys.executable, "-m", "runtime", "worker", "--app", "tests.support.apps.crash",
           "--partitions", "2", "--claim-idle", "0.5", "--concurrency", "4",
           "--max-deliveries", "50", "--no-relay"]  # fmt: skip
BROKEN = [sys.executable, "-m", "tests.support.apps.broken_worker"]

_canonical = msgspec.json.Encoder(order="sorted")


async def run_scenario(
    command: list[str],
    settings: Settings,
    log: EventLog,
    redis: aioredis.Redis,
    servers: Servers,
    tmp_path: Path,
    seed: int,
) -> list[str]:
    """Send events, kill workers at random instants, let one finish; the problems found."""
    rng = random.Random(seed)
    calls = tmp_path / "tool-calls.txt"
    stderr = tmp_path / "worker-stderr.txt"
    ids = [
        await send(redis, OrderPlaced(order_id=f"k{i}", sku=f"SKU-{i}", quantity=1 + i % 3),
                   partition=i % 2)
        for i in range(EVENTS)
    ]  # fmt: skip
    with OfflineServer() as server:
        env = worker_env(settings, servers, server.base_url, calls, tool_delay=0.03)
        with stderr.open("ab") as errors:
            for _ in range(KILLS):
                proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=errors, stderr=errors)
                try:
                    before = len(await inbox_rows(log))
                    # Kill it once it is doing work, at a random instant of it.
                    await _progress(log, before + 2, proc, stderr)
                    await asyncio.sleep(rng.uniform(0.0, 0.4))
                finally:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                if len(await inbox_rows(log)) >= EVENTS:
                    break
            proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=errors, stderr=errors)
            try:
                await _quiet(log, redis, proc, stderr)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        requests = server.requests.messages()
    return await _problems(log, redis, ids, requests, calls)


async def _progress(log: EventLog, target: int, proc: subprocess.Popen[bytes], err: Path) -> None:
    deadline = time.monotonic() + 30
    while len(await inbox_rows(log)) < target:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}:\n{err.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"worker made no progress:\n{err.read_text()[-3000:]}")
        await asyncio.sleep(0.02)


async def _quiet(
    log: EventLog, redis: aioredis.Redis, proc: subprocess.Popen[bytes], err: Path
) -> None:
    """Until every event is handled, or nothing is pending and nothing changes for 2 s."""
    deadline = time.monotonic() + 90
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}:\n{err.read_text()[-3000:]}")
        done = len(await inbox_rows(log))
        if done >= EVENTS and await _pending(redis) == 0:
            return
        if done != last:
            last, since = done, time.monotonic()
        elif time.monotonic() - since > 2.0 and await _pending(redis) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the last worker did not finish:\n{err.read_text()[-3000:]}")


async def _pending(redis: aioredis.Redis) -> int:
    total = 0
    for p in range(2):
        with contextlib.suppress(aioredis.ResponseError):
            total += int((await redis.xpending(ingress_stream(p), AGENT))["pending"])
    return total


async def _problems(
    log: EventLog,
    redis: aioredis.Redis,
    ids: list[uuid.UUID],
    requests: list[Any],
    calls: Path,
) -> list[str]:
    problems: list[str] = []
    handled = [r[1] for r in await inbox_rows(log)]
    missing = set(ids) - set(handled)
    if missing:
        problems.append(f"{len(missing)} events never handled")
    events = []
    after = None
    while page := await log.read_all(*([after] if after else [])):
        events += page
        after = page[-1].log_position
    for event_id in ids:
        run = [e for e in events if e.run_id == event_id]
        reserved = sum(e.event_type == "orders.stock_reserved" for e in run)
        completed = sum(e.event_type == "activation.completed" for e in run)
        if event_id not in missing and (reserved, completed) != (1, 1):
            problems.append(f"run {event_id}: {reserved} outputs, {completed} completions")
    # No call of a step after its result was recorded.
    steps = [(e.body, e.recorded_at.timestamp()) for e in events
             if isinstance(e.body, StepRecorded)]  # fmt: skip
    by_messages: dict[bytes, list[float]] = {}
    for r in requests:
        key = _canonical.encode([r.body.get("model"), r.body.get("messages")])
        by_messages.setdefault(key, []).append(r.received_at)
    tool_calls: dict[tuple[str, int], list[float]] = {}
    if calls.exists():
        for line in calls.read_text().splitlines():
            aid, step, at = line.split()
            tool_calls.setdefault((aid, int(step)), []).append(float(at))
    llm_steps = 0
    for body, recorded in steps:
        if body.kind == "llm":
            llm_steps += 1
            key = _canonical.encode([body.request.get("model"), body.request.get("messages")])
            times = by_messages.get(key, [])
        else:
            times = tool_calls.get((str(body.activation_id), body.step), [])
        if not times:
            problems.append(f"step {body.step} of {body.activation_id} recorded but never called")
        late = [t for t in times if t > recorded]
        if late:
            problems.append(f"{body.kind} step {body.step} of {body.activation_id} called again "
                            f"after its result was recorded")  # fmt: skip
    if llm_steps < EVENTS - len(missing):
        problems.append(f"only {llm_steps} LLM steps recorded")
    if await _pending(redis):
        problems.append("entries still pending")
    return problems


async def test_kill_9_loses_nothing_and_duplicates_nothing(
    settings: Settings, log: EventLog, redis: aioredis.Redis, servers: Servers, tmp_path: Path
) -> None:
    problems = await run_scenario(CORRECT, settings, log, redis, servers, tmp_path, seed=7)
    assert problems == []
    # Several workers (consumers) took part: later ones reclaimed what killed ones held.
    consumers = set()
    for p in range(2):
        consumers |= {c["name"] for c in await redis.xinfo_consumers(ingress_stream(p), AGENT)}
    assert len(consumers) >= 2


async def test_kill_9_catches_a_worker_that_acks_before_commit(
    settings: Settings, log: EventLog, redis: aioredis.Redis, servers: Servers, tmp_path: Path
) -> None:
    problems = await run_scenario(BROKEN, settings, log, redis, servers, tmp_path, seed=7)
    assert any("never handled" in p for p in problems), problems
