"""Promise 1 rests on Redis fsyncing every write: checked at start, warned about, or refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from runtime.errors import RedisNotDurable
from runtime.settings import Settings
from runtime.streams.durability import check_redis_durability, ensure_durable_redis
from tests.support import REPO
from tests.support.servers import Servers, private_redis, redis_user


@pytest.fixture(scope="module")
def always_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis as compose and the embedded servers run it: AOF, fsync always."""
    with private_redis(tmp_path_factory.mktemp("redis-always")) as url:
        yield url


@pytest.fixture(scope="module")
def everysec_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis that fsyncs once a second (Redis's default when AOF is on)."""
    with private_redis(tmp_path_factory.mktemp("redis-everysec"), appendfsync="everysec") as url:
        yield url


@pytest.fixture
async def always(always_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(always_url)
    yield client
    await client.aclose()


async def test_aof_with_fsync_always_is_durable(always: aioredis.Redis) -> None:
    found = await check_redis_durability(always)
    assert (found.appendonly, found.appendfsync, found.durable, found.verified) == (
        "yes",
        "always",
        True,
        True,
    )
    assert found.problem is None
    assert found.as_json() == {
        "appendonly": "yes",
        "appendfsync": "always",
        "durable": True,
        "verified": True,
    }


async def test_the_test_sessions_redis_is_reported_as_it_is(servers: Servers) -> None:
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        found = await check_redis_durability(client)
        config = await client.config_get("append*")
    finally:
        await client.aclose()
    durable = config["appendonly"] == "yes" and config["appendfsync"] == "always"
    assert found.durable is durable
    if servers.embedded:  # the suite runs its Redis with appendfsync everysec
        assert (found.appendonly, found.appendfsync, found.durable) == ("yes", "everysec", False)
        assert found.problem == "appendfsync is 'everysec', not 'always'"


@pytest.mark.parametrize(
    ("setting", "value", "problem", "risk"),
    [
        ("appendfsync", "everysec", "appendfsync is 'everysec', not 'always'", "last second"),
        ("appendfsync", "no", "appendfsync is 'no', not 'always'", "operating system"),
        ("appendonly", "no", "appendonly is 'no', not 'yes'", "in memory only"),
    ],
)
async def test_less_than_fsync_always_is_not_durable(
    always: aioredis.Redis, setting: str, value: str, problem: str, risk: str
) -> None:
    before = (await always.config_get(setting))[setting]
    assert before is not None
    await always.config_set(setting, value)
    try:
        found = await check_redis_durability(always)
    finally:
        await always.config_set(setting, before)
    assert found.durable is False
    assert found.verified is True
    assert found.problem == problem
    assert found.risk is not None and risk in found.risk
    assert (await check_redis_durability(always)).durable  # restored


@pytest.fixture
async def no_config_url(always: aioredis.Redis, always_url: str) -> AsyncIterator[str]:
    """A user that may not run CONFIG, as on managed Redis services."""
    async with redis_user(always, always_url, "managed", denied=["config"]) as url:
        yield url


async def test_a_refused_config_get_is_could_not_verify_and_not_durable(
    no_config_url: str,
) -> None:
    client = aioredis.Redis.from_url(no_config_url)
    try:
        found = await check_redis_durability(client)
        settings = Settings.from_env({}, require_durable_redis=True)
        with pytest.raises(RedisNotDurable, match="could not verify"):
            await ensure_durable_redis(client, settings, component="agentrt worker")
    finally:
        await client.aclose()
    assert found.verified is False
    assert found.durable is False
    assert found.appendonly == "yes"  # INFO persistence still says AOF is on
    assert found.appendfsync is None
    assert found.problem is not None and found.problem.startswith("could not verify")


async def test_not_durable_warns_with_the_settings_and_the_risk(everysec_url: str) -> None:
    client = aioredis.Redis.from_url(everysec_url)
    try:
        with capture_logs() as logs:
            found = await ensure_durable_redis(
                client, Settings.from_env({}), component="agentrt worker"
            )
    finally:
        await client.aclose()
    assert not found.durable
    [warning] = [e for e in logs if e["event"] == "redis.not_durable"]
    assert warning["log_level"] == "warning"
    assert warning["component"] == "agentrt worker"
    assert (warning["appendonly"], warning["appendfsync"]) == ("yes", "everysec")
    assert "202" in warning["risk"]
    assert "AGENTRT_REQUIRE_DURABLE_REDIS" in warning["hint"]


async def test_durable_is_silent_and_required_durable_passes(always: aioredis.Redis) -> None:
    with capture_logs() as logs:
        found = await ensure_durable_redis(
            always, Settings.from_env({}, require_durable_redis=True), component="agentrt worker"
        )
    assert found.durable
    assert not [e for e in logs if e["event"] == "redis.not_durable"]


async def test_required_durability_refuses_with_a_clear_error(everysec_url: str) -> None:
    client = aioredis.Redis.from_url(everysec_url)
    settings = Settings.from_env({"AGENTRT_REQUIRE_DURABLE_REDIS": "1"})
    assert settings.require_durable_redis
    try:
        with pytest.raises(RedisNotDurable) as info:
            await ensure_durable_redis(client, settings, component="agentrt worker")
    finally:
        await client.aclose()
    assert info.value.code == "redis_not_durable"
    assert "appendfsync is 'everysec', not 'always'" in info.value.message
    assert "agentrt worker refuses to start" in info.value.message


def _agentrt(
    settings: Settings, redis_url: str, *args: str, require: bool
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": redis_url,
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "AGENTRT_REQUIRE_DURABLE_REDIS": "1" if require else "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_agentrt_worker_refuses_a_redis_that_is_not_durable(
    settings: Settings, everysec_url: str
) -> None:
    result = _agentrt(
        settings, everysec_url, "worker", "--app", "tests.support.apps.orders", require=True
    )
    assert result.returncode == 1, result.stderr
    assert "redis_not_durable" in result.stderr
    assert "appendfsync is 'everysec'" in result.stderr


def test_agentrt_serve_refuses_a_redis_that_is_not_durable(
    settings: Settings, everysec_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "webhooks.toml"
    config.write_text('[sources.open]\nformat = "generic"\nauth = "none"\n')
    result = _agentrt(
        settings,
        everysec_url,
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        require=True,
    )
    assert result.returncode == 1, result.stderr
    assert "redis_not_durable" in result.stderr
    assert "agentrt serve refuses to start" in result.stderr
