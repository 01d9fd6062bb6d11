"""Usage: tokens and cost by model, by agent and by day, as SVG bar charts and tables."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from markupsafe import Markup

from projections.queries import UsageRow
from projections.ui.app import UI, usd_text
from projections.ui.charts import bar_chart
from projections.ui.filters import Form, error_status

#: The groupings shown, in order: (group_by, heading).
GROUPS = (("model", "By model"), ("agent", "By agent"), ("day", "By day (UTC)"))


@dataclass(frozen=True)
class Section:
    """One grouping: its rows, and charts of their tokens, cost and cache savings."""

    key: str
    heading: str
    rows: list[tuple[str, UsageRow]]
    tokens_chart: Markup
    cost_chart: Markup
    saved_chart: Markup


def _name(row: UsageRow, key: str) -> str:
    value = getattr(row, key)
    return "-" if value is None else str(value)


def section(key: str, heading: str, rows: list[UsageRow]) -> Section:
    named = [(_name(r, key), r) for r in rows]
    tokens = [(n, float(r.input_tokens + r.output_tokens)) for n, r in named]
    cost = [(n, r.cost_usd) for n, r in named]
    saved = [(n, float(r.saved_tokens)) for n, r in named]
    what = heading.lower()
    return Section(
        key, heading, named,
        bar_chart(tokens, title=f"Tokens (input and output) {what}"),
        bar_chart(cost, title=f"Cost in US dollars {what}", value=usd_text),
        bar_chart(saved, title=f"Tokens the response caches saved {what}"),
    )  # fmt: skip


def routes(r: APIRouter, ui: UI) -> None:
    @r.get("/usage")
    async def usage_page(request: Request) -> Response:
        form = Form(request, ("since", "until"))
        since, until = form.day("since"), form.day("until")
        form.order("since", "until", since, until)
        sections: list[Section] = []
        total: UsageRow | None = None
        if not form.errors:
            models = await ui.models()
            for key, heading in GROUPS:
                rows = await models.usage(since=since, until=until, group_by=(key,))
                sections.append(section(key, heading, rows))
            totals = await models.usage(since=since, until=until, group_by=())
            total = totals[0] if totals else None
        return ui.render(request, "usage.html", error_status(request, form), form=form,
                         charts=sections, total=total)  # fmt: skip
