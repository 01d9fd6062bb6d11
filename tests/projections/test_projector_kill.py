"""Promise 5 under SIGKILL: an ``agentrt projector`` killed while it folds, and restarted,
ends with the same read models as a clean rebuild (nothing missed, nothing applied twice)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from typing import Any

from projections.builtin import builtin_projections
from projections.engine import Projector
from runtime.events.model import LogPosition
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections.builtin_gen import AGENTS, Generator

NAMES = [p.name for p in builtin_projections(AGENTS)]


def _env(settings: Settings) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        # Small pages: many transactions, so a kill lands inside one.
        "AGENTRT_PROJECTION_BATCH": "20",
        "AGENTRT_SNAPSHOT_EVERY": "7",
        "AGENTRT_POLL_INTERVAL": "0.05",
        "AGENTRT_LOG_LEVEL": "warning",
    }
    env.pop("ANTHROPIC_API_KEY", None)
    return env


async def _start(settings: Settings) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", "projector", "--app", "tests.projections.builtin_gen",
        env=_env(settings), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _checkpoints(log: EventLog, settings: Settings) -> dict[str, tuple[LogPosition, int]]:
    rows = await log.pool.fetch(
        f'SELECT name, tx::text, position, events FROM "{settings.read_schema}"'
        ".projection_checkpoints"
    )
    return {r[0]: (LogPosition(int(r[1]), r[2]), r[3]) for r in rows}


async def _wait(log: EventLog, settings: Settings, check: Any, seconds: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            if check(await _checkpoints(log, settings)):
                return
        except Exception as exc:  # the table may not exist yet
            if "does not exist" not in str(exc):
                raise
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the projector")
        await asyncio.sleep(0.02)


async def _tables(log: EventLog, settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for p in builtin_projections(AGENTS):
        for table in p.tables:
            rows = await log.pool.fetch(f'SELECT * FROM "{settings.read_schema}"."{table}"')
            out[table] = sorted((tuple(r) for r in rows), key=repr)
    snaps = await log.pool.fetch(
        "SELECT run_id, agent, fold_version, tx_id::text, position, event_id, event_count, "
        f'state FROM "{settings.db_schema}".snapshots'
    )
    out["snapshots"] = sorted((tuple(r) for r in snaps), key=repr)
    return out


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGKILL)


async def test_a_projector_killed_mid_batch_and_restarted_equals_a_rebuild(
    log: EventLog, settings: Settings
) -> None:
    rng = random.Random(10)
    gen = Generator(log)
    kinds = ["activate"] * 5 + ["dead", "redrive", "ask", "decide", "budget", "circuit", "fork"]

    def moves(n: int) -> list[tuple[str, int, int, int, int]]:
        out = []
        for _ in range(n):  # a new run a third of the time, else one of the last 20
            fresh = len(gen.runs) + len(out) // 3
            run = fresh if rng.random() < 0.33 else max(fresh - 1 - rng.randrange(20), 0)
            out.append((rng.choice(kinds), run, rng.randrange(4), rng.randrange(4),
                        rng.randrange(1000)))  # fmt: skip
        return out

    await gen.apply(moves(20))
    proc = await _start(settings)
    kills = 0
    try:
        # Built (each new projection is rebuilt on start), then live.
        await _wait(log, settings, lambda cps: all(n in cps for n in NAMES))
        for _ in range(4):
            # Kill it while it follows a burst of appends, folding page after page.
            burst = asyncio.create_task(gen.apply(moves(300)))
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            _kill(proc)
            await proc.wait()
            kills += 1
            proc = await _start(settings)
            await burst
        last = (await log.read_last(1))[0].log_position
        await _wait(log, settings, lambda cps: all(cps[n][0] == last for n in NAMES), 90)
    finally:
        _kill(proc)
        await proc.wait()
    assert kills == 4
    assert gen.count > 1500  # a few thousand events, folded in pages of 20
    projected = await _tables(log, settings)
    in_runs = await log.pool.fetchval(
        f'SELECT count(*) FROM "{settings.db_schema}".events WHERE run_id IS NOT NULL'
    )
    assert len(projected["timeline"]) == in_runs

    # A clean rebuild of every projection from the start, swapped in.
    same = Settings.from_env({}, db_schema=settings.db_schema, snapshot_every=7).with_urls(
        redis_url=settings.redis_url, database_url=settings.database_url
    )
    projector = Projector(log, builtin_projections(AGENTS, same), same)
    for name in NAMES:
        await projector.rebuild(name)
    rebuilt = await _tables(log, settings)
    for table in rebuilt:
        assert projected[table] == rebuilt[table], table
