"""Circuit breakers: each tool's current state and the history of its transitions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from projections.queries import MAX_LIMIT, CircuitTransitionRow
from projections.ui.app import UI
from projections.ui.filters import Form, error_status

#: Transitions per page.
PAGE_SIZE = 50


def current(rows: list[CircuitTransitionRow]) -> list[CircuitTransitionRow]:
    """The newest transition of each circuit (rows newest first), by name."""
    latest: dict[str, CircuitTransitionRow] = {}
    for row in rows:
        latest.setdefault(row.name, row)
    return sorted(latest.values(), key=lambda r: r.name)


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
            states = current((await models.circuit_transitions(limit=MAX_LIMIT)).items)
        return ui.render(request, "circuits.html", error_status(request, form), form=form,
                         page=page, states=states, cursor=cursor or "")  # fmt: skip
