"""The query API's routes: thin over :class:`projections.queries.ReadModels` and
:func:`projections.timetravel.state_at`, every one behind the bearer check.

A run's routes take its id as a UUID (anything else is a 422 before any query) and
filter by it in SQL, so no parameter reaches another run's rows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

import msgspec
from fastapi import APIRouter, Depends, Query, Request, Response

from projections.api.http import JSON, ReadRoute, _error, json_response, ok
from projections.api.openapi import schema_of
from projections.errors import ApprovalConflict, ApprovalMissing, InvalidBody
from projections.queries import (
    MAX_LIMIT,
    AgentStateRow,
    AuditEntry,
    CircuitTransitionRow,
    DeadLetterRow,
    EventRow,
    Page,
    ReadModels,
    RunRow,
    TimelineEntry,
    UsageRow,
)
from projections.timetravel import RunState, state_at
from runtime.errors import AlreadyDecided, ApprovalNotFound
from runtime.log import approvals

if TYPE_CHECKING:  # the backend is the app module's (which imports this one)
    from projections.api.backend import Backend

#: ``by`` of a decision made through the API: the bearer token's holder (there is one
#: token; a name given in the body is recorded after it, as the holder's claim).
API_IDENTITY = "api"


class DecisionBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /runs/{run_id}/approvals/{approval_id}``'s body."""

    approved: bool
    comment: Annotated[str, msgspec.Meta(max_length=4000)] = ""
    #: Who, on the token holder's side, decides (recorded as ``api:<by>``).
    by: Annotated[str, msgspec.Meta(max_length=200)] = ""


class Decision(msgspec.Struct, kw_only=True):
    """An approval's decision as recorded."""

    approval_id: UUID
    run_id: UUID
    approved: bool
    by: str
    comment: str


#: The result types whose schemas the OpenAPI document carries.
SCHEMA_TYPES: tuple[Any, ...] = (
    Page[RunRow],
    RunRow,
    Page[EventRow],
    list[TimelineEntry],
    RunState,
    list[AgentStateRow],
    Page[AuditEntry],
    list[UsageRow],
    Page[DeadLetterRow],
    Page[CircuitTransitionRow],
    Decision,
    DecisionBody,
)

Status = Literal[
    "running", "waiting_for_approval", "completed", "failed", "dead_lettered", "budget_exceeded"
]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page")]
Cursor = Annotated[
    str | None, Query(description="A previous page's `next_cursor`: the page after it")
]
Since = Annotated[datetime | None, Query(description="From this time on (inclusive, with zone)")]
Until = Annotated[datetime | None, Query(description="Before this time (exclusive, with zone)")]


def router(backend: Backend, check: Callable[..., Awaitable[None]]) -> APIRouter:
    """The routes over ``backend``, each guarded by ``check`` (the bearer dependency)."""
    r = APIRouter(dependencies=[Depends(check)], route_class=ReadRoute, tags=["read models"])
    models: ReadModels | None = None

    async def read() -> ReadModels:
        nonlocal models
        if models is None:
            models = ReadModels(await backend.pool(), backend.settings)
        return models

    @r.get(
        "/runs",
        response_class=Response,
        responses=ok(schema_of(Page[RunRow]), "Runs, newest first"),
        summary="List runs",
        description="Runs newest first (by start), filtered by status, an agent involved, "
        "source, start time and cost.",
    )
    async def runs(
        status: Annotated[Status | None, Query(description="The run's status")] = None,
        agent: Annotated[str | None, Query(description="An agent involved in the run")] = None,
        source: Annotated[str | None, Query(description="The trigger's source")] = None,
        since: Since = None,
        until: Until = None,
        min_cost: Annotated[
            float | None, Query(ge=0, description="Runs that cost at least this (USD)")
        ] = None,
        max_cost: Annotated[
            float | None, Query(ge=0, description="Runs that cost at most this (USD)")
        ] = None,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> Response:
        page = await (await read()).runs(
            status=status,
            agent=agent,
            source=source,
            since=since,
            until=until,
            min_cost=min_cost,
            max_cost=max_cost,
            limit=limit,
            cursor=cursor,
        )
        return json_response(page)

    @r.get(
        "/runs/{run_id}",
        response_class=Response,
        responses=ok(schema_of(RunRow), "The run"),
        summary="One run",
    )
    async def run(run_id: UUID) -> Response:
        return json_response(await (await read()).run(run_id))

    @r.get(
        "/runs/{run_id}/events",
        response_class=Response,
        responses=ok(schema_of(Page[EventRow]), "The run's events, in log order"),
        summary="A run's events as the log holds them",
        description="Envelope, body (JSON) and hashes of every event of the run, in log order, "
        "read from the log itself.",
    )
    async def events(run_id: UUID, limit: Limit = 1000, cursor: Cursor = None) -> Response:
        return json_response(await (await read()).events(run_id, after=cursor, limit=limit))

    @r.get(
        "/runs/{run_id}/timeline",
        response_class=Response,
        responses=ok(schema_of(list[TimelineEntry]), "The run's events by causation"),
        summary="A run's timeline",
        description="Every event of the run depth-first by causation (a trigger before what "
        "it caused), with agent, activation, step, duration, tokens and cost.",
    )
    async def timeline(run_id: UUID) -> Response:
        return json_response(await (await read()).timeline(run_id))

    @r.get(
        "/runs/{run_id}/state",
        response_class=Response,
        responses=ok(schema_of(RunState), "Each stateful agent's state as of the event"),
        summary="Time travel: the run's state as of one of its events",
        description="Each agent's folded state (its `evolve` over the run's events up to and "
        "including the event at `at`), from the nearest snapshot. Needs the agents' code: "
        "`agentrt api --app MODULE`; without it, 422 `agent_not_found`.",
    )
    async def state(
        run_id: UUID,
        at: Annotated[
            int | None,
            Query(
                description="A global log position of one of the run's events (as in its "
                "timeline); default: the run's last event"
            ),
        ] = None,
    ) -> Response:
        if not any(a.folds_state for a in backend.agents):
            await (await read()).events(run_id, limit=1)  # an unknown run is a 404 first
        return json_response(await state_at(await backend.log(), backend.agents, run_id, at))

    @r.get(
        "/runs/{run_id}/agent-states",
        response_class=Response,
        responses=ok(schema_of(list[AgentStateRow]), "Each agent's current state in the run"),
        summary="A run's current agent states (the projection's)",
    )
    async def agent_states(run_id: UUID) -> Response:
        return json_response(await (await read()).agent_states(run_id))

    @r.get(
        "/audit",
        response_class=Response,
        responses=ok(schema_of(Page[AuditEntry]), "Audit entries, newest first"),
        summary="Audit entries",
        description="Who did what, when: state transitions, approvals, model and tool calls, "
        "emitted events, dead letters, circuit transitions.",
    )
    async def audit(
        run_id: Annotated[UUID | None, Query(description="Only this run's entries")] = None,
        agent: Annotated[str | None, Query(description="The actor (an agent)")] = None,
        type: Annotated[str | None, Query(description="An action or an event type")] = None,
        since: Since = None,
        until: Until = None,
        q: Annotated[str | None, Query(description="Words of the summary (web search)")] = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Response:
        page = await (await read()).audit(
            run_id=run_id,
            agent=agent,
            type=type,
            since=since,
            until=until,
            text=q,
            limit=limit,
            cursor=cursor,
        )
        return json_response(page)

    @r.get(
        "/usage",
        response_class=Response,
        responses=ok(schema_of(list[UsageRow]), "Tokens and cost per group"),
        summary="Tokens and cost by day, agent and model",
    )
    async def usage(
        since: Annotated[date | None, Query(description="First day (UTC, inclusive)")] = None,
        until: Annotated[date | None, Query(description="Last day (UTC, inclusive)")] = None,
        agent: str | None = None,
        model: str | None = None,
        group_by: Annotated[
            list[Literal["day", "agent", "model"]] | None,
            Query(description="Group by these (repeat the parameter); default all three"),
        ] = None,
    ) -> Response:
        rows = await (await read()).usage(
            since=since,
            until=until,
            agent=agent,
            model=model,
            group_by=("day", "agent", "model") if group_by is None else group_by,
        )
        return json_response(rows)

    @r.get(
        "/dead-letters",
        response_class=Response,
        responses=ok(schema_of(Page[DeadLetterRow]), "Dead letters, newest first"),
        summary="Dead-lettered activations",
    )
    async def dead_letters(
        agent: str | None = None,
        run_id: UUID | None = None,
        status: Literal["open", "redriven"] | None = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Response:
        page = await (await read()).dead_letters(
            agent=agent, run_id=run_id, status=status, limit=limit, cursor=cursor
        )
        return json_response(page)

    @r.get(
        "/circuit-transitions",
        response_class=Response,
        responses=ok(schema_of(Page[CircuitTransitionRow]), "Transitions, newest first"),
        summary="Circuit-breaker transitions",
    )
    async def circuit_transitions(
        name: Annotated[str | None, Query(description="The circuit (tool) name")] = None,
        since: Since = None,
        until: Until = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Response:
        page = await (await read()).circuit_transitions(
            name=name, since=since, until=until, limit=limit, cursor=cursor
        )
        return json_response(page)

    @r.post(
        "/runs/{run_id}/approvals/{approval_id}",
        response_class=Response,
        responses={
            **ok(schema_of(Decision), "The decision, recorded"),
            409: _error("The approval was decided already (code `approval_already_decided`)"),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": schema_of(DecisionBody)}},
            }
        },
        summary="Decide a waiting approval",
        tags=["approvals"],
        description="Approve or deny an `approval.requested` of the run. The decision is "
        "recorded as `approval.decided` with `by` naming the API token's holder (and the "
        "`by` of the body, when given); the run goes on. 404 if the run has no such "
        "approval, 409 if it was decided already (by someone, or by its deadline's "
        "default), 422 for a body that is not `{approved: bool, comment?: str, by?: str}`.",
    )
    async def decide_approval(run_id: UUID, approval_id: UUID, request: Request) -> Response:
        try:
            body = msgspec.json.decode(await request.body(), type=DecisionBody)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidBody(f"the body must be {{approved: bool, comment?: str, "
                              f"by?: str}}: {exc}") from None  # fmt: skip
        by = API_IDENTITY if not body.by else f"{API_IDENTITY}:{body.by}"
        log = await backend.log()
        try:
            await approvals.decide(log, approval_id, approved=body.approved, by=by,
                                   comment=body.comment, run_id=run_id)  # fmt: skip
        except ApprovalNotFound:
            raise ApprovalMissing(f"run {run_id} has no approval {approval_id}") from None
        except AlreadyDecided as exc:
            raise ApprovalConflict(exc.message) from None
        decision = Decision(approval_id=approval_id, run_id=run_id, approved=body.approved,
                            by=by, comment=body.comment)  # fmt: skip
        return json_response(decision)

    return r
