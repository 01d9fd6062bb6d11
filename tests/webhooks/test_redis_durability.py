"""The ingress reports Redis durability in /readyz, warns at start, and with
require_durable_redis refuses to start or to be ready on a Redis that may lose a 202."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from runtime.errors import RedisNotDurable
from runtime.settings import Settings
from tests.support.servers import Servers, private_redis
from tests.support.webhooks import ingress, make_config, redis_url_for_tests
from webhooks.app import create_app
from webhooks.config import resolve


@pytest.fixture(scope="module")
def always_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis with AOF and fsync always (its CONFIG may be changed and restored)."""
    with private_redis(tmp_path_factory.mktemp("redis-always")) as url:
        yield url


async def test_readyz_reports_the_sessions_redis(servers: Servers) -> None:
    url = redis_url_for_tests(servers.redis_url)
    async with ingress(url) as c:
        ready = await c.get("/readyz")
    assert ready.status_code == 200, ready.text  # not durable is not unready by default
    report = ready.json()["redis_durability"]
    check = aioredis.Redis.from_url(url)
    try:
        config = await check.config_get("append*")
    finally:
        await check.aclose()
    assert (report["appendonly"], report["appendfsync"]) == (
        config["appendonly"],
        config["appendfsync"],
    )
    if servers.embedded:  # the suite's Redis fsyncs once a second
        assert report == {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "durable": False,
            "verified": True,
            "problem": "appendfsync is 'everysec', not 'always'",
        }


async def test_readyz_reports_a_durable_redis_and_follows_its_config(always_url: str) -> None:
    required = Settings.from_env({}, require_durable_redis=True)
    admin = aioredis.Redis.from_url(always_url)
    try:
        async with _ingress(always_url, required) as c:
            ready = await c.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["redis_durability"]["durable"] is True
            # Someone lowers the fsync policy after the start: readiness fails on it.
            await admin.config_set("appendfsync", "everysec")
            try:
                unready = await c.get("/readyz")
            finally:
                await admin.config_set("appendfsync", "always")
            assert unready.status_code == 503, unready.text
            assert unready.json()["code"] == "not_ready"
            assert "appendfsync is 'everysec'" in unready.json()["message"]
            assert unready.json()["redis_durability"]["durable"] is False
            assert (await c.get("/readyz")).status_code == 200
    finally:
        await admin.aclose()


async def test_start_warns_on_a_redis_that_is_not_durable(servers: Servers) -> None:
    if not servers.embedded:
        pytest.skip("the session's Redis is external: its durability is whatever it is")
    with capture_logs() as logs:
        async with ingress(redis_url_for_tests(servers.redis_url)):
            pass
    [warning] = [e for e in logs if e["event"] == "redis.not_durable"]
    assert warning["component"] == "agentrt serve"
    assert (warning["appendonly"], warning["appendfsync"]) == ("yes", "everysec")


async def test_start_refuses_when_durability_is_required(always_url: str) -> None:
    admin = aioredis.Redis.from_url(always_url)
    await admin.config_set("appendfsync", "everysec")
    try:
        with pytest.raises(RedisNotDurable, match="appendfsync is 'everysec'"):
            async with _ingress(always_url, Settings.from_env({}, require_durable_redis=True)):
                pass
    finally:
        await admin.config_set("appendfsync", "always")
        await admin.aclose()


@contextlib.asynccontextmanager
async def _ingress(url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """``tests.support.webhooks.ingress`` with settings of the test's own."""
    config = make_config()
    app = create_app(settings.with_urls(redis_url=url, database_url=None), config, resolve(config))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress") as c,
    ):
        yield c
