"""Server-rendered SVG bar charts (no JavaScript, no inline styles: classes from app.css).

A chart is decoration for the eye; the page puts the same figures in a table beside it
for screen readers, so the SVG is one labelled image (``role="img"`` and a ``<title>``)
whose bars carry their own ``<title>`` (a tooltip) too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

#: Pixels: a bar's row, the label column, the bar area, the value column.
ROW = 24
LABEL_WIDTH = 130
BAR_WIDTH = 200
VALUE_WIDTH = 80
#: Characters of a label shown (the full label is in the bar's <title> and the table).
LABEL_CHARS = 18

_ids = itertools.count(1)


def _label(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def bar_chart(
    bars: Sequence[tuple[str, float]],
    *,
    title: str,
    value: Callable[[float], str] = lambda v: f"{v:,.0f}",
) -> Markup:
    """A horizontal bar chart of ``(label, value)`` pairs, bars scaled to the largest
    value (negative values count as 0); ``value`` formats the figures shown."""
    n = next(_ids)
    width = LABEL_WIDTH + BAR_WIDTH + VALUE_WIDTH
    if not bars:
        return Markup(
            f'<svg class="chart" role="img" aria-labelledby="chart-{n}" width="{width}" '
            f'height="{ROW * 2}" viewBox="0 0 {width} {ROW * 2}" xmlns="http://www.w3.org/2000/svg">'
            f'<title id="chart-{n}">{escape(title)}: no data</title>'
            f'<text class="chart-empty" x="8" y="{ROW}">No data in this range</text></svg>'
        )
    top = max(max(v, 0.0) for _, v in bars)
    height = ROW * len(bars) + 8
    parts = [
        f'<svg class="chart" role="img" aria-labelledby="chart-{n}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-{n}">{escape(title)}</title>',
    ]
    for i, (label, v) in enumerate(bars):
        y = 4 + i * ROW
        length = 0.0 if top <= 0 else max(v, 0.0) / top * BAR_WIDTH
        shown = value(v)
        parts.append(
            f'<g class="bar"><title>{escape(label)}: {escape(shown)}</title>'
            f'<text class="chart-label" x="{LABEL_WIDTH - 6}" y="{y + ROW * 0.65:.1f}" '
            f'text-anchor="end">{escape(_label(label))}</text>'
            f'<rect class="chart-bar" x="{LABEL_WIDTH}" y="{y + 3}" width="{length:.1f}" '
            f'height="{ROW - 6}"></rect>'
            f'<text class="chart-value" x="{LABEL_WIDTH + length + 6:.1f}" '
            f'y="{y + ROW * 0.65:.1f}">{escape(shown)}</text></g>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
