"""The activation core runs a handler against recorded steps: no Redis, no SQL, no model."""

from __future__ import annotations

import uuid
from typing import Any, NoReturn

import pytest

from runtime import Agent, Context, Event, tool
from runtime.agents.context import Trigger
from runtime.effects.steps import Steps, request_hash
from runtime.errors import StepDivergence
from runtime.events.builtin import ActivationCompleted, StepRecorded
from runtime.worker.activation import activate

CALLS: list[str] = []


class PriceAsked(Event, tag="test.activation.price_asked"):
    sku: str


class PriceQuoted(Event, tag="test.activation.price_quoted"):
    sku: str
    cents: int


@tool
async def price(sku: str) -> int:
    """Look up a price (the live system would answer 999)."""
    CALLS.append(sku)
    return 999


class Quoter(Agent):
    name = "quoter"
    subscribes = (PriceAsked,)
    tools = (price,)

    async def handle(self, event: PriceAsked, ctx: Context) -> None:
        cents = await ctx.tool(price, sku=event.sku)
        ctx.emit(PriceQuoted(sku=event.sku, cents=cents))


class NoServices:
    """The worker's services, refusing every use: the recorded steps must answer."""

    @property
    def llm(self) -> NoReturn:
        raise AssertionError("no model call expected")

    def breaker(self, name: str) -> NoReturn:
        raise AssertionError("no tool call expected")

    async def record_transition(self, transition: Any, *, run_id: Any) -> None:
        raise AssertionError("no breaker transition expected")


def _trigger(sku: str) -> Trigger:
    event_id = uuid.uuid4()
    return Trigger(event_id=event_id, type="test.activation.price_asked", run_id=event_id,
                   causation_id=None, producer="test", body=PriceAsked(sku=sku),
                   stream="-", entry_id="-")  # fmt: skip


def _recorded(activation_id: uuid.UUID, sku: str, cents: int) -> dict[int, StepRecorded]:
    request = {"sku": sku}
    step = StepRecorded(activation_id=activation_id, agent="quoter", step=1, kind="tool",
                        name="price", request_hash=request_hash("tool", "price", request),
                        request=request, result=cents)  # fmt: skip
    return {1: step}


def _steps(trigger: Trigger, aid: uuid.UUID, recorded: dict[int, StepRecorded]) -> Steps:
    return Steps(None, activation_id=aid, run_id=trigger.run_id, agent="quoter",
                 trigger_id=trigger.event_id, recorded=recorded)  # fmt: skip


async def test_a_handler_runs_against_recorded_steps_without_servers() -> None:
    CALLS.clear()
    trigger, aid = _trigger("SKU-1"), uuid.uuid4()
    steps = _steps(trigger, aid, _recorded(aid, "SKU-1", 1234))
    result = await activate(Quoter(), trigger, activation_id=aid, steps=steps,
                            services=NoServices())  # fmt: skip
    assert CALLS == []  # the tool was not called: the record answered
    assert result.outcome == "completed"
    assert (steps.count, steps.reused, steps.executed) == (1, 1, [])
    [quoted] = [e.body for e in result.emitted]
    assert quoted == PriceQuoted(sku="SKU-1", cents=1234)
    completed = result.outputs[-1].body
    assert isinstance(completed, ActivationCompleted)
    assert (completed.steps, completed.emitted) == (1, [result.emitted[0].event_id])
    assert all(e.run_id == trigger.run_id for e in result.outputs)
    assert result.outputs[-1].causation_id == trigger.event_id


async def test_a_different_request_than_recorded_is_a_divergence() -> None:
    trigger, aid = _trigger("SKU-2"), uuid.uuid4()
    steps = _steps(trigger, aid, _recorded(aid, "SKU-1", 1234))
    with pytest.raises(StepDivergence, match="diverged at step 1"):
        await activate(Quoter(), trigger, activation_id=aid, steps=steps, services=NoServices())


async def test_a_step_beyond_the_record_is_executed_and_kept_not_written() -> None:
    """What fork will do past its fork point: call for real, keep the result in memory."""
    CALLS.clear()
    trigger, aid = _trigger("SKU-3"), uuid.uuid4()
    steps = _steps(trigger, aid, {})

    class Services(NoServices):
        def breaker(self, name: str) -> Any:
            return _OpenBreaker()

    result = await activate(Quoter(), trigger, activation_id=aid, steps=steps,
                            services=Services())  # fmt: skip
    assert CALLS == ["SKU-3"]
    assert steps.executed == [1] and steps.recorded[1].result == 999
    assert [e.body for e in result.emitted] == [PriceQuoted(sku="SKU-3", cents=999)]


class _OpenBreaker:
    """A breaker that always lets the call through (no Redis)."""

    class _Permit:
        transition = None

    async def before_call(self) -> Any:
        return self._Permit()

    async def record_success(self, permit: Any) -> None:
        return None

    async def record_failure(self, permit: Any) -> None:
        return None

    async def release(self, permit: Any) -> None:
        return None
