"""The runs table: filters, pages, and live updates while the system runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from projections.queries import STATUSES
from projections.ui.app import UI

#: Runs per page of the table.
PAGE_SIZE = 50


@dataclass
class RunFilters:
    """The table's filters as the form sends them (empty fields are no filter), parsed;
    ``errors`` name the fields that did not parse (shown beside the form, not a 422)."""

    status: str = ""
    agent: str = ""
    source: str = ""
    since: str = ""
    until: str = ""
    min_cost: str = ""
    max_cost: str = ""
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, request: Request) -> RunFilters:
        q = request.query_params
        f = cls()
        for name in ("status", "agent", "source", "since", "until", "min_cost", "max_cost"):
            setattr(f, name, (q.get(name) or "").strip())
        if f.status and f.status not in STATUSES:
            f.errors["status"] = f"one of {', '.join(STATUSES)}"
        for name in ("since", "until"):
            f._time(name)
        for name in ("min_cost", "max_cost"):
            f._cost(name)
        return f

    def _time(self, name: str) -> datetime | None:
        text = getattr(self, name)
        if not text:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            self.errors[name] = "a date and time, like 2026-12-01T09:30"
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)  # the form's times are UTC

    def _cost(self, name: str) -> float | None:
        text = getattr(self, name)
        if not text:
            return None
        try:
            value = float(text.removeprefix("$"))
        except ValueError:
            value = -1.0
        if not value >= 0 or value == float("inf"):
            self.errors[name] = "a number of dollars, 0 or more"
            return None
        return value

    def query(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`ReadModels.runs`."""
        return {
            "status": self.status or None,
            "agent": self.agent or None,
            "source": self.source or None,
            "since": self._time("since"),
            "until": self._time("until"),
            "min_cost": self._cost("min_cost"),
            "max_cost": self._cost("max_cost"),
        }

    def params(self) -> dict[str, str]:
        """The non-empty filters, for links (the next page keeps them)."""
        return {k: v for k, v in vars(self).items() if k != "errors" and v}


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/")
    async def runs_page(request: Request, cursor: str | None = None) -> Response:
        filters = RunFilters.of(request)
        page = None
        if not filters.errors:
            models = await ui.models()
            page = await models.runs(**filters.query(), limit=PAGE_SIZE, cursor=cursor or None)
        template = "runs_table.html" if request.headers.get("hx-target") == "runs" else "runs.html"
        return ui.render(request, template, page=page, filters=filters, statuses=STATUSES,
                         cursor=cursor or "")  # fmt: skip

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
