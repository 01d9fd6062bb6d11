"""Redeliveries at the ingress: a Mailgun retry after a failed append, and a partition change
inside the dedupe window, neither lose a delivery nor run its effects twice."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.effects.tools import tool
from runtime.log.store import EventLog
from runtime.streams.keys import ingress_stream, partition_of
from tests.support.runtime import count_type, fast_options, running, wait_for
from tests.support.servers import Servers, redis_user
from tests.support.webhooks import (
    all_entries,
    ingress,
    mailgun_form,
    make_config,
    redis_url_for_tests,
    standard_headers,
)
from webhooks.events import WebhookReceived

FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def redis_url(servers: Servers) -> AsyncIterator[str]:
    url = redis_url_for_tests(servers.redis_url)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    yield url
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


# -- Mailgun's token and a failed append ------------------------------------------------------


async def test_a_mailgun_retry_after_a_failed_append_is_accepted(
    redis_url: str, redis: aioredis.Redis
) -> None:
    body = mailgun_form()
    async with ingress(redis_url, make_config(partitions=1)) as c:
        # The append fails after the token was checked: the stream key holds a string.
        await redis.set(ingress_stream(0), "not a stream")
        failed = await c.post("/webhooks/mailgun", content=body, headers=FORM)
        assert failed.status_code == 503, failed.text
        assert failed.json()["code"] == "redis_unavailable"
        await redis.delete(ingress_stream(0))
        retry = await c.post("/webhooks/mailgun", content=body, headers=FORM)
        assert retry.status_code == 202, retry.text
        assert retry.json()["duplicate"] is False
        again = await c.post("/webhooks/mailgun", content=body, headers=FORM)
        assert again.status_code == 202, again.text
        assert again.json() == {"event_id": retry.json()["event_id"], "duplicate": True}
    assert len(await all_entries(redis, partitions=1)) == 1


@pytest.fixture
async def no_cleanup_url(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[str]:
    """``redis_url`` as a user that may do everything but DEL: no compensating delete can
    run after a failed append, as after a crash or a connection lost between the two."""
    if urlsplit(redis_url).scheme not in ("redis", "rediss"):
        pytest.skip("needs a TCP Redis URL to log in as another user")
    async with redis_user(redis, redis_url, "ingress", denied=["del", "unlink"]) as url:
        yield url


async def test_the_token_is_not_used_up_by_a_delivery_that_was_not_appended(
    no_cleanup_url: str, redis: aioredis.Redis
) -> None:
    # The token must be consumed with the append or not at all: a token used up
    # before an append that never happened turns Mailgun's retry into a 401.
    body = mailgun_form()
    async with ingress(no_cleanup_url, make_config(partitions=1)) as c:
        await redis.set(ingress_stream(0), "not a stream")
        failed = await c.post("/webhooks/mailgun", content=body, headers=FORM)
        assert failed.status_code == 503, failed.text
        await redis.delete(ingress_stream(0))
        retry = await c.post("/webhooks/mailgun", content=body, headers=FORM)
        assert retry.status_code == 202, retry.text
        assert retry.json()["duplicate"] is False
    assert len(await all_entries(redis, partitions=1)) == 1


# -- partitions changed inside the dedupe window ----------------------------------------------


def _customer_in(partitions: int, partition: int) -> str:
    """A customer id whose deliveries go to ``partition`` of ``partitions``."""
    for n in range(1000):
        if partition_of(f"c-{n}", partitions) == partition:
            return f"c-{n}"
    raise AssertionError("no such key")


def _order(customer: str) -> bytes:
    return json.dumps({"data": {"customer": {"id": customer}}, "total": 12}).encode()


async def _post_order(c: httpx.AsyncClient, body: bytes) -> httpx.Response:
    response = await c.post(
        "/webhooks/orders", content=body, headers=standard_headers(body, "msg_partitioned")
    )
    assert response.status_code == 202, response.text
    return response


@pytest.mark.parametrize(("before", "after"), [(1, 4), (4, 3), (2, 3)])
async def test_a_partition_change_appends_a_redelivery_again(
    redis_url: str, redis: aioredis.Redis, before: int, after: int
) -> None:
    """The documented trade-off: dedupe is per partition (atomic with the append), so a
    redelivery after a change of partitions is a second entry with the same event id;
    the test below shows its effects still happen once."""
    customer = next(
        f"c-{n}"
        for n in range(1000)
        if partition_of(f"c-{n}", after) != partition_of(f"c-{n}", before) < after
    )
    body = _order(customer)
    async with ingress(redis_url, make_config(partitions=before)) as c:
        first = await _post_order(c, body)
    async with ingress(redis_url, make_config(partitions=after)) as c:
        again = await _post_order(c, body)
    assert again.json() == {"event_id": first.json()["event_id"], "duplicate": False}
    entries = await all_entries(redis, partitions=max(before, after))
    assert len(entries) == 2
    async with ingress(redis_url, make_config(partitions=after)) as c:
        third = await _post_order(c, body)
    assert third.json()["duplicate"] is True  # within one partitioning, dedupe holds


async def test_a_changed_partition_key_appends_a_redelivery_again(
    redis_url: str, redis: aioredis.Redis
) -> None:
    body = _order(_customer_in(4, 3))
    async with ingress(redis_url, make_config(partitions=4)) as c:
        first = await _post_order(c, body)
    config = make_config(partitions=4)
    orders = msgspec.structs.replace(config.sources["orders"], partition_key="none")
    keyless = msgspec.structs.replace(config, sources={**config.sources, "orders": orders})
    async with ingress(redis_url, keyless) as c:
        again = await _post_order(c, body)
    event_id = first.json()["event_id"]
    assert again.json()["event_id"] == event_id
    # Without a partition key the event id picks the partition: if that is not
    # partition 3, the copy is a second entry (whose effects run once, below).
    moved = partition_of(event_id, 4) != 3
    assert again.json()["duplicate"] is not moved
    assert len(await all_entries(redis)) == (2 if moved else 1)


# -- and if a copy is appended twice, its effects still happen once ---------------------------

TOOL_CALLS: list[str] = []


@tool
async def charge(customer: str, total: int) -> str:
    """Charge a customer for an order."""
    TOOL_CALLS.append(customer)
    return f"charged {customer} {total}"


class Billing(Agent):
    name = "billing"
    subscribes = (WebhookReceived,)
    tools = (charge,)

    async def handle(self, event: WebhookReceived, ctx: Context) -> None:
        payload = event.payload
        await ctx.tool(charge, customer=payload["data"]["customer"]["id"], total=payload["total"])


async def _drained(redis: aioredis.Redis, partitions: int, group: str) -> bool:
    """Every entry of every partition delivered to ``group`` and acknowledged."""
    for p in range(partitions):
        stream = ingress_stream(p)
        entries = await redis.xrange(stream)
        if not entries:
            continue
        groups = {
            (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g
            for g in await redis.xinfo_groups(stream)
        }
        mine = groups.get(group)
        if mine is None or mine["last-delivered-id"] != entries[-1][0] or mine["pending"]:
            return False
    return True


@pytest.mark.parametrize(
    ("before", "after", "copies"),
    [(1, 2, 2), (2, 1, 2)],
    ids=["more-partitions", "fewer-partitions"],
)
async def test_a_redelivery_across_a_partition_change_runs_its_tool_once(
    redis_url: str,
    redis: aioredis.Redis,
    log: EventLog,
    tmp_path: Path,
    before: int,
    after: int,
    copies: int,
) -> None:
    """The redelivery lands in another partition and is appended again; the activation
    claim and the inbox keep its tool from running twice."""
    TOOL_CALLS.clear()
    customer = _customer_in(2, 1)
    body = _order(customer)
    async with ingress(redis_url, make_config(partitions=before)) as c:
        first = await _post_order(c, body)
    async with ingress(redis_url, make_config(partitions=after)) as c:
        again = await _post_order(c, body)
    assert again.json()["event_id"] == first.json()["event_id"]
    assert again.json()["duplicate"] is (copies == 1)
    assert len(await all_entries(redis, partitions=2)) == copies
    async with running([Billing()], redis, log, relay=False, options=fast_options(partitions=2)):
        await wait_for(lambda: _drained(redis, 2, "billing"), what="both partitions drained")
        await wait_for(lambda: _completed(log, 1), what="the activation")
    assert [customer] == TOOL_CALLS
    assert await count_type(log, "activation.completed") == 1
    assert await count_type(log, "webhook.received") == 1


async def _completed(log: EventLog, n: int) -> bool:
    return await count_type(log, "activation.completed") >= n
