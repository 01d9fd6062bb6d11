"""`agentrt projector`, `agentrt projections status|rebuild`, end to end in subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections.test_engine import Ticked
from tests.runtime.test_cli import agentrt, env_for

APP = "tests.support.apps.projected"


async def _ticks(log: EventLog, settings: Settings) -> dict[str, int]:
    try:
        rows = await log.pool.fetch(f'SELECT stream, count FROM "{settings.read_schema}".ticks')
    except Exception:
        return {}
    return {r["stream"]: r["count"] for r in rows}


async def test_status_rebuild_and_unknown_projection(log: EventLog, settings: Settings) -> None:
    for s in range(3):
        await log.append(f"s-{s}", [Ticked(n=i) for i in range(4)])
    status = await asyncio.to_thread(agentrt, settings, "projections", "status", "--app", APP,
                                     "--json")  # fmt: skip
    assert status.returncode == 0, status.stderr
    rows = {r["name"]: r for r in json.loads(status.stdout)}
    assert rows["ticks"]["state"] == "new"
    assert rows["ticks"]["lag_events"] == 12
    assert {"runs", "timeline", "audit"} <= set(rows), "the built-ins are registered"

    rebuilt = await asyncio.to_thread(agentrt, settings, "projections", "rebuild", "ticks",
                                      "--app", APP)  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt ticks: 12 events folded" in rebuilt.stdout
    assert await _ticks(log, settings) == {f"s-{s}": 4 for s in range(3)}

    status = await asyncio.to_thread(agentrt, settings, "projections", "status", "--app", APP)
    assert status.returncode == 0
    assert "ticks" in status.stdout and "live" in status.stdout

    unknown = await asyncio.to_thread(agentrt, settings, "projections", "rebuild", "nope",
                                      "--app", APP)  # fmt: skip
    assert unknown.returncode == 1
    assert "projection_not_found" in unknown.stderr and "ticks" in unknown.stderr


async def test_projector_follows_the_log_and_stops_on_sigterm(
    log: EventLog, settings: Settings
) -> None:
    await log.append("s-0", [Ticked(n=1)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", "projector", "--app", APP,
        env=env_for(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (await _ticks(log, settings)).get("s-0") != 1:
            if proc.returncode is not None or time.monotonic() > deadline:
                proc.kill()
                _, stderr = await proc.communicate()
                raise AssertionError(f"the projector did not build its tables: {stderr!r}")
            await asyncio.sleep(0.1)
        await log.append("s-0", [Ticked(n=2), Ticked(n=3)])
        await log.append("s-1", [Ticked(n=4)])
        while await _ticks(log, settings) != {"s-0": 3, "s-1": 1}:
            assert time.monotonic() < deadline, "the projector did not follow the log"
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
