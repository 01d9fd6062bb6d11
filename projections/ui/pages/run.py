"""The run page: a run's totals, its timeline as a causation tree over a waterfall of
durations, each step's detail (loaded when opened) and time travel over its events.

Every route takes the run id from the URL and reads only that run: a step or event
position is looked up among the run's own events, so another run's position is a 404.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Request, Response

from projections.errors import ReadSideError, StepOutOfRange, UnknownProjection, UnknownRun
from projections.queries import encode_cursor
from projections.record import RunRecord, load_run
from projections.timetravel import state_at
from projections.ui.app import UI
from projections.ui.pages.run_view import circuit_view, model_view, pretty, waterfall
from runtime.events.builtin import StepRecorded
from runtime.events.model import RecordedEvent

#: A run in these states may still grow: its page refreshes its timeline live.
LIVE = ("running", "waiting_for_approval")
#: Transitions of a tool's breaker read to tell its state around one call.
CIRCUIT_LOOKBACK = 20


class EventNotFound(ReadSideError):
    """No event (or no step) at this position in this run."""

    status = 404
    code = "event_not_found"


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/runs/{run_id}")
    async def run_page(
        request: Request, run_id: UUID, part: str | None = None, since: str | None = None
    ) -> Response:
        """The page; ``part=body`` is the live refresh's fragment (totals and timeline),
        204 while the run's row is where the page last saw it (``since``): the projector
        folded other runs' events."""
        models = await ui.models()
        run = await models.run(run_id)
        if part == "body" and since is not None and since == run.position:
            return Response(status_code=204)
        entries = await models.timeline(run_id)
        context: dict[str, Any] = {
            "run": run,
            "fall": waterfall(run_id, entries, run.started_at),
            "live": run.status in LIVE,
            "count": len(entries),
            "folds": any(a.folds_state for a in ui.backend.agents),
        }
        if part == "body":
            return ui.render(request, "run_body.html", refresh=True, **context)
        return ui.render(request, "run.html", refresh=False, **context)

    @r.get("/runs/{run_id}/steps/{position}")
    async def step_detail(request: Request, run_id: UUID, position: int) -> Response:
        record = await load_run(await ui.backend.log(), run_id)
        event = _event(record, position)
        if not isinstance(event.body, StepRecorded):
            raise EventNotFound(f"the event at position {position} of run {run_id} is not a step")
        return await _step(request, ui, record, event, event.body)

    @r.get("/runs/{run_id}/events/{position}")
    async def event_detail(request: Request, run_id: UUID, position: int) -> Response:
        record = await load_run(await ui.backend.log(), run_id)
        event = _event(record, position)
        if isinstance(event.body, StepRecorded):
            return await _step(request, ui, record, event, event.body)
        return ui.render(request, "run_event.html", e=event, agent=_agent(event),
                         body=pretty(event.body))  # fmt: skip

    @r.get("/runs/{run_id}/state")
    async def state(
        request: Request, run_id: UUID, i: int | None = None, at: int | None = None
    ) -> Response:
        """Time travel: the agents' state after the run's event number ``i`` (0-based, in
        log order: the slider) or at log position ``at``; default, after its last event."""
        log = await ui.backend.log()
        events = await log.read_run(run_id)
        if not events:
            raise UnknownRun(f"no such run: {run_id}")
        index = _index(run_id, events, i, at)
        target = events[index]
        context: dict[str, Any] = {
            "e": target, "agent": _agent(target), "index": index, "total": len(events),
        }  # fmt: skip
        if any(a.folds_state for a in ui.backend.agents):
            found = await state_at(log, ui.backend.agents, run_id, target.position)
            states = [(s.agent, pretty(s.state), s) for s in found.agents]
            return ui.render(request, "run_state.html", states=states, current=None, **context)
        models = await ui.models()
        current = [(s.agent, pretty(s.state), s) for s in await models.agent_states(run_id)]
        return ui.render(request, "run_state.html", states=None, current=current, **context)


def _event(record: RunRecord, position: int) -> RecordedEvent:
    for e in record.events:
        if e.position == position:
            return e
    raise EventNotFound(f"run {record.run_id} has no event at position {position}")


def _agent(e: RecordedEvent) -> str | None:
    agent = getattr(e.body, "agent", None)
    return agent if isinstance(agent, str) else e.producer


def _index(run_id: UUID, events: list[RecordedEvent], i: int | None, at: int | None) -> int:
    if at is not None:
        for n, e in enumerate(events):
            if e.position == at:
                return n
        raise StepOutOfRange(f"position {at} is not an event of run {run_id}")
    if i is None:
        return len(events) - 1
    if not 0 <= i < len(events):
        raise StepOutOfRange(f"run {run_id} has events 0..{len(events) - 1}; {i} is not one")
    return i


def fork_step(record: RunRecord, step: StepRecorded) -> int | None:
    """The run-level number ``agentrt fork --at`` takes for ``step`` (as
    :meth:`RunRecord.locate` counts: activations in commit order, steps within each);
    None while its activation has not committed (it cannot be forked from yet)."""
    for a in record.activations:
        if a.activation_id == step.activation_id:
            return a.first_step + step.step - 1 if step.step <= a.step_count else None
    return None


async def _step(
    request: Request, ui: UI, record: RunRecord, event: RecordedEvent, step: StepRecorded
) -> Response:
    ended = event.recorded_at
    started = ended - timedelta(milliseconds=step.duration_ms)
    circuit = None
    circuit_error = None
    if step.kind == "tool":
        models = await ui.models()
        try:
            page = await models.circuit_transitions(
                name=step.name, limit=CIRCUIT_LOOKBACK,
                cursor=encode_cursor(event.tx, event.position),
            )  # fmt: skip
        except UnknownProjection as exc:
            circuit_error = exc.message
        else:
            complete = page.next_cursor is None
            circuit = circuit_view(page.items, started, ended, complete=complete)
    return ui.render(
        request,
        "run_step.html",
        e=event,
        s=step,
        run_id=record.run_id,
        at=fork_step(record, step),
        started=started,
        retries=sum(1 for a in step.attempts if a.will_retry),
        model=model_view(step) if step.kind == "llm" else None,
        request_json=pretty(step.request),
        result_json=pretty(step.result),
        circuit=circuit,
        circuit_error=circuit_error,
    )
