"""The embedded servers: start, stop, status, and data that survives a restart."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from runtime.log.migrations import migrate
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.ops.embedded import EmbeddedServices
from runtime.settings import Settings
from tests.events_fixtures import Noted


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServices]:
    svc = EmbeddedServices(tmp_path_factory.mktemp("embedded"), fast_unsafe=True)
    try:
        yield svc
    finally:
        svc.destroy()


def test_up_is_idempotent_and_prints_stable_urls(services: EmbeddedServices) -> None:
    first = services.up()
    again = services.up()
    assert first == again
    assert first["REDIS_URL"].startswith("redis://127.0.0.1:")
    assert first["DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1:")
    assert all(s.running for s in services.status())


def test_redis_runs_with_aof_and_keeps_data_across_restart(services: EmbeddedServices) -> None:
    url = services.up()["REDIS_URL"]
    client = redis.Redis.from_url(url)
    try:
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        client.xadd("agentrt:test", {"k": "v"})
    finally:
        client.close()
    assert services.redis.stop()
    assert not services.redis.state().running
    assert services.up()["REDIS_URL"] == url  # same port after a restart
    client = redis.Redis.from_url(url)
    try:
        assert client.xlen("agentrt:test") == 1
    finally:
        client.close()


def test_postgres_keeps_the_log_across_restart(services: EmbeddedServices) -> None:
    url = services.up()["DATABASE_URL"]
    cfg = Settings.from_env({}, db_schema="restart").with_urls(redis_url=None, database_url=url)

    async def write() -> None:
        await migrate(cfg)
        pool = await open_runtime_pool(cfg)
        try:
            await EventLog(pool, schema="restart").append("s", [Noted(text="durable")])
        finally:
            await pool.close()

    async def read() -> list[str]:
        pool = await open_runtime_pool(cfg)
        try:
            return [e.body.text for e in await EventLog(pool, schema="restart").read_stream("s")]  # type: ignore[attr-defined]
        finally:
            await pool.close()

    asyncio.run(write())
    assert services.down() == ["redis", "postgres"]
    assert services.down() == []
    assert not any(s.running for s in services.status())
    services.up()
    assert asyncio.run(read()) == ["durable"]


def test_cli_services_up_status_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["AGENTRT_STATE_DIR"] = str(tmp_path / "state")

    def agentrt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        up = agentrt("services", "up")
        assert up.returncode == 0, up.stderr
        assert "export REDIS_URL=redis://127.0.0.1:" in up.stdout
        assert "export DATABASE_URL=postgresql://" in up.stdout
        status = agentrt("services", "status", "--json")
        assert status.returncode == 0
        assert '"running": true' in status.stdout
    finally:
        down = agentrt("services", "down")
    assert down.returncode == 0
    assert "stopped: redis, postgres" in down.stdout
    status = agentrt("services", "status")
    assert "stopped" in status.stdout
