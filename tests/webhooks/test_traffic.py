"""The demo's traffic (``webhooks.demo.traffic``): every call makes new deliveries, so a
stream of them (``agentrt up --demo`` again, the end-to-end benchmark) is never taken for
redeliveries and deduplicated away."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from tests.support.servers import Servers
from tests.support.webhooks import ingress, redis_url_for_tests
from webhooks.config import load
from webhooks.demo.traffic import sample_config, sample_posts


async def test_two_rounds_of_sample_posts_are_all_new_deliveries(
    servers: Servers, tmp_path: Path
) -> None:
    url = redis_url_for_tests(servers.redis_url)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    config, sources = load(sample_config(tmp_path / "webhooks.toml"))
    first, second = sample_posts(sources), sample_posts(sources)
    assert {p.source for p in first} >= {"postmark", "mailgun", "sendgrid", "mta", "debezium",
                                         "supabase"}  # fmt: skip
    event_ids = set()
    async with ingress(url, config) as http:
        for post in first + second:
            r = await http.post(f"/webhooks/{post.source}", content=post.body,
                                headers=post.headers)  # fmt: skip
            assert r.status_code == 202, (post.source, r.text)
            assert not r.json()["duplicate"], f"{post.source} {post.label}: deduplicated"
            event_ids.add(r.json()["event_id"])
        # A real redelivery still is one: the same post again gets the same event.
        again = await http.post(f"/webhooks/{second[-1].source}", content=second[-1].body,
                                headers=second[-1].headers)  # fmt: skip
        assert again.json()["duplicate"] is True
    assert len(event_ids) == len(first) + len(second)
