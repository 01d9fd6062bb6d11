"""Replay of dead letters the handler did not cause (its timeout, its workers' deaths): only
the steps compare; a handler's own dead letter still has to raise again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

from projections.record import build_record
from projections.replay import replay_record
from runtime.agents.agent import Agent
from runtime.events.builtin import ActivationDeadLettered
from runtime.events.model import Event, RecordedEvent


class Pinged(Event, tag="replaytest.pinged"):
    n: int


class Quiet(Agent):
    name = "quiet"
    subscribes = (Pinged,)

    async def handle(self, event: Any, ctx: Any) -> None:
        return None


class Chatty(Quiet):
    async def handle(self, event: Any, ctx: Any) -> None:
        await ctx.llm("hello")  # a step the record does not hold


def _event(position: int, body: Event, event_id: uuid.UUID, run_id: uuid.UUID) -> RecordedEvent:
    tag = body.__struct_config__.tag
    assert isinstance(tag, str)
    return RecordedEvent(position, 1000 + position, event_id, f"run-{run_id}", position, tag, 1,
                         run_id, None, None, datetime.now(UTC), None, body, bytes(32),
                         bytes(32))  # fmt: skip


def _dead_run(error_type: str, error: str) -> Any:
    run_id = uuid.uuid4()
    dead = ActivationDeadLettered(agent="quiet", activation_id=uuid.uuid4(), trigger_id=run_id,
                                  trigger_type="replaytest.pinged", stream="s", entry_id="1-0",
                                  deliveries=3, error_type=error_type, error=error)  # fmt: skip
    events = [_event(1, Pinged(n=1), run_id, run_id), _event(2, dead, uuid.uuid4(), run_id)]
    return build_record(run_id, events)


async def test_circumstantial_dead_letters_compare_only_their_steps() -> None:
    for error_type, error in [
        ("HandlerTimeout", "agent 'quiet': the handler ran past its timeout of 1 s"),
        ("RuntimeError", "delivered 6 times without completing (its workers died or ...)"),
    ]:
        report = await replay_record(_dead_run(error_type, error), [Quiet()])
        (a,) = report.activations
        assert a.identical, a.divergence
        assert "only its steps are compared" in a.note
        chatty = await replay_record(_dead_run(error_type, error), [Chatty()])
        assert not chatty.activations[0].identical
        assert chatty.activations[0].divergence is not None
        assert chatty.activations[0].divergence.kind == "step"


async def test_a_handlers_own_dead_letter_must_still_raise_again() -> None:
    report = await replay_record(_dead_run("StepFailed", "step 1 failed"), [Quiet()])
    (a,) = report.activations
    assert not a.identical and a.note == ""
    assert a.divergence is not None and a.divergence.kind == "outcome"
    assert msgspec.json.encode(report)  # the --json form encodes
