"""The runs table: filters, pages, and live updates while the system runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from markupsafe import Markup, escape
from sse_starlette import EventSourceResponse, ServerSentEvent

from projections.queries import STATUSES, RunRow
from projections.ui.app import UI, ms_text, usd_text, when_text
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


def table_rows(runs: list[RunRow]) -> Markup:
    """The table's rows, one f-string each rather than a Jinja loop: at 50 rows the loop
    cost as much as the query itself (a page should cost at most twice its JSON). Every
    value from the read model is escaped."""
    out: list[str] = []
    for run in runs:
        rid = str(run.run_id)
        fork = (
            f' <span class="badge" title="forked from {run.parent_run_id}">fork</span>'
            if run.parent_run_id
            else ""
        )
        states = "".join(
            f' <span class="muted">{escape(a)}: {escape(s)}</span>' for a, s in run.states.items()
        )
        status = escape(run.status)
        out.append(
            f'<tr><td class="mono"><a href="/ui/runs/{rid}" aria-label="Run {rid}">{rid[:8]}</a>'
            f"{fork}</td>"
            f'<td><span class="badge {status}">{status.replace("_", " ")}</span>{states}</td>'
            f"<td>{escape(run.trigger_type or '-')}</td><td>{escape(run.source or '-')}</td>"
            f"<td>{escape(', '.join(run.agents))}</td><td>{when_text(run.started_at)}</td>"
            f'<td class="num">{ms_text(run.duration_ms)}</td><td class="num">{run.llm_calls}</td>'
            f'<td class="num">{run.tool_calls}</td>'
            f'<td class="num">{run.input_tokens + run.output_tokens:,}</td>'
            f'<td class="num">{usd_text(run.cost_usd)}</td></tr>\n'
        )
    return Markup("".join(out))


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/")
    async def runs_page(request: Request, cursor: str | None = None) -> Response:
        filters, query = run_filters(request)
        page = rows = None
        if not filters.errors:
            models = await ui.models()
            page = await models.runs(**query, limit=PAGE_SIZE, cursor=cursor or None)
            rows = table_rows(page.items)
        template = "runs_table.html" if request.headers.get("hx-target") == "runs" else "runs.html"
        status = error_status(request, filters)
        return ui.render(request, template, status, page=page, rows=rows, filters=filters,
                         statuses=STATUSES, cursor=cursor or "")  # fmt: skip

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
