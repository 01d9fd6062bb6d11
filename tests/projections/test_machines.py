"""A state machine agent in real workers: transitions checked against the state the log
records across activations, a refused transition recorded and audited, the current state
in the read models and ``agentrt runs``, and a replay of a run with refusals identical."""

from __future__ import annotations

import enum
import json
import uuid
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from projections.builtin import builtin_projections
from projections.engine import Projector
from projections.queries import ReadModels
from projections.replay import replay_run
from runtime import (
    Context,
    Event,
    InvalidTransition,
    RecordedEvent,
    StateMachine,
    StateTransitioned,
    StateTransitionRefused,
)
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections.test_runs_cli import agentrt
from tests.support.runtime import count_type, inbox_rows, running, send, wait_for


class Review(enum.StrEnum):
    INTAKE = "intake"
    RESEARCH = "research"
    DRAFT = "draft"
    REVIEW = "review"
    COMPLETE = "complete"
    FAILED = "failed"


class TicketOpened(Event, tag="test.fsm.ticket_opened"):
    ticket: str
    #: "ok": the review ends in review; "uncaught": the last transition is refused, uncaught.
    mode: str = "ok"


class Advanced(Event, tag="test.fsm.advanced"):
    ticket: str
    n: int
    mode: str


class Reviewer(StateMachine):
    name = "reviewer"
    subscribes = (TicketOpened, Advanced)
    states = Review
    initial = Review.INTAKE
    transitions: ClassVar[dict[Any, Any]] = {
        Review.INTAKE: {Review.RESEARCH, Review.FAILED},
        Review.RESEARCH: {Review.DRAFT, Review.FAILED},
        Review.DRAFT: {Review.REVIEW, Review.FAILED},
        Review.REVIEW: {Review.DRAFT, Review.COMPLETE, Review.FAILED},
    }

    async def handle(self, event: TicketOpened | Advanced, ctx: Context) -> None:
        if isinstance(event, TicketOpened):
            # Emitted before the transition: its activation must still see research.
            ctx.emit(Advanced(ticket=event.ticket, n=1, mode=event.mode))
            ctx.transition(Review.RESEARCH, reason="ticket opened")
        elif event.n == 1:
            ctx.transition(Review.DRAFT)  # allowed only from research, as recorded
            try:
                ctx.transition(Review.COMPLETE)  # draft -> complete is not declared
            except InvalidTransition:
                ctx.emit(Advanced(ticket=event.ticket, n=2, mode=event.mode))
        elif event.n == 2 and event.mode == "ok":
            ctx.transition(Review.REVIEW, reason="drafted")
        elif event.n == 2:
            ctx.emit(Advanced(ticket=event.ticket, n=3, mode=event.mode))  # dropped
            ctx.transition(Review.INTAKE)  # refused, and not caught


class Forgetful(Reviewer):
    """Broken: does not fold its transitions (every activation starts at intake)."""

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        return state


@pytest.fixture
async def tickets(redis: aioredis.Redis, log: EventLog, settings: Settings) -> list[uuid.UUID]:
    """Two runs (ok, uncaught) handled by a worker with its relay, then projected."""
    ids = [await send(redis, TicketOpened(ticket="t1")),
           await send(redis, TicketOpened(ticket="t2", mode="uncaught"))]  # fmt: skip
    async with running([Reviewer()], redis, log):
        await wait_for(lambda: _at_least(log, "activation.completed", 6), what="6 activations")
    await Projector(log, builtin_projections([Reviewer()], settings), settings).catch_up()
    return ids


async def _at_least(log: EventLog, event_type: str, n: int) -> bool:
    return await count_type(log, event_type) >= n


def _moves(events: list[RecordedEvent]) -> list[tuple[str, str, str]]:
    out = []
    for e in events:
        if isinstance(e.body, StateTransitioned):
            out.append(("moved", e.body.from_state, e.body.to_state))
        elif isinstance(e.body, StateTransitionRefused):
            out.append(("refused", e.body.from_state, e.body.to_state))
    return out


async def test_transitions_follow_the_recorded_state_and_refusals_are_recorded(
    log: EventLog, tickets: list[uuid.UUID]
) -> None:
    ok, uncaught = tickets
    assert _moves(await log.read_run(ok)) == [
        ("moved", "intake", "research"),
        ("moved", "research", "draft"),
        ("refused", "draft", "complete"),
        ("moved", "draft", "review"),
    ]
    # The uncaught refusal ended its activation: only the refusal committed (not the
    # event emitted before it), the state stays draft.
    events = await log.read_run(uncaught)
    assert _moves(events) == [
        ("moved", "intake", "research"),
        ("moved", "research", "draft"),
        ("refused", "draft", "complete"),
        ("refused", "draft", "intake"),
    ]
    assert [e.body.n for e in events if isinstance(e.body, Advanced)] == [1, 2]
    outcomes = sorted(o for _, _, o in await inbox_rows(log))
    assert outcomes == ["completed"] * 5 + ["transition_refused"]
    refusal = next(e.body for e in reversed(events) if isinstance(e.body, StateTransitionRefused))
    assert refusal.allowed == ["failed", "review"]


async def test_the_state_is_a_read_model_and_refusals_are_audited(
    log: EventLog, settings: Settings, tickets: list[uuid.UUID]
) -> None:
    ok, uncaught = tickets
    rm = ReadModels(log.pool, settings)
    assert (await rm.run(ok)).states == {"reviewer": "review"}
    assert (await rm.run(ok)).status == "completed"
    assert (await rm.run(uncaught)).states == {"reviewer": "draft"}
    assert (await rm.run(uncaught)).status == "failed"
    assert {r.run_id: r.states for r in (await rm.runs()).items} == {
        ok: {"reviewer": "review"},
        uncaught: {"reviewer": "draft"},
    }
    [m] = await rm.machines(ok)
    assert (m.agent, m.state, m.previous, m.transitions, m.refused, m.last_refused) == (
        "reviewer", "review", "draft", 3, 1, "draft -> complete",
    )  # fmt: skip
    [m] = await rm.machines(uncaught)
    assert (m.state, m.transitions, m.refused, m.last_refused) == (
        "draft", 2, 2, "draft -> intake",
    )  # fmt: skip
    # The agent's folded state (what ctx.state was) agrees.
    [folded] = await rm.agent_states(ok)
    assert folded.state == {"current": "review", "previous": "draft", "transitions": 3}

    refused = (await rm.audit(run_id=uncaught, type="state.transition_refused")).items
    assert [(e.actor, e.subject) for e in refused] == [
        ("reviewer", "draft -> intake"),
        ("reviewer", "draft -> complete"),
    ]
    assert refused[0].detail["allowed"] == ["failed", "review"]
    assert "refused draft -> intake" in refused[0].summary
    moved = (await rm.audit(run_id=ok, type="state.transitioned")).items
    assert [e.subject for e in moved] == ["draft -> review", "research -> draft",
                                          "intake -> research"]  # fmt: skip
    assert (await rm.audit(text="refused")).items


async def test_a_replay_of_runs_with_refusals_is_identical(
    log: EventLog, settings: Settings, tickets: list[uuid.UUID]
) -> None:
    before = len(await log.read_all(limit=10_000))
    for run_id in tickets:
        report = await replay_run(log, [Reviewer()], run_id, settings=settings)
        assert report.identical, report
        assert [a.outcome for a in report.activations][-1] in ("completed", "transition_refused")
    assert len(await log.read_all(limit=10_000)) == before  # a replay writes nothing


async def test_a_machine_that_ignores_the_recorded_state_is_caught(
    log: EventLog, settings: Settings, tickets: list[uuid.UUID]
) -> None:
    """The replay above can fail: a machine that does not fold its transitions refuses
    research -> draft (it thinks it is still in intake) where the record moved on."""
    report = await replay_run(log, [Forgetful()], tickets[0], settings=settings)
    assert not report.identical
    [first] = report.divergent[:1]
    assert first.trigger_type == "test.fsm.advanced"
    assert first.divergence is not None and first.divergence.kind == "outcome"


async def test_agentrt_runs_shows_the_state(settings: Settings, tickets: list[uuid.UUID]) -> None:
    ok, uncaught = tickets
    listed = agentrt(settings, "runs")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert "state" in header.split()
    states = {line.split()[0]: line.split()[4] for line in lines if line.strip()}
    assert states == {str(ok): "review", str(uncaught): "draft"}
    shown = agentrt(settings, "runs", "show", str(uncaught))
    assert shown.returncode == 0, shown.stderr
    assert "state     reviewer: draft  (from research, 2 transitions, 2 refused (last draft " \
        "-> intake))" in shown.stdout  # fmt: skip
    assert "reviewer refused draft -> intake" in shown.stdout
    doc = json.loads(agentrt(settings, "runs", "show", str(ok), "--json").stdout)
    assert doc["run"]["states"] == {"reviewer": "review"}
    assert doc["machines"][0]["refused"] == 1
