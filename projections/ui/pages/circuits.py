"""Circuit breakers: each tool's current state and the history of its transitions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from projections.queries import CircuitTransitionRow
from projections.ui.app import UI
from projections.ui.filters import Form, error_status

#: Transitions per page.
PAGE_SIZE = 50


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/circuits")
    async def circuits_page(request: Request, cursor: str | None = None) -> Response:
        form = Form(request, ("name",))
        name = form.text("name")
        page = None
        states: list[CircuitTransitionRow] = []
        if not form.errors:
            models = await ui.models()
            page = await models.circuit_transitions(name=name, limit=PAGE_SIZE,
                                                    cursor=cursor or None)  # fmt: skip
            # A circuit's state is its last transition's (one that never tripped is closed).
            states = await models.circuit_states()
        return ui.render(request, "circuits.html", error_status(request, form), form=form,
                         page=page, states=states, cursor=cursor or "")  # fmt: skip
