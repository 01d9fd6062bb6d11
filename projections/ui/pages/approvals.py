"""Approvals: what waits for a person's decision, and approving or denying it.

A decision made here is recorded with ``by = "ui"``: the run explorer signs in with the
query API's one bearer token, so the UI has that token holder's identity (the JSON
route records ``api`` the same way); the optional comment is the person's own words.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
from fastapi import APIRouter, Request, Response

from projections.ui.app import UI
from runtime.errors import AlreadyDecided, ApprovalNotFound
from runtime.events.builtin import ApprovalRequested
from runtime.log import approvals

#: ``by`` of a decision made in the run explorer (see the module's docstring).
UI_IDENTITY = "ui"
#: Longest comment kept (the JSON route's limit).
MAX_COMMENT = 4000
#: Waiting approvals shown (oldest first).
MAX_SHOWN = 200


@dataclass(frozen=True)
class Waiting:
    """One approval without a decision, as the page shows it."""

    approval_id: UUID
    run_id: UUID | None
    request: ApprovalRequested
    requested_at: datetime
    details: list[tuple[str, str]]
    draft: dict[str, str] | None

    @property
    def passed(self) -> bool:
        deadline = self.request.deadline
        if deadline is None:
            return False
        return (deadline if deadline.tzinfo else deadline.replace(tzinfo=UTC)) < datetime.now(UTC)

    @property
    def default(self) -> str:
        if self.request.deadline is None:
            return "none: it waits until someone decides"
        if self.request.default == "escalate":
            return f"escalate to {self.request.escalate_to}"
        return self.request.default or "?"


def _details(details: Any) -> tuple[list[tuple[str, str]], dict[str, str] | None]:
    """The request's details as (name, text) pairs, and its draft reply when it has one."""
    if not isinstance(details, dict):
        return ([("details", msgspec.json.encode(details).decode())] if details is not None
                else []), None  # fmt: skip
    draft = details.get("draft")
    shown = [(str(k), v if isinstance(v, str) else msgspec.json.encode(v).decode())
             for k, v in details.items() if k != "draft"]  # fmt: skip
    if isinstance(draft, dict):
        return shown, {str(k): str(v) for k, v in draft.items()}
    if draft is not None:
        shown.append(("draft", str(draft)))
    return shown, None


async def waiting(ui: UI) -> list[Waiting]:
    """The approvals without a decision, oldest first (at most :data:`MAX_SHOWN`)."""
    log = await ui.backend.log()
    out = []
    for event in await approvals.pending_requests(log, MAX_SHOWN):  # one query
        asked = event.body
        assert isinstance(asked, ApprovalRequested)
        shown, draft = _details(asked.details)
        out.append(Waiting(asked.approval_id, event.run_id, asked, event.recorded_at, shown,
                           draft))  # fmt: skip
    return out


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/approvals")
    async def approvals_page(request: Request) -> Response:
        return ui.render(request, "approvals.html", waiting=await waiting(ui))

    @r.post("/runs/{run_id}/approvals/{approval_id}")
    async def decide(request: Request, run_id: UUID, approval_id: UUID) -> Response:
        form = await request.form()
        decision = form.get("decision")
        comment = form.get("comment") or ""
        if decision not in ("approve", "deny") or not isinstance(comment, str):
            return ui.render(request, "error.html", 422, title="Invalid request",
                             message="the decision must be approve or deny")  # fmt: skip
        if len(comment) > MAX_COMMENT:
            return ui.render(request, "error.html", 422, title="Invalid request",
                             message=f"a comment has at most {MAX_COMMENT} characters")  # fmt: skip
        log = await ui.backend.log()
        approved, comment = decision == "approve", comment.strip()
        try:
            await approvals.decide(log, approval_id, approved=approved, by=UI_IDENTITY,
                                   comment=comment, run_id=run_id)  # fmt: skip
        except ApprovalNotFound:
            # The same answer for an unknown approval and another run's: nothing leaks.
            return ui.render(request, "error.html", 404, title="No such approval",
                             message=f"run {run_id} has no approval {approval_id}")  # fmt: skip
        except AlreadyDecided as exc:
            return ui.render(request, "error.html", 409, title="Already decided",
                             message=f"{exc.message}; this decision was not recorded")  # fmt: skip
        return ui.render(request, "approvals_decided.html", run_id=run_id,
                         approval_id=approval_id, approved=approved, comment=comment)  # fmt: skip
