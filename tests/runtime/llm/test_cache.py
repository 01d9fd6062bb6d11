"""The response cache of model steps: exact and semantic hits recorded as cached steps with
what they saved, per-agent opt-in, the real default embedder, replay, and the savings in
the usage read model. Model calls are counted at the offline model's server."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import asyncpg
import numpy as np
import pytest
import redis.asyncio as aioredis

from projections.builtin.usage import UsageProjection
from projections.engine import Projector
from projections.queries import ReadModels
from projections.replay import replay_run
from runtime import Agent, Cache, StepRef, WordLlamaEmbedder, tool
from runtime.agents.context import Context, Trigger
from runtime.cli.listing import describe_agent
from runtime.effects.breaker import CircuitBreaker
from runtime.effects.steps import Steps
from runtime.errors import StepFailed
from runtime.events.builtin import StepRecorded
from runtime.events.ids import activation_stream
from runtime.events.model import Event
from runtime.llm import cache as cache_mod
from runtime.llm import embed as embed_mod
from runtime.llm.cache import rebuild_index
from runtime.llm.calls import LLM
from runtime.llm.embed import unit_vectors
from runtime.llm.offline import OfflineServer
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support import REPO
from tests.support.apps import mailpair as demo
from tests.support.runtime import count_type, running, send, wait_for
from webhooks.events import Address, EmailReceived

QUESTION = "What is the refund policy for late orders?"
#: The same question, cased and punctuated differently: cosine 0.94 with the default model.
NEAR = "what is the refund policy for late orders"
#: Another question: cosine 0.85 with QUESTION, below the threshold.
OTHER = "What is the refund policy for late shipments?"
THRESHOLD = 0.92


class Asked(Event, tag="test.cache.asked"):
    text: str = ""


class Plain(Agent):
    """No cache: every call asks the model."""

    name = "plain"
    subscribes = (Asked,)
    system = "You answer customer questions briefly."

    async def handle(self, event: Asked, ctx: Context) -> None:
        await ctx.llm(event.text)


class Exact(Plain):
    name = "exact"
    cache = Cache(exact=True)


class Semantic(Plain):
    name = "semantic"
    cache = Cache(exact=True, semantic=THRESHOLD)


class ExactToo(Exact):
    """Another agent with the same cache, prompt and model: entries are per agent."""

    name = "exact-too"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[OfflineServer]:
    with OfflineServer() as s:
        yield s


@pytest.fixture
def offline(server: OfflineServer) -> OfflineServer:
    server.faults.clear()
    server.requests.clear()
    return server


def model_calls(server: OfflineServer) -> int:
    return sum(1 for r in server.requests.all() if r.path == "/v1/messages")


class Harness:
    """Contexts over one log, as a worker makes them (``Services``: the model layer only)."""

    def __init__(self, log: EventLog, llm: LLM, redis: aioredis.Redis) -> None:
        self.log = log
        self.llm = llm
        self.redis = redis
        self.prefix = uuid.uuid4().hex[:8]  # breakers of this test only

    def breaker(self, name: str) -> CircuitBreaker:
        return CircuitBreaker(self.redis, f"{self.prefix}-{name}")

    async def record_transition(self, transition: Any, *, run_id: uuid.UUID | None) -> None:
        pass

    async def context(self, a: Agent, activation_id: uuid.UUID | None = None) -> Context:
        """A new activation (or, with its id, a retry of one: its steps from the log)."""
        activation_id = activation_id or uuid.uuid4()
        run_id = uuid.uuid5(activation_id, "run")
        trigger_id = uuid.uuid5(activation_id, "trigger")
        steps = await Steps.load(self.log, activation_id=activation_id, run_id=run_id,
                                 agent=a.name, trigger_id=trigger_id)  # fmt: skip
        trigger = Trigger(event_id=trigger_id, type="test.cache.asked", run_id=run_id,
                          causation_id=None, producer=None, body=Asked(), stream="s",
                          entry_id="0-1")  # fmt: skip
        return Context(agent=a, trigger=trigger, activation_id=activation_id, steps=steps,
                       services=self, history=[])  # fmt: skip

    async def step(self, ctx: Context, n: int = 1) -> StepRecorded:
        page = await self.log.read_stream(activation_stream(ctx.activation_id), n, limit=1)
        assert page and isinstance(page[0].body, StepRecorded)
        return page[0].body

    async def ask(self, a: Agent, text: str, **options: Any) -> tuple[Context, StepRecorded]:
        ctx = await self.context(a)
        await ctx.llm(text, **options)
        return ctx, await self.step(ctx)


@pytest.fixture
async def client(offline: OfflineServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(
        base_url=offline.base_url, api_key="offline", max_retries=0, timeout=10.0
    )
    yield c
    await c.close()


@pytest.fixture
def harness(
    log: EventLog, settings: Settings, client: anthropic.AsyncAnthropic, redis: aioredis.Redis
) -> Harness:
    # Priced as an online model would be (offline=False), so a hit saves real dollars.
    return Harness(log, LLM(client, settings, offline=False), redis)


async def index_rows(log: EventLog, agent: str) -> int:
    q = f'"{log.schema}".response_cache'
    return int(await log.pool.fetchval(f"SELECT count(*) FROM {q} WHERE agent = $1", agent))


# -- exact -----------------------------------------------------------------------------------


async def test_an_exact_repeat_is_answered_from_the_record_with_its_saving(
    harness: Harness, offline: OfflineServer
) -> None:
    first_ctx, first = await harness.ask(Exact(), QUESTION)
    assert model_calls(offline) == 1
    assert first.cached_from is None and first.saved is None
    assert first.usage is not None and first.usage.cost_usd > 0

    ctx = await harness.context(Exact())
    result = await ctx.llm(QUESTION)
    assert model_calls(offline) == 1  # no model call
    hit = await harness.step(ctx)
    assert hit.cached_from == StepRef(activation_id=first_ctx.activation_id, step=1)
    assert hit.saved == first.usage  # what the call it repeats cost
    assert hit.usage is None  # and this one cost nothing
    assert hit.result == first.result
    assert hit.request_hash == first.request_hash
    assert result.cached == (1,)
    assert result.text == first.result["content"][0]["text"]
    assert result.usage.cost_usd == 0.0 and result.usage.input_tokens == 0

    # A retry of the hit's activation takes the hit back from the record: no lookup
    # result can change it, no model is called.
    again = await harness.context(Exact(), ctx.activation_id)
    assert (await again.llm(QUESTION)).text == result.text
    assert again.steps.reused == 1
    assert model_calls(offline) == 1
    assert await index_rows(harness.log, "exact") == 1  # a hit adds no entry


async def test_what_differs_in_system_model_tools_or_options_misses(
    harness: Harness, offline: OfflineServer
) -> None:
    await harness.ask(Exact(), QUESTION)
    variants: list[dict[str, Any]] = [
        {"system": "You answer in French."},
        {"tier": "smart"},
        {"max_tokens": 77},
        {"stop_sequences": ["END"]},
    ]
    for options in variants:
        _, step = await harness.ask(Exact(), QUESTION, **options)
        assert step.cached_from is None, options
    assert model_calls(offline) == 1 + len(variants)
    # Each of them is now an entry of its own: asked again, each hits.
    for options in variants:
        _, step = await harness.ask(Exact(), QUESTION, **options)
        assert step.cached_from is not None, options
    assert model_calls(offline) == 1 + len(variants)


async def system_prompt_separates(harness: Harness, offline: OfflineServer) -> bool:
    """Whether a request differing only in its system prompt is sent to the model."""
    await harness.ask(Exact(), QUESTION)
    before = model_calls(offline)
    _, step = await harness.ask(Exact(), QUESTION, system="Answer as a pirate would.")
    return step.cached_from is None and model_calls(offline) == before + 1


async def test_the_system_prompt_is_part_of_the_key(
    harness: Harness, offline: OfflineServer
) -> None:
    assert await system_prompt_separates(harness, offline)


async def test_a_cache_keyed_without_the_system_prompt_is_caught(
    harness: Harness, offline: OfflineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKEN on purpose: the key leaves the system prompt out; the check above fails."""
    right = cache_mod.exact_key

    def without_system(request: Any) -> str:
        return right({k: v for k, v in request.items() if k != "system"})

    monkeypatch.setattr(cache_mod, "exact_key", without_system)
    assert not await system_prompt_separates(harness, offline)


class Expiring(Plain):
    name = "expiring"
    cache = Cache(ttl=60)


async def test_an_expired_entry_is_passed_over_and_replaced(
    harness: Harness, offline: OfflineServer, admin: asyncpg.Connection
) -> None:
    await harness.ask(Expiring(), QUESTION)
    _, step = await harness.ask(Expiring(), QUESTION)
    assert step.cached_from is not None and model_calls(offline) == 1
    table = f'"{harness.log.schema}".response_cache'
    await admin.execute(f"UPDATE {table} SET created_at = now() - interval '2 min'")
    fresh_ctx, step = await harness.ask(Expiring(), QUESTION)
    assert step.cached_from is None and model_calls(offline) == 2
    _, step = await harness.ask(Expiring(), QUESTION)
    assert step.cached_from == StepRef(activation_id=fresh_ctx.activation_id, step=1)
    assert model_calls(offline) == 2 and await index_rows(harness.log, "expiring") == 1


async def test_the_index_is_rebuilt_from_the_log(
    harness: Harness, offline: OfflineServer, admin: asyncpg.Connection, settings: Settings
) -> None:
    for a in (Exact(), Exact(), Semantic(), Plain()):
        await harness.ask(a, QUESTION)
    calls = model_calls(offline)
    assert calls == 3  # the second Exact() was a hit
    table = f'"{harness.log.schema}".response_cache'
    await admin.execute(f"DELETE FROM {table}")  # the index is lost (the log is not)

    assert await rebuild_index(harness.log, [Exact(), Semantic(), Plain()]) == 2
    assert [await index_rows(harness.log, n) for n in ("exact", "semantic", "plain")] == [1, 1, 0]
    _, step = await harness.ask(Exact(), QUESTION)
    assert step.cached_from is not None
    _, step = await harness.ask(Semantic(), NEAR)  # the embedding was made again
    assert step.cached_from is not None
    assert model_calls(offline) == calls

    await admin.execute(f"DELETE FROM {table}")
    done = subprocess.run(
        [sys.executable, "-m", "runtime", "cache", "rebuild", "--app", f"{__name__}:Exact"],
        env={**os.environ, "DATABASE_URL": settings.require_database_url(),
             "AGENTRT_DB_SCHEMA": settings.db_schema},
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "indexed 1 recorded answers of exact" in done.stdout
    assert await index_rows(harness.log, "exact") == 1


# -- per agent -------------------------------------------------------------------------------


async def test_an_agent_without_a_cache_never_hits_nor_feeds_one(
    harness: Harness, offline: OfflineServer
) -> None:
    for _ in range(2):
        _, step = await harness.ask(Plain(), QUESTION)
        assert step.cached_from is None
    assert model_calls(offline) == 2
    assert await index_rows(harness.log, "plain") == 0
    # An agent with a cache is not answered by another agent's entries either.
    await harness.ask(Exact(), QUESTION)
    _, step = await harness.ask(ExactToo(), QUESTION)
    assert step.cached_from is None
    assert model_calls(offline) == 4
    _, step = await harness.ask(ExactToo(), QUESTION)
    assert step.cached_from is not None and model_calls(offline) == 4


async def test_a_failed_call_is_not_cached(harness: Harness, offline: OfflineServer) -> None:
    ctx = await harness.context(Exact())
    with pytest.raises(StepFailed, match="max_tokens"):
        await ctx.llm(QUESTION, max_tokens=0)  # the offline model refuses it (a 400)
    assert (await harness.step(ctx)).error is not None
    assert await index_rows(harness.log, "exact") == 0


# -- semantic, with the real default embedder ------------------------------------------------


def cosine(a: str, b: str) -> float:
    va, vb = unit_vectors(WordLlamaEmbedder().embed([a, b]), 2)
    assert va is not None and vb is not None
    return float(va @ vb)


def test_the_default_embedder_is_a_real_model_that_separates_meanings() -> None:
    assert cosine(QUESTION, NEAR) >= THRESHOLD
    assert cosine(QUESTION, OTHER) < THRESHOLD
    assert cosine(QUESTION, "Write a poem about the sea") < 0.3
    vectors = np.asarray(WordLlamaEmbedder().embed([QUESTION, OTHER]))
    assert vectors.shape == (2, 256) and np.isfinite(vectors).all()


def test_the_default_embedder_loads_from_its_wheel_without_network(tmp_path: Any) -> None:
    """No download at run time: with every socket refused and no cache directory, it works."""
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('network is off in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from runtime import WordLlamaEmbedder\n"
        "v = WordLlamaEmbedder().embed(['refund policy', 'late orders'])\n"
        "print(v.shape)\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 256)"
    assert not any(tmp_path.iterdir())  # nothing cached or downloaded


async def near_and_far(harness: Harness, offline: OfflineServer) -> tuple[bool, bool]:
    """(the near question was answered from the cache, the other question was too)."""
    first_ctx, _ = await harness.ask(Semantic(), QUESTION)
    calls = model_calls(offline)
    _, near = await harness.ask(Semantic(), NEAR)
    near_hit = near.cached_from == StepRef(activation_id=first_ctx.activation_id, step=1)
    assert near_hit == (model_calls(offline) == calls)
    calls = model_calls(offline)
    _, far = await harness.ask(Semantic(), OTHER)
    far_hit = far.cached_from is not None
    assert far_hit == (model_calls(offline) == calls)
    return near_hit, far_hit


async def test_a_semantic_hit_above_the_threshold_and_a_miss_below(
    harness: Harness, offline: OfflineServer
) -> None:
    assert await near_and_far(harness, offline) == (True, False)
    [hit] = [
        e.body
        for e in await harness.log.read_all(limit=1000)
        if isinstance(e.body, StepRecorded) and e.body.cached_from is not None
    ]
    assert hit.request["messages"][0]["content"] == NEAR  # its own request is recorded
    original = await harness.step(await harness.context(Semantic(), hit.cached_from.activation_id))
    assert hit.request_hash != original.request_hash and hit.result == original.result
    assert hit.saved == original.usage


async def test_a_cache_that_ignores_the_threshold_is_caught(
    harness: Harness, offline: OfflineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKEN on purpose: the nearest entry wins whatever its similarity."""
    right = embed_mod.best_match

    def any_nearest(probe: Any, candidates: Any, threshold: float) -> Any:
        return right(probe, candidates, -1.0)

    monkeypatch.setattr(embed_mod, "best_match", any_nearest)
    assert await near_and_far(harness, offline) == (True, True)


async def test_a_semantic_match_needs_the_same_system_prompt(
    harness: Harness, offline: OfflineServer
) -> None:
    await harness.ask(Semantic(), QUESTION)
    _, step = await harness.ask(Semantic(), NEAR, system="You answer in French.")
    assert step.cached_from is None and model_calls(offline) == 2


LOOKUPS: list[int] = []


@tool
async def lookup_order(order_id: int, email: str) -> str:
    """Look up a customer order by its id and the customer's email."""
    LOOKUPS.append(order_id)
    return f"order {order_id}: shipped"


class Clerk(Plain):
    name = "clerk"
    tools = (lookup_order,)
    cache = Cache(semantic=THRESHOLD)


async def orders_looked_up(harness: Harness) -> tuple[list[int], list[bool]]:
    """Two requests a digit apart (cosine 0.97), each through the tool loop: the orders
    the tool looked up, and whether each answer is about the order asked for."""
    LOOKUPS.clear()
    right = []
    for order in (42, 43):
        ctx = await harness.context(Clerk())
        result = await ctx.llm(f"Look up order {order} for email ann@example.com")
        assert "shipped" in result.text
        right.append(f"order {order}:" in result.text)
    return list(LOOKUPS), right


async def test_tool_calls_and_results_are_never_matched_by_meaning(
    harness: Harness, offline: OfflineServer
) -> None:
    assert await orders_looked_up(harness) == ([42, 43], [True, True])
    assert model_calls(offline) == 4  # each: the tool call, then the answer
    # Identical requests are still answered from the cache, tool calls included (the
    # tools run again: only model steps are cached).
    assert await orders_looked_up(harness) == ([42, 43], [True, True])
    assert model_calls(offline) == 4


async def test_a_cache_giving_tool_calls_to_near_requests_is_caught(
    harness: Harness, offline: OfflineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKEN on purpose: tool calls are semantic answers too; order 43 looks up 42."""
    monkeypatch.setattr(cache_mod, "semantic_answer", lambda result: True)
    assert (await orders_looked_up(harness))[0] == [42, 42]


async def test_a_cache_matching_tool_results_by_meaning_is_caught(
    harness: Harness, offline: OfflineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKEN on purpose: conversations with tool results are matched by meaning; the
    answer about order 42's result is given to order 43's."""
    monkeypatch.setattr(cache_mod, "semantic_request", lambda request: True)
    assert await orders_looked_up(harness) == ([42, 43], [True, False])


def test_agentrt_agents_shows_the_cache() -> None:
    assert describe_agent(Plain())["cache"] is None
    assert describe_agent(Semantic())["cache"] == {
        "exact": True, "semantic": THRESHOLD, "recent": 1000, "ttl": None,
        "embedder": "wordllama/l2_supercat_256",
    }  # fmt: skip


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"semantic": 1.5}, ValueError, r"cosine similarity in \(0, 1\]"),
        ({"semantic": 0}, ValueError, r"cosine similarity in \(0, 1\]"),
        ({"semantic": True}, TypeError, "takes a similarity threshold"),
        ({"semantic": "high"}, TypeError, "takes a similarity threshold"),
        ({"exact": False}, ValueError, "needs a semantic threshold"),
        ({"semantic": 0.9, "recent": 0}, ValueError, "at least one entry"),
        ({"ttl": 0}, ValueError, "positive number of seconds"),
        ({"ttl": float("nan")}, ValueError, "positive number of seconds"),
    ],
)
def test_a_bad_cache_is_refused_when_the_agent_is_defined(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Cache(**options)


class Broken:
    name = "broken/1"

    def embed(self, texts: Any) -> Any:
        return [[1.0, 0.0]]  # one vector, whatever it is given


def test_an_embedder_returning_the_wrong_shape_is_named() -> None:
    with pytest.raises(ValueError, match=r"must return 2 vectors as an \(n, d\) array"):
        unit_vectors(Broken().embed(["a", "b"]), 2)
    [zero] = unit_vectors([[0.0, 0.0]], 1)
    assert zero is None  # a zero vector is never similar to anything


async def test_a_custom_embedder_is_used_and_kept_apart_by_name(
    harness: Harness, offline: OfflineServer
) -> None:
    class Letters:
        """A toy embedder: counts of a few letters (a real protocol user, not a stub)."""

        name = "letters/v1"

        def embed(self, texts: Any) -> Any:
            return [[t.lower().count(c) + 0.01 for c in "aeiou"] for t in texts]

    class Custom(Plain):
        name = "custom"
        cache = Cache(exact=False, semantic=0.999, embedder=Letters())

    await harness.ask(Custom(), "Where is my parcel?")
    _, step = await harness.ask(Custom(), "WHERE IS MY PARCEL")
    assert step.cached_from is not None and model_calls(offline) == 1
    row = await harness.log.pool.fetchrow(
        f'SELECT embedder, length(embedding) FROM "{harness.log.schema}".response_cache'
    )
    assert tuple(row) == ("letters/v1", 5 * 4)  # five float32


# -- the usage read model --------------------------------------------------------------------


async def test_the_usage_read_model_shows_cached_calls_and_savings(
    harness: Harness, offline: OfflineServer, settings: Settings
) -> None:
    _, first = await harness.ask(Exact(), QUESTION)
    for _ in range(2):
        await harness.ask(Exact(), QUESTION)
    await harness.ask(Plain(), QUESTION)
    assert model_calls(offline) == 2
    await Projector(harness.log, [UsageProjection()], settings).catch_up()
    rows = {r.agent: r for r in await ReadModels(harness.log.pool, settings).usage(
        group_by=("agent",))}  # fmt: skip
    assert first.usage is not None
    exact, plain = rows["exact"], rows["plain"]
    assert (exact.calls, exact.cached_calls) == (1, 2)
    assert exact.input_tokens == first.usage.input_tokens  # the one real call's
    assert exact.saved_tokens == 2 * first.usage.tokens
    assert exact.saved_cost_usd == pytest.approx(2 * first.usage.cost_usd)
    assert exact.saved_cost_usd > 0
    assert (plain.calls, plain.cached_calls, plain.saved_tokens) == (1, 0, 0)


# -- replay ----------------------------------------------------------------------------------


class CachedTriage(demo.Triage):
    cache = Cache(exact=True)


class CachedResponder(demo.Responder):
    cache = Cache(exact=True, semantic=THRESHOLD)


def email(n: int) -> EmailReceived:
    return EmailReceived(
        source="test",
        provider="test",
        message_id=f"<cache-{n}@example.com>",
        sender=Address(email="ada@example.com"),
        subject="Invoice 1042 charged twice?",
        text="Hi, my card was charged twice for invoice 1042. Refund one?",
    )


async def test_a_run_answered_from_the_cache_replays_identically_calling_nothing(
    redis: aioredis.Redis,
    log: EventLog,
    settings: Settings,
    client: anthropic.AsyncAnthropic,
    offline: OfflineServer,
) -> None:
    """Real workers: the second email's model steps are cache hits; both runs replay."""
    agents = [CachedTriage(), CachedResponder()]
    llm = LLM(client, settings, offline=True)
    runs = []
    async with running(agents, redis, log, llm=llm):
        for n in range(2):
            runs.append(await send(redis, email(n)))

            async def done(want: int = 2 * (n + 1)) -> bool:
                return await count_type(log, "activation.completed") >= want

            await wait_for(done, seconds=60, what=f"run {n + 1} completed")
    assert model_calls(offline) == 2  # triage and responder, once each
    steps = [
        e.body for r in runs for e in await log.read_run(r) if isinstance(e.body, StepRecorded)
    ]
    llm_steps = [s for s in steps if s.kind == "llm"]
    assert [s.cached_from is not None for s in llm_steps] == [False, False, True, True]
    assert all(s.saved is not None and s.saved.offline for s in llm_steps[2:])

    size = await log.pool.fetchval(f'SELECT count(*) FROM "{log.schema}".events')
    for app in (agents, demo.agents):  # with or without the cache: the record answers
        for run_id in runs:
            report = await replay_run(log, app, run_id, settings=settings)
            assert report.identical, report
    assert model_calls(offline) == 2
    assert await log.pool.fetchval(f'SELECT count(*) FROM "{log.schema}".events') == size
