"""Against a real three-master Redis Cluster: the ingress, two workers and the relay handle
every accepted webhook once, dead letters and redrives work, nothing is left pending; and
the cross-slot MULTIs the cluster paths replace are refused there (the broken variants)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import typing
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import (
    ClusterCrossSlotError,
    CrossSlotTransactionError,
    RedisClusterException,
)
from structlog.testing import capture_logs

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.effects.tools import ToolContext, tool
from runtime.errors import SettingsError
from runtime.events.builtin import TimerScheduled
from runtime.events.model import NewEvent
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.streams.durability import check_redis_durability
from runtime.streams.keys import (
    DLQ_STREAM,
    agent_stream,
    cluster_url,
    connect_redis,
    ingress_stream,
    is_cluster,
)
from runtime.worker import dead_letters as dlq
from runtime.worker import groups
from runtime.worker import worker as worker_mod
from runtime.worker.groups import handoff_key
from runtime.worker.relay import LIVE, TIMERS_KEY, Relay
from runtime.worker.worker import Worker
from tests.runtime.worker.test_relay_identity import NEW, OLD, append, caught_up, published
from tests.runtime.worker.test_relay_identity import relay as relay_for
from tests.runtime.worker.test_relay_identity import running as running_relay
from tests.support.cluster import redis_cluster
from tests.support.events import Noted
from tests.support.runtime import count_type, fast_options, inbox_rows, send, wait_for
from tests.support.webhooks import ingress, make_config
from webhooks.events import WebhookReceived

PARTITIONS = 4
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``redis+cluster://`` URL of a three-master cluster of this module's own."""
    with contextlib.ExitStack() as stack:
        try:
            ports = stack.enter_context(redis_cluster(tmp_path_factory.mktemp("cluster")))
        except RuntimeError as exc:  # no binary, or its nodes would not start or meet
            pytest.skip(f"cannot start a Redis Cluster here: {exc}")
        yield f"redis+cluster://127.0.0.1:{ports[0]}"


@pytest.fixture
async def rc(cluster: str) -> AsyncIterator[aioredis.Redis]:
    """A cluster client; every master flushed before and after the test."""
    client = await connect_redis(cluster)
    await client.flushall()
    yield client
    await client.flushall()
    await client.aclose()


# -- the app: an intake agent (a tool step, an emitted event) and a reviewer fed by the relay --

#: Tool calls made, by webhook number: each must be made once.
CALLS: list[int] = []
#: While False, the intake fails on webhooks that ask it to (``"fail": true``).
FIXED = {"intake": False}


@tool
async def file_ticket(ctx: ToolContext, n: int) -> str:
    """File a ticket for webhook ``n``."""
    CALLS.append(n)
    return f"ticket-{n}"


class Intake(Agent):
    name = "intake"
    subscribes = (WebhookReceived,)
    tools = (file_ticket,)

    async def handle(self, event: WebhookReceived, ctx: Context) -> None:
        n = int(event.payload["n"])
        if event.payload.get("fail") and not FIXED["intake"]:
            raise RuntimeError(f"webhook {n}: the ticket system refuses it")
        ticket = await ctx.tool(file_ticket, n=n)
        ctx.emit(Noted(text=ticket, n=n))


class Reviewer(Agent):
    name = "reviewer"
    subscribes = (Noted,)
    reads_ingress = False

    async def handle(self, event: Noted, ctx: Context) -> None:
        return None


AGENTS: list[Agent] = [Intake(), Reviewer()]


@contextlib.asynccontextmanager
async def deployment(url: str, log: EventLog) -> AsyncIterator[None]:
    """Two workers and a relay, each with a cluster client of its own (as processes have)."""
    clients = [await connect_redis(url) for _ in range(3)]
    stop = asyncio.Event()
    workers = [
        Worker(AGENTS, redis=c, log=log, options=fast_options(partitions=PARTITIONS))
        for c in clients[:2]
    ]
    relay = Relay(log, clients[2], AGENTS, poll_interval=0.05, timer_interval=0.05)
    for w in workers:
        await w.setup()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    tasks.append(asyncio.create_task(relay.run(stop)))
    try:
        yield
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.aclose()
        for result in results:
            if isinstance(result, BaseException):
                raise result


async def streams_settled(rc: aioredis.Redis) -> bool:
    """Every group of every stream has read everything and has nothing pending."""
    streams = [ingress_stream(p) for p in range(PARTITIONS)]
    streams += [agent_stream(a.name) for a in AGENTS]
    for stream in streams:
        if not await rc.exists(stream):
            continue
        for group in await rc.xinfo_groups(stream):
            if int(group["pending"]) or int(group.get("lag") or 0):
                return False
    return True


async def completed(log: EventLog, n: int) -> bool:
    return await count_type(log, "activation.completed") >= n


async def test_webhooks_run_once_with_dead_letters_and_redrive_on_a_cluster(
    cluster: str, rc: aioredis.Redis, log: EventLog
) -> None:
    assert is_cluster(rc)
    CALLS.clear()
    FIXED["intake"] = False
    total, failing = 24, {5, 17}
    accepted: dict[int, uuid.UUID] = {}
    with capture_logs() as logs:
        async with deployment(cluster, log):
            await _webhooks_and_redrives(cluster, rc, log, total, failing, accepted)
    # No background task died, no Redis step failed (as a cross-slot command would).
    failures = {"worker.task_died", "relay.restarting", "relay.wake_listener_failed"}
    assert [e for e in logs if e["event"] in failures or _worker_step_failed(e["event"])] == []
    assert sum(1 for e in logs if e["event"] == "activation.dead_lettered") == len(failing)

    # Once: one tool call per webhook, one activation per agent per webhook.
    assert sorted(CALLS) == list(range(total))
    assert await count_type(log, "activation.completed") == 2 * total
    rows = await inbox_rows(log)
    intake = sorted(e for agent, e, o in rows if agent == "intake" and o == "completed")
    assert intake == sorted(accepted.values())
    assert sum(1 for agent, _, _ in rows if agent == "reviewer") == total
    for n, event_id in accepted.items():
        run = [e.event_type for e in await log.read_stream(f"run-{event_id}")]
        assert run.count("webhook.received") == 1, (n, run)
        assert run.count("test.noted") == 1, (n, run)
        assert run.count("activation.completed") == 2, (n, run)
        if n in failing:
            assert run.count("activation.dead_lettered") == 1
            assert run.count("dead_letter.redriven") == 1
    assert await streams_settled(rc)


def _worker_step_failed(event: str) -> bool:
    """``worker.ack_failed``, ``worker.adopt_failed``, ``worker.claim_renewal_failed``..."""
    return event.startswith("worker.") and event.endswith("_failed")


async def _webhooks_and_redrives(
    cluster: str,
    rc: aioredis.Redis,
    log: EventLog,
    total: int,
    failing: set[int],
    accepted: dict[int, uuid.UUID],
) -> None:
    config = make_config(partitions=PARTITIONS)
    async with ingress(cluster, config) as c:
        for n in range(total):
            body = json.dumps({"n": n, "fail": n in failing}).encode()
            r = await c.post("/webhooks/open", content=body, headers=JSON)
            assert r.status_code == 202, r.text
            assert r.json()["duplicate"] is False
            accepted[n] = uuid.UUID(r.json()["event_id"])
        # A redelivery is a duplicate (its dedupe key shares its partition's slot).
        again = await c.post("/webhooks/open", content=json.dumps({"n": 0, "fail": False}),
                             headers=JSON)  # fmt: skip
        assert again.json() == {"event_id": str(accepted[0]), "duplicate": True}
        # The ingress's stream metrics read every partition (a pipeline across nodes).
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200
        assert all(ingress_stream(p) in metrics.text for p in range(PARTITIONS))
    # The webhooks were spread over the partitions, so over the masters.
    used = {key_slot(ingress_stream(p).encode()) for p in range(PARTITIONS)
            if await rc.xlen(ingress_stream(p))}  # fmt: skip
    assert len(used) > 1
    ok = total - len(failing)
    await wait_for(lambda: completed(log, 2 * ok), 40, "every good webhook through both agents")
    await wait_for(lambda: _dead_letters(rc, len(failing)), 40, "the failing ones dead-lettered")
    await wait_for(lambda: streams_settled(rc), 20, "every group caught up, nothing pending")

    letters = await dlq.list_dead_letters(rc)
    assert sorted(letter.event_id for letter in letters) == sorted(
        str(accepted[n]) for n in failing
    )
    assert all(letter.deliveries == 3 and letter.agent == "intake" for letter in letters)
    # Fixed: each dead letter goes back to the intake and runs once.
    FIXED["intake"] = True
    for letter in letters:
        plan = await dlq.redrive(rc, log, letter.id)
        assert plan.generation == 1 and not plan.forced
    assert await rc.xlen(DLQ_STREAM) == 0
    await wait_for(lambda: completed(log, 2 * total), 40, "the redriven webhooks handled")
    await wait_for(lambda: streams_settled(rc), 20, "nothing pending after the redrives")


async def _dead_letters(rc: aioredis.Redis, n: int) -> bool:
    return int(await rc.xlen(DLQ_STREAM)) >= n


async def test_an_entry_handed_over_across_slots_is_adopted(
    rc: aioredis.Redis, log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling deploy's hand-over (XCLAIM on a partition, a note in the agent's set: two
    slots) reaches the new worker, which adopts and handles the entry; the old single-MULTI
    hand-over is refused by the cluster."""
    stream = ingress_stream(1)
    assert key_slot(stream.encode()) != key_slot(handoff_key("intake", "new").encode())
    event_id = await send(rc, WebhookReceived(source="open", payload={"n": 99}), partition=1)
    await rc.xgroup_create(stream, "intake", id="0", mkstream=True)
    [[_, [(entry, _)]]] = await rc.xreadgroup("intake", "old", {stream: ">"})
    entry_id = entry.decode()
    monkeypatch.setattr(groups, "is_cluster", lambda _: False)
    with pytest.raises(CrossSlotTransactionError):
        await groups.hand_over(rc, "intake", stream, entry_id, "new")
    monkeypatch.undo()
    CALLS.clear()
    FIXED["intake"] = True
    # A long claim_idle: only the adoption, not a reclaim, can bring the entry here.
    options = fast_options(partitions=PARTITIONS, claim_idle=60.0, drain_timeout=2.0,
                           consumer="new")  # fmt: skip
    worker = Worker([Intake()], redis=rc, log=log, options=options)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await worker.setup()
        assert await groups.hand_over(rc, "intake", stream, entry_id, "new")
        await wait_for(lambda: completed(log, 1), 20, "the handed-over entry handled")
        await wait_for(
            lambda: _no_pending(rc, stream, "intake"), 20, "the handed-over entry acknowledged"
        )
    finally:
        stop.set()
        await task
    assert CALLS == [99]
    assert [e for _, e, _ in await inbox_rows(log)] == [event_id]


async def _no_pending(rc: aioredis.Redis, stream: str, group: str) -> bool:
    return int((await rc.xpending(stream, group))["pending"]) == 0


async def test_the_relay_backfills_and_fires_timers_on_a_cluster(
    rc: aioredis.Redis, log: EventLog
) -> None:
    """A new subscription with backfill gets the history (entries, then the progress in the
    relay's slot), and a timer scheduled through a page fires once (ZADD in another slot)."""
    async with running_relay(relay_for(log, rc, OLD)) as old:
        before = await append(log, 5)
        await caught_up(log, old, before[-1], agents={"xavier": 5})
    assert "{" in old.checkpoint_key  # the relay's keys share a hash tag on a cluster
    async with running_relay(relay_for(log, rc, NEW, backfill=True, batch=2)) as new:
        after = await append(log, 3, 100)
        await caught_up(log, new, after[-1], agents={"xavier": 8, "yolanda": 8})
        timer = TimerScheduled(timer_id=uuid.uuid4(), agent="xavier", name="nudge",
                               due_at=datetime.now(UTC) - timedelta(seconds=1))  # fmt: skip
        await log.append("run-t", [NewEvent(body=timer)])
        await wait_for(lambda: _fired(log), 20, "the timer fired")
    assert await published(rc, "xavier") == before + after
    assert await published(rc, "yolanda") == before + after
    assert set((await rc.hgetall(new.subscriptions_key)).values()) == {LIVE.encode()}
    assert await rc.zcard(TIMERS_KEY) == 0
    assert await count_type(log, "timer.fired") == 1


async def _fired(log: EventLog) -> bool:
    return await count_type(log, "timer.fired") >= 1


# -- connecting -------------------------------------------------------------------------------


def test_cluster_urls_are_recognised_and_checked() -> None:
    assert cluster_url("redis+cluster://h:7000") == "redis://h:7000"
    assert cluster_url("rediss+cluster://u:p@h:7000/0") == "rediss://u:p@h:7000"
    assert cluster_url("redis://h:6379/3") is None
    with pytest.raises(SettingsError, match="only database 0"):
        cluster_url("redis+cluster://h:7000/3")
    with pytest.raises(SettingsError, match="needs a host"):
        cluster_url("redis+cluster:///0")
    settings = Settings.from_env({"REDIS_URL": "redis+cluster://h:7000"})
    assert settings.redis_url == "redis+cluster://h:7000"
    with pytest.raises(SettingsError, match=r"REDIS_URL.*only database 0"):
        Settings.from_env({"REDIS_URL": "redis+cluster://h:7000/2"})
    with pytest.raises(SettingsError, match=r"REDIS_URL.*scheme"):
        Settings.from_env({"REDIS_URL": "cluster://h:7000"})


async def test_durability_is_checked_on_every_master(rc: aioredis.Redis) -> None:
    cluster = typing.cast(Any, rc)
    primaries = cluster.get_primaries()
    assert len(primaries) == 3
    found = await check_redis_durability(rc)
    assert not found.durable
    assert found.problem is not None and "appendonly is 'no'" in found.problem
    try:
        for node in primaries:
            await cluster.config_set("appendonly", "yes", target_nodes=node)
            await cluster.config_set("appendfsync", "always", target_nodes=node)
        assert (await check_redis_durability(rc)).durable
        # One master that fsyncs less is enough to break promise 1: it is named.
        await cluster.config_set("appendfsync", "everysec", target_nodes=primaries[2])
        found = await check_redis_durability(rc)
        assert not found.durable and found.appendfsync == "everysec"
        assert found.problem == f"{primaries[2].name}: appendfsync is 'everysec', not 'always'"
    finally:
        for node in primaries:
            await cluster.config_set("appendonly", "no", target_nodes=node)


async def test_an_unreachable_cluster_gets_503_not_500() -> None:
    """No node answers: the ingress says the event store is unreachable (Retry-After)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with ingress(f"redis+cluster://127.0.0.1:{port}", make_config(partitions=2)) as c:
        r = await c.post("/webhooks/open", content=b'{"n": 1}', headers=JSON)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "redis_unavailable"
        assert r.headers["retry-after"] == "7"
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis"].startswith("unreachable")


# -- the broken variants: the old MULTIs span slots, and the cluster refuses them -----------------


async def test_a_dead_letter_multi_across_slots_is_refused(
    rc: aioredis.Redis, log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the cluster path switched off, dead_letter's MULTI (the DLQ stream and the
    entry's partition) fails on the cluster; with it, the same call succeeds."""
    stream = ingress_stream(0)
    await rc.xgroup_create(stream, "intake", id="0", mkstream=True)
    entry = await rc.xadd(stream, {"type": "x"})
    await rc.xreadgroup("intake", "c", {stream: ">"})
    entry_id = entry.decode()
    args: tuple[Any, ...] = (log, rc, "intake", stream, entry_id, {"type": "x"}, None,
                             RuntimeError("boom"), 3)  # fmt: skip
    monkeypatch.setattr(dlq, "is_cluster", lambda _: False)
    with pytest.raises(CrossSlotTransactionError):
        await dlq.dead_letter(*args)
    assert await rc.xlen(DLQ_STREAM) == 0
    monkeypatch.undo()
    assert await dlq.dead_letter(*args)
    assert await rc.xlen(DLQ_STREAM) == 1
    assert int((await rc.xpending(stream, "intake"))["pending"]) == 0


async def test_the_relays_page_multi_across_slots_is_refused(
    rc: aioredis.Redis, log: EventLog
) -> None:
    """The relay's single-Redis MULTI (the subscribers' streams and the checkpoint) fails on
    the cluster; the cluster path publishes the same page."""
    await log.append("run-x", [NewEvent(body=Noted(text="t", n=1))])
    page = await log.read_all()
    relay = Relay(log, rc, AGENTS)
    assert await rc.set(relay.lease_key, relay._token)
    relay._cluster = False  # the old path, with the cluster's (tagged) key names
    with pytest.raises(CrossSlotTransactionError):
        await relay.publish(page)
    assert await rc.xlen(agent_stream("reviewer")) == 0
    relay._cluster = True
    assert await relay.publish(page) == 1
    assert await rc.xlen(agent_stream("reviewer")) == 1
    assert (await relay.checkpoint()).position == page[-1].log_position


async def test_one_xreadgroup_over_every_stream_is_refused(
    rc: aioredis.Redis, log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker reading all of an agent's streams in one XREADGROUP (as on one Redis) stops
    with the cluster's error; the per-slot readers are what the test above ran."""
    monkeypatch.setattr(worker_mod, "slot_groups", lambda _, keys: [list(keys)])
    worker = Worker([Intake()], redis=rc, log=log, options=fast_options(partitions=PARTITIONS))
    with pytest.raises(RedisClusterException, match="same key slot"):
        await asyncio.wait_for(worker.run(asyncio.Event()), 30)


def test_the_server_itself_refuses_a_cross_slot_multi(cluster: str) -> None:
    """Not only redis-py: the node answers CROSSSLOT to a MULTI over two of its slots."""
    seed = cluster_url(cluster)
    assert seed is not None
    with redis.RedisCluster.from_url(seed) as client:
        node = client.get_node_from_key(DLQ_STREAM)
        same_node_other_slot = next(
            agent_stream(f"a{i}")
            for i in range(10_000)
            if client.get_node_from_key(agent_stream(f"a{i}")) == node
            and key_slot(agent_stream(f"a{i}").encode()) != key_slot(DLQ_STREAM.encode())
        )
    with redis.Redis(host=node.host, port=node.port) as plain:
        pipe = plain.pipeline(transaction=True)
        pipe.xadd(DLQ_STREAM, {"f": "v"})
        pipe.xadd(same_node_other_slot, {"f": "v"})
        # The server's CROSSSLOT reply, as redis-py raises it.
        with pytest.raises(ClusterCrossSlotError, match="same slot"):
            pipe.execute()
        assert plain.exists(DLQ_STREAM) == 0
