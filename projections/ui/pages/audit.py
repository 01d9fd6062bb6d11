"""The audit trail: who did what, when, searched by run, agent, type, time and words."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from projections.ui.app import UI
from projections.ui.filters import Form, error_status

#: Entries per page.
PAGE_SIZE = 50
#: The search form's fields (the query string's names).
FIELDS = ("run_id", "agent", "type", "since", "until", "q")


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/audit")
    async def audit_page(request: Request, cursor: str | None = None) -> Response:
        form = Form(request, FIELDS)
        query = {
            "run_id": form.uuid("run_id"),
            "agent": form.text("agent"),
            "type": form.text("type"),
            "since": form.time("since"),
            "until": form.time("until"),
            "text": form.text("q", max_length=500),
        }
        form.order("since", "until", query["since"], query["until"])
        page = None
        if not form.errors:
            models = await ui.models()
            page = await models.audit(**query, limit=PAGE_SIZE, cursor=cursor or None)  # type: ignore[arg-type]
        status = error_status(request, form)
        fragment = request.headers.get("hx-target") == "audit"
        template = "audit_results.html" if fragment else "audit.html"
        return ui.render(request, template, status, page=page, form=form, cursor=cursor or "")
