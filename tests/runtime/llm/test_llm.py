"""The model layer via the real SDK against the offline model: steps, tools, retries, budgets."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anthropic
import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from runtime.agents.agent import Agent
from runtime.agents.context import Context, Trigger
from runtime.effects.breaker import CircuitBreaker, Transition
from runtime.effects.budget import Budget
from runtime.effects.retry import RetryPolicy
from runtime.effects.steps import Steps
from runtime.effects.tools import tool
from runtime.errors import BudgetExceeded, OutputInvalid, StepDivergence, StepFailed
from runtime.events.builtin import RunBudgetExceeded, StepRecorded
from runtime.events.ids import activation_stream
from runtime.events.model import Event
from runtime.events.values import Usage
from runtime.llm.calls import LLM, SUMMARY_LABEL, KeepRecent, LLMResult, Summarize, output_schema
from runtime.llm.client import model_client, model_for
from runtime.llm.offline import Fault, OfflineServer
from runtime.llm.prices import cost_usd, price_for, usage_of
from runtime.llm.tokens import message_tokens
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.servers import Servers

FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01, max_retry_after=0.3)


class Asked(Event, tag="test.llm.asked"):
    text: str = ""


class Order(msgspec.Struct):
    order_id: int
    status: str


CALLS: list[int] = []


@tool
async def lookup_order(order_id: int, email: str) -> Order:
    """Look up a customer order by its id and the customer's email."""
    CALLS.append(order_id)
    return Order(order_id=order_id, status="shipped")


@tool
async def cancel_order(order_id: int) -> Order:
    """Cancel a customer order by its id."""
    raise RuntimeError(f"order {order_id} cannot be cancelled")


class Helper(Agent):
    name = "helper"
    subscribes = (Asked,)
    tier = "fast"
    tools = (lookup_order, cancel_order)


class Verdict(msgspec.Struct, forbid_unknown_fields=True):
    label: str
    score: int

    def __post_init__(self) -> None:
        if self.label != self.label.upper():
            raise ValueError("want label: URGENT or another upper-case word")


class Never(msgspec.Struct):
    label: str

    def __post_init__(self) -> None:
        raise ValueError("no label is ever right")


def agent(**attrs: Any) -> Agent:
    """A Helper with some class attributes replaced."""
    return type("Custom", (Helper,), attrs)()


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[OfflineServer]:
    with OfflineServer() as s:
        yield s


@pytest.fixture
def offline(server: OfflineServer) -> OfflineServer:
    server.faults.clear()
    server.requests.clear()
    CALLS.clear()
    return server


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(servers.redis_url)
    yield client
    await client.aclose()


class Harness:
    """What a worker gives a context (``Services``), and contexts over one log."""

    def __init__(
        self,
        log: EventLog,
        redis: aioredis.Redis,
        settings: Settings,
        client: anthropic.AsyncAnthropic,
        *,
        offline: bool = True,
    ) -> None:
        self.log = log
        self.redis = redis
        self.settings = settings
        self.client = client
        self.prefix = uuid.uuid4().hex[:8]  # breakers of this test only
        self.llm = LLM(client, settings, policy=FAST, offline=offline)

    def breaker(self, name: str) -> CircuitBreaker:
        return CircuitBreaker(self.redis, f"{self.prefix}-{name}")

    async def record_transition(self, transition: Transition, *, run_id: uuid.UUID | None) -> None:
        pass

    async def context(
        self,
        a: Agent | None = None,
        *,
        activation_id: uuid.UUID | None = None,
        spent: tuple[int, float] = (0, 0.0),
    ) -> Context:
        """A fresh activation, or (same ``activation_id``) a retry of one, steps from the log."""
        a = a or Helper()
        activation_id = activation_id or uuid.uuid4()
        run_id = uuid.uuid5(activation_id, "run")
        trigger_id = uuid.uuid5(activation_id, "trigger")
        steps = await Steps.load(
            self.log,
            activation_id=activation_id,
            run_id=run_id,
            agent=a.name,
            trigger_id=trigger_id,
        )
        trigger = Trigger(
            event_id=trigger_id,
            type="test.llm.asked",
            run_id=run_id,
            causation_id=None,
            producer=None,
            body=Asked(text="hi"),
            stream="s",
            entry_id="0-1",
        )
        return Context(
            agent=a,
            trigger=trigger,
            activation_id=activation_id,
            steps=steps,
            services=self,
            history=[],
            spent=spent,
        )

    async def recorded(self, ctx: Context) -> list[StepRecorded]:
        events = await self.log.read_stream(activation_stream(ctx.activation_id))
        return [e.body for e in events if isinstance(e.body, StepRecorded)]


@pytest.fixture
async def harness(
    log: EventLog, redis: aioredis.Redis, settings: Settings, offline: OfflineServer
) -> AsyncIterator[Harness]:
    client = anthropic.AsyncAnthropic(
        base_url=offline.base_url, api_key="offline", max_retries=0, timeout=5.0
    )
    yield Harness(log, redis, settings, client)
    await client.close()


def llm_requests(server: OfflineServer) -> int:
    return sum(1 for r in server.requests.all() if r.path == "/v1/messages")


# -- the client ----------------------------------------------------------------------------


async def test_without_a_key_the_client_runs_against_a_local_offline_model() -> None:
    settings = Settings.from_env({})
    with capture_logs() as logs:
        async with model_client(settings) as mc:
            assert mc.offline
            assert mc.server is not None
            assert mc.client.max_retries == 0
            message = await mc.client.messages.create(
                model="claude-haiku-4-5",
                max_tokens=50,
                messages=[{"role": "user", "content": "hi"}],
            )
            assert message.id.startswith("msg_offline_")
            server = mc.server
        await mc.aclose()  # idempotent
    assert server._thread is None  # stopped with the client
    assert any(e["event"] == "llm.client" and e["mode"] == "offline" for e in logs)


async def test_with_a_key_the_client_is_the_real_one_without_sdk_retries() -> None:
    settings = Settings.from_env({"ANTHROPIC_API_KEY": "sk-test", "AGENTRT_LLM_TIMEOUT": "9"})
    async with model_client(settings) as mc:
        assert not mc.offline
        assert mc.server is None
        assert mc.client.max_retries == 0
        assert mc.client.timeout == 9.0
        assert "api.anthropic.com" in str(mc.client.base_url)


# -- a plain call, usage and replay ----------------------------------------------------------


async def test_a_call_is_one_recorded_step_with_offline_usage(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=()))
    result = await harness.llm.call(ctx, "Summarize the quarterly report please")
    assert isinstance(result, LLMResult)
    assert result.text.startswith("[offline] ")
    assert result.offline
    assert result.steps == (1,)
    assert result.stop_reason == "end_turn"
    assert result.usage.input_tokens > 0
    assert result.usage.cost_usd == 0.0
    assert llm_requests(offline) == 1
    [step] = await harness.recorded(ctx)
    assert (step.kind, step.name) == ("llm", "claude-haiku-4-5")
    assert step.request["messages"] == [
        {"role": "user", "content": "Summarize the quarterly report please"}
    ]
    assert step.usage is not None
    assert step.usage.offline
    assert step.usage.cost_usd == 0.0
    assert step.result["id"].startswith("msg_offline_")


async def test_tier_system_and_model_choose_the_request(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=(), tier="smart", system="You are terse."))
    await harness.llm.call(ctx, "hello")
    await harness.llm.call(ctx, "hello", tier="fast", system="Other.")
    await harness.llm.call(ctx, "hello", model="claude-opus-5-5")
    bodies = [r.body for r in offline.requests.all()]
    assert [b["model"] for b in bodies] == [
        "claude-sonnet-5-5",
        "claude-haiku-4-5",
        "claude-opus-5-5",
    ]
    assert [b.get("system") for b in bodies] == ["You are terse.", "Other.", "You are terse."]
    with pytest.raises(Exception, match="AGENTRT_MODELS"):
        await harness.llm.call(ctx, "hello", tier="huge")


async def test_a_retried_activation_reuses_recorded_steps_without_requests(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context()
    first = await harness.llm.call(ctx, "Where is order 42 for email ann@example.com?")
    n = llm_requests(offline)
    assert n == 2
    assert CALLS == [42]

    retry = await harness.context(activation_id=ctx.activation_id)
    again = await harness.llm.call(retry, "Where is order 42 for email ann@example.com?")
    assert llm_requests(offline) == n
    assert CALLS == [42]  # the tool did not run again
    assert retry.steps.reused == 3
    assert again.text == first.text
    assert again.steps == first.steps


async def test_a_changed_prompt_on_retry_is_a_divergence(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=()))
    await harness.llm.call(ctx, "first prompt")
    retry = await harness.context(agent(tools=()), activation_id=ctx.activation_id)
    with pytest.raises(StepDivergence, match="step 1"):
        await harness.llm.call(retry, "a different prompt")
    assert llm_requests(offline) == 1


# -- tools ------------------------------------------------------------------------------------


async def test_tool_use_round_trip(harness: Harness, offline: OfflineServer) -> None:
    ctx = await harness.context()
    result = await harness.llm.call(ctx, "Look up order 42 for email ann@example.com")
    assert CALLS == [42]
    assert result.steps == (1, 2, 3)
    assert "shipped" in result.text
    assert result.text.startswith("[offline] Based on the lookup_order result")
    kinds = [(s.kind, s.name) for s in await harness.recorded(ctx)]
    assert kinds == [
        ("llm", "claude-haiku-4-5"),
        ("tool", "lookup_order"),
        ("llm", "claude-haiku-4-5"),
    ]
    steps = await harness.recorded(ctx)
    assert steps[1].request == {"order_id": 42, "email": "ann@example.com"}
    last_user = steps[2].request["messages"][-1]
    [block] = last_user["content"]
    assert block["type"] == "tool_result"
    assert "shipped" in block["content"]
    assert "is_error" not in block
    assert result.usage.input_tokens == sum(s.usage.input_tokens for s in steps if s.usage)
    assert [m["role"] for m in result.messages] == ["user", "assistant", "user", "assistant"]


async def test_malformed_tool_input_is_fed_back_and_the_model_corrects_it(
    harness: Harness, offline: OfflineServer
) -> None:
    offline.faults.push(Fault("malformed_tool_input"))
    ctx = await harness.context()
    result = await harness.llm.call(ctx, "Look up order 42 for email ann@example.com")
    assert CALLS == [42]  # the bad input never reached the tool
    steps = await harness.recorded(ctx)
    assert [s.kind for s in steps] == ["llm", "llm", "tool", "llm"]
    [error] = steps[1].request["messages"][-1]["content"]
    assert error["is_error"] is True
    assert "lookup_order" in error["content"]
    assert "Call lookup_order again" in error["content"]
    assert "shipped" in result.text


async def test_a_failing_tool_becomes_an_error_result(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=(cancel_order,)))
    result = await harness.llm.call(ctx, "Cancel order 7", max_turns=2)
    steps = await harness.recorded(ctx)
    assert [s.kind for s in steps] == ["llm", "tool", "llm"]
    assert steps[1].error is not None
    [block] = steps[2].request["messages"][-1]["content"]
    assert block["is_error"] is True
    assert "cannot be cancelled" in block["content"]
    # the offline model reflects by calling the tool again; max_turns stops the loop
    assert result.stop_reason == "tool_use"


# -- structured output and reflection ---------------------------------------------------------


async def test_structured_output_is_requested_and_decoded(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=()))
    result = await harness.llm.call(ctx, "Triage: label is HIGH, score is 3", output=Verdict)
    assert result.output == Verdict(label="HIGH", score=3)
    [request] = offline.requests.all()
    fmt = request.body["output_config"]["format"]
    assert fmt["type"] == "json_schema"
    assert fmt["schema"] == output_schema(Verdict)
    assert fmt["schema"]["$defs"]["Verdict"]["additionalProperties"] is False


async def test_invalid_output_is_reflected_back_until_it_validates(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=()))
    result = await harness.llm.call(ctx, "Triage: label is low, score is 2", output=Verdict)
    assert result.output is not None
    assert result.output.label == "URGENT"  # what the fed-back error asked for
    steps = await harness.recorded(ctx)
    assert len(steps) == 2
    messages = steps[1].request["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert '"label":"low"' in messages[1]["content"][0]["text"]
    assert "want label: URGENT or another upper-case word" in messages[2]["content"]


async def test_output_that_never_validates_raises_after_the_reflections(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=()))
    with pytest.raises(OutputInvalid, match="no label is ever right") as info:
        await harness.llm.call(ctx, "label it", output=Never, reflections=2)
    assert info.value.attempts == 3
    assert llm_requests(offline) == 3


# -- retries -----------------------------------------------------------------------------------


async def test_rate_limit_is_retried_after_retry_after_and_recorded(
    harness: Harness, offline: OfflineServer
) -> None:
    offline.faults.push(Fault("rate_limit", retry_after=0.2))
    ctx = await harness.context(agent(tools=()))
    started = time.monotonic()
    result = await harness.llm.call(ctx, "hello")
    assert time.monotonic() - started >= 0.2
    assert result.text.startswith("[offline]")
    [step] = await harness.recorded(ctx)
    [attempt] = step.attempts
    assert (attempt.attempt, attempt.reason, attempt.error_type) == (
        1,
        "rate_limited",
        "RateLimitError",
    )
    assert attempt.retry_after == 0.2
    assert attempt.delay is not None
    assert attempt.delay >= 0.2
    assert llm_requests(offline) == 2


async def test_a_long_retry_after_is_capped_by_the_policy(
    harness: Harness, offline: OfflineServer
) -> None:
    offline.faults.push(Fault("rate_limit", retry_after=30))
    ctx = await harness.context(agent(tools=()))
    started = time.monotonic()
    await harness.llm.call(ctx, "hello")
    assert time.monotonic() - started < 5
    [step] = await harness.recorded(ctx)
    assert step.attempts[0].retry_after == 30
    assert step.attempts[0].delay == pytest.approx(FAST.max_retry_after)


@pytest.mark.parametrize(
    ("kind", "reason", "error_type"),
    [
        ("overloaded", "overloaded", "OverloadedError"),
        ("server_error", "server_error", "InternalServerError"),
    ],
)
async def test_overload_and_server_errors_are_retried(
    harness: Harness, offline: OfflineServer, kind: str, reason: str, error_type: str
) -> None:
    offline.faults.push(Fault(kind), Fault(kind))  # type: ignore[arg-type]
    ctx = await harness.context(agent(tools=()))
    await harness.llm.call(ctx, "hello")
    [step] = await harness.recorded(ctx)
    assert [(a.attempt, a.reason, a.error_type) for a in step.attempts] == [
        (1, reason, error_type),
        (2, reason, error_type),
    ]
    assert step.error is None
    assert llm_requests(offline) == 3


async def test_a_timeout_is_retried(
    log: EventLog, redis: aioredis.Redis, settings: Settings, offline: OfflineServer
) -> None:
    quick = dataclasses.replace(settings, llm_timeout=0.3)
    async with anthropic.AsyncAnthropic(
        base_url=offline.base_url, api_key="offline", max_retries=0, timeout=quick.llm_timeout
    ) as client:
        h = Harness(log, redis, quick, client)
        offline.faults.push(Fault("slow", seconds=3))
        ctx = await h.context(agent(tools=()))
        await h.llm.call(ctx, "hello")
        [step] = await h.recorded(ctx)
    assert [(a.reason, a.error_type) for a in step.attempts] == [("timeout", "APITimeoutError")]


async def test_exhausted_retries_are_recorded_and_raised_again_without_calling(
    harness: Harness, offline: OfflineServer
) -> None:
    offline.faults.push(*[Fault("server_error")] * 3)
    ctx = await harness.context(agent(tools=()))
    with pytest.raises(StepFailed, match="RetriesExhausted") as info:
        await harness.llm.call(ctx, "hello")
    assert info.value.error_code == "retries_exhausted"
    [step] = await harness.recorded(ctx)
    assert step.error is not None
    assert len(step.attempts) == 3
    assert step.attempts[-1].delay is None
    assert llm_requests(offline) == 3

    retry = await harness.context(agent(tools=()), activation_id=ctx.activation_id)
    with pytest.raises(StepFailed, match="RetriesExhausted"):
        await harness.llm.call(retry, "hello")
    assert llm_requests(offline) == 3


async def test_a_bad_request_is_a_final_recorded_error(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=()))
    with pytest.raises(StepFailed, match="BadRequestError"):
        await harness.llm.call(ctx, "hello", tool_choice={"type": "any"})  # no tools offered
    [step] = await harness.recorded(ctx)
    assert step.error is not None
    assert step.error.code == "400"
    assert [a.reason for a in step.attempts] == [None]
    assert llm_requests(offline) == 1


# The SDK's own rule (anthropic's BaseClient._should_retry), which turning its retries
# off must not lose: 409 is retried; x-should-retry true retries any status, false none.
@pytest.mark.parametrize(
    ("fault", "reason", "error_type"),
    [
        (Fault("conflict"), "conflict", "ConflictError"),
        (Fault("bad_request", should_retry=True), "retry_requested", "BadRequestError"),
        (Fault("server_error", should_retry=True), "server_error", "InternalServerError"),
    ],
    ids=["409", "400-should-retry-true", "500-should-retry-true"],
)
async def test_what_the_sdk_retries_is_retried(
    harness: Harness, offline: OfflineServer, fault: Fault, reason: str, error_type: str
) -> None:
    offline.faults.push(fault)
    ctx = await harness.context(agent(tools=()))
    result = await harness.llm.call(ctx, "hello")
    assert result.text.startswith("[offline]")
    [step] = await harness.recorded(ctx)
    assert [(a.reason, a.error_type, a.will_retry) for a in step.attempts] == [
        (reason, error_type, True)
    ]
    assert step.error is None
    assert llm_requests(offline) == 2


@pytest.mark.parametrize("kind", ["server_error", "overloaded", "rate_limit", "conflict"])
async def test_x_should_retry_false_is_final(
    harness: Harness, offline: OfflineServer, kind: str
) -> None:
    offline.faults.push(Fault(kind, should_retry=False, retry_after=0.01))  # type: ignore[arg-type]
    ctx = await harness.context(agent(tools=()))
    with pytest.raises(StepFailed):
        await harness.llm.call(ctx, "hello")
    [step] = await harness.recorded(ctx)
    assert [(a.reason, a.will_retry) for a in step.attempts] == [(None, False)]
    assert step.error is not None
    assert llm_requests(offline) == 1


# -- budgets and cost --------------------------------------------------------------------------


async def test_over_budget_the_call_is_not_made(harness: Harness, offline: OfflineServer) -> None:
    ctx = await harness.context(agent(tools=(), budget=Budget(tokens=500)))
    with pytest.raises(BudgetExceeded) as info:
        await harness.llm.call(ctx, "hello", max_tokens=1024)
    event = info.value.event
    assert isinstance(event, RunBudgetExceeded)
    assert (event.step, event.budget_tokens, event.spent_tokens) == (1, 500, 0)
    assert event.requested_tokens > 1024
    assert llm_requests(offline) == 0
    assert await harness.recorded(ctx) == []
    assert ctx.steps.count == 0  # no step number was used up


async def test_the_budget_counts_earlier_spend_and_this_activations_steps(
    harness: Harness, offline: OfflineServer
) -> None:
    a = agent(tools=(), budget=Budget(tokens=400))
    ctx = await harness.context(a, spent=(100, 0.0))
    first = await harness.llm.call(ctx, "hello", max_tokens=100)  # ~110 + 100 < 400 - 100
    used = first.usage.tokens
    assert used > 0
    with pytest.raises(BudgetExceeded) as info:
        await harness.llm.call(ctx, "hello again", max_tokens=300)
    assert info.value.event.spent_tokens == 100 + used
    assert llm_requests(offline) == 1
    # A retry of the activation replays the recorded call whatever the budget now says.
    retry = await harness.context(
        agent(tools=(), budget=Budget(tokens=1)), activation_id=ctx.activation_id
    )
    await harness.llm.call(retry, "hello", max_tokens=100)
    assert llm_requests(offline) == 1


async def test_the_settings_budget_applies_when_the_agent_has_none(
    log: EventLog, redis: aioredis.Redis, settings: Settings, harness: Harness
) -> None:
    h = Harness(log, redis, dataclasses.replace(settings, run_budget_tokens=10), harness.client)
    ctx = await h.context(agent(tools=()))
    with pytest.raises(BudgetExceeded):
        await h.llm.call(ctx, "hello")


async def test_dollar_budget_and_cost_from_the_price_table(
    log: EventLog, redis: aioredis.Redis, settings: Settings, harness: Harness
) -> None:
    """Priced as an online model would be (offline=False), against the offline server."""
    h = Harness(log, redis, settings, harness.client, offline=False)
    ctx = await h.context(agent(tools=(), budget=Budget(usd=0.01)))
    result = await h.llm.call(ctx, "hello", max_tokens=100)
    u = result.usage
    assert not u.offline
    assert u.cost_usd == pytest.approx((u.input_tokens * 1.0 + u.output_tokens * 5.0) / 1e6)
    with pytest.raises(BudgetExceeded) as info:
        await h.llm.call(ctx, "hello", max_tokens=4000, model="claude-opus-5-5")  # 4000 * 20/1e6
    assert info.value.event.requested_usd > 0.05
    assert info.value.event.spent_usd == pytest.approx(u.cost_usd)


def test_cost_computation_from_the_price_table() -> None:
    s = Settings.from_env({"AGENTRT_PRICES": "claude-x-1=3/15"})
    assert price_for(s, "claude-x-1-20250929") == (3.0, 15.0)  # a dated id
    assert price_for(s, "claude-x-1-5") is None  # another model, not a date
    assert price_for(s, "gpt-nope") is None
    assert cost_usd(s, "claude-x-1", 1_000_000, 100_000) == pytest.approx(4.5)
    assert cost_usd(s, "claude-x-1", 0, 0, 1_000_000, 1_000_000) == pytest.approx(
        3 * 1.25 + 3 * 0.1
    )
    assert cost_usd(s, "unknown-model", 10**6, 10**6) == 0.0
    raw = {"input_tokens": 2000, "output_tokens": 400, "cache_read_input_tokens": None}
    online = usage_of(s, "claude-haiku-4-5", raw, offline=False)
    assert online == Usage(
        model="claude-haiku-4-5",
        input_tokens=2000,
        output_tokens=400,
        cost_usd=pytest.approx(0.004),
        offline=False,
    )
    free = usage_of(
        s, "claude-haiku-4-5", {"input_tokens": 2000, "output_tokens": 400}, offline=True
    )
    assert (free.cost_usd, free.offline) == (0.0, True)
    assert model_for(s, "smart") == "claude-sonnet-5-5"


# -- context policies --------------------------------------------------------------------------


def tool_conversation(turns: int) -> list[dict[str, Any]]:
    """A first question, then ``turns`` tool round trips, then a new question."""
    out: list[dict[str, Any]] = [{"role": "user", "content": "Look up orders for ann@example.com"}]
    for i in range(turns):
        out.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Looking up order {i}. " + "x" * 200},
                    {
                        "type": "tool_use",
                        "id": f"toolu_{i}",
                        "name": "lookup_order",
                        "input": {"order_id": i, "email": "ann@example.com"},
                    },
                ],
            }
        )
        out.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": f"toolu_{i}",
                        "content": "shipped " * 30,
                    },
                ],
            }
        )
    out.append({"role": "assistant", "content": "All looked up."})
    out.append({"role": "user", "content": "And what is the weather in Paris?"})
    return out


def assert_pairs_intact(messages: Sequence[dict[str, Any]]) -> None:
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    for i, m in enumerate(messages):
        if isinstance(m["content"], list):
            for b in m["content"]:
                if b["type"] == "tool_result":
                    prev = messages[i - 1]["content"]
                    assert any(p.get("id") == b["tool_use_id"] for p in prev)


async def test_keep_recent_drops_oldest_turns_keeping_pairs_and_the_first_message(
    harness: Harness, offline: OfflineServer
) -> None:
    policy = KeepRecent(max_tokens=600)
    ctx = await harness.context(agent(tools=(lookup_order,), context_policy=policy))
    convo = tool_conversation(6)
    assert message_tokens(convo) > 600
    pruned = await policy.apply(list(convo), llm=harness.llm, ctx=ctx)
    assert message_tokens(pruned) <= 600
    assert pruned[0] == convo[0]
    assert pruned[-1] == convo[-1]
    assert len(pruned) < len(convo)
    assert_pairs_intact(pruned)
    small = convo[:3]
    assert await policy.apply(small, llm=harness.llm, ctx=ctx) is small

    # Through call() (the agent's policy): the request sent is the pruned one, and it is valid.
    await harness.llm.call(ctx, messages=convo)
    [request] = offline.requests.all()
    assert request.status == 200
    assert request.body["messages"] == pruned


async def test_summarize_replaces_older_turns_with_a_summary_step(
    harness: Harness, offline: OfflineServer
) -> None:
    ctx = await harness.context(agent(tools=(lookup_order,), tier="smart"))
    convo = tool_conversation(6)
    policy = Summarize(max_tokens=600, keep_last=2)
    result = await harness.llm.call(ctx, messages=convo, context_policy=policy)
    steps = await harness.recorded(ctx)
    assert [(s.kind, s.name) for s in steps] == [
        ("llm", "claude-haiku-4-5"),
        ("llm", "claude-sonnet-5-5"),
    ]
    assert "toolu" not in steps[0].request["messages"][0]["content"]  # a transcript, as text
    assert "lookup_order" in steps[0].request["messages"][0]["content"]
    sent = steps[1].request["messages"]
    assert sent[1:] == convo[-2:]
    first = sent[0]["content"]
    assert first[0] == {"type": "text", "text": convo[0]["content"]}
    assert first[1]["text"].startswith(SUMMARY_LABEL + "[offline]")
    assert_pairs_intact(sent)
    assert result.steps == (1, 2)
    assert llm_requests(offline) == 2
