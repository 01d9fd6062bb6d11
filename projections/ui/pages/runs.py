"""The runs table: filters, pages, and live updates while the system runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from projections.queries import STATUSES
from projections.ui.app import UI
from projections.ui.filters import Form, error_status

#: Runs per page of the table.
PAGE_SIZE = 50
FIELDS = ("status", "agent", "source", "since", "until", "min_cost", "max_cost")


def run_filters(request: Request) -> tuple[Form, dict[str, Any]]:
    """The table's filters as the form sends them (empty fields are no filter), and the
    keyword arguments of :meth:`ReadModels.runs` they make (fields that did not parse are
    in the form's ``errors``)."""
    form = Form(request, FIELDS)
    status = form.text("status")
    if status is not None and status not in STATUSES:
        form.errors["status"] = f"one of {', '.join(STATUSES)}"
    query = {
        "status": status,
        "agent": form.text("agent"),
        "source": form.text("source"),
        "since": form.time("since"),
        "until": form.time("until"),
        "min_cost": form.cost("min_cost"),
        "max_cost": form.cost("max_cost"),
    }
    form.order("since", "until", query["since"], query["until"])
    form.order("min_cost", "max_cost", query["min_cost"], query["max_cost"])
    return form, query


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/")
    async def runs_page(request: Request, cursor: str | None = None) -> Response:
        filters, query = run_filters(request)
        page = None
        if not filters.errors:
            models = await ui.models()
            page = await models.runs(**query, limit=PAGE_SIZE, cursor=cursor or None)
        template = "runs_table.html" if request.headers.get("hx-target") == "runs" else "runs.html"
        return ui.render(request, template, error_status(request, filters), page=page,
                         filters=filters, statuses=STATUSES, cursor=cursor or "")  # fmt: skip

    @r.get("/runs")
    async def runs_alias(request: Request, cursor: str | None = None) -> Response:
        return await runs_page(request, cursor)

    @r.get("/live")
    async def live(request: Request) -> Response:
        """Server-sent events: ``log`` when the log grows, ``runs`` when the runs read model
        has folded new events (the data is the position)."""

        async def events() -> AsyncIterator[ServerSentEvent]:
            async for name, position in ui.watch.changes():
                yield ServerSentEvent(data=str(position), event=name)

        return EventSourceResponse(events(), ping=15, headers={"cache-control": "no-store"})
