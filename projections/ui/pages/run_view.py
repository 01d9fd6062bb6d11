"""What the run page draws, computed in Python: the timeline's rows with their waterfall
bars, a step's prompt, response and calls as display blocks, a tool's circuit state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape as esc
from typing import Any, NamedTuple

import msgspec
from markupsafe import Markup

from projections.queries import CircuitTransitionRow, TimelineEntry
from runtime.events.builtin import StepRecorded

#: The waterfall's SVG is this many units wide (its viewBox); bars are placed in them.
WIDTH = 1000.0
#: The narrowest bar drawn (an instant, or a step far shorter than the run), in units.
MIN_WIDTH = 3.0
#: Indentation steps of the tree (deeper entries are indented as much as this).
MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class Waterfall:
    #: The timeline table's rows, as HTML (see :func:`waterfall`).
    rows: Markup
    span_ms: float


def waterfall(run_id: Any, entries: Sequence[TimelineEntry], started: datetime) -> Waterfall:
    """The timeline's rows: each entry indented by its depth in the causation tree, with
    its bar from its start (``recorded_at - duration_ms``) to its end, on one scale from
    the run's first moment to its last.

    The rows are written here, one f-string each, rather than by a Jinja loop: for a run
    of 1,000 events that loop cost three times what the timeline's query does (a page
    must cost at most twice the JSON timeline). Every value from the log is escaped.
    """
    if not entries:
        return Waterfall(Markup(""), 0.0)
    # Milliseconds since the epoch: float arithmetic in the loop, not datetime's.
    ends = [e.recorded_at.timestamp() * 1000.0 for e in entries]
    first = min(end - (e.duration_ms or 0.0) for e, end in zip(entries, ends, strict=True))
    t0 = min(first, started.timestamp() * 1000.0)
    span = max(max(ends) - t0, 1.0)
    scale = WIDTH / span
    base = f"/ui/runs/{run_id}"
    out: list[str] = []
    append = out.append
    for e, end in zip(entries, ends, strict=True):
        d = e.duration_ms or 0.0
        start = end - d - t0
        w = max(d * scale, MIN_WIDTH)
        x = min(start * scale, WIDTH - w)
        kind = "steps" if e.event_type == "step.recorded" else "events"
        append(
            f'<tr class="k-{esc(e.kind or "event")}"><td class="tree i{min(e.depth, MAX_DEPTH)}">'
            f'<details hx-get="{base}/{kind}/{e.position}" hx-trigger="toggle once" '
            f'hx-target="find .detail"><summary><span class="et">{esc(e.event_type)}</span> '
            f'{esc(e.summary)}</summary><div class="detail">Loading…</div></details></td>'
            f'<td>{esc(e.agent or "-")}</td><td class="num">+{ms(start)}</td>'
            f'<td class="num">{"-" if e.duration_ms is None else ms(d)}</td>'
            '<td class="wf-col"><svg class="wf" viewBox="0 0 1000 10" '
            'preserveAspectRatio="none" aria-hidden="true">'
            f'<rect class="{"timed" if d else "instant"}" x="{x:.1f}" y="1" width="{w:.1f}" '
            'height="8"/></svg></td></tr>\n'
        )
    return Waterfall(Markup("".join(out)), span)


def ms(value: float) -> str:
    """A duration for people (the UI's ``ms`` filter, without its None case)."""
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 60_000:
        return f"{value / 1000:.1f} s"
    return f"{value / 60_000:.1f} min"


def pretty(value: Any) -> str:
    """JSON, indented, for a <pre> (the log's values are JSON already)."""
    text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
    return text


class Block(NamedTuple):
    """One content block of a prompt or a response, ready to show."""

    #: text, tool_use, tool_result or other
    kind: str
    text: str
    #: The tool's name (tool_use), or the id of the call answered (tool_result).
    label: str = ""
    error: bool = False


class Message(NamedTuple):
    role: str
    blocks: list[Block]


@dataclass(frozen=True, slots=True)
class ModelView:
    """A model step: what was asked (system, messages, tools offered) and answered."""

    system: list[Block]
    messages: list[Message]
    tools: list[str]
    #: The request's other fields: scalars shown inline, the rest as JSON.
    settings: dict[str, Any]
    options: str
    response: list[Block]
    stop_reason: str | None

    @property
    def tool_calls(self) -> list[Block]:
        return [b for b in self.response if b.kind == "tool_use"]


def blocks(content: Any) -> list[Block]:
    """A Messages API ``content`` (a string or a list of blocks) as display blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Block("text", content)]
    if not isinstance(content, list):
        return [Block("other", pretty(content))]
    out = []
    for b in content:
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            out.append(Block("text", b["text"]))
        elif kind == "tool_use":
            out.append(Block("tool_use", pretty(b.get("input")), str(b.get("name", "?"))))
        elif kind == "tool_result":
            inner = b.get("content")
            text = inner if isinstance(inner, str) else pretty(inner)
            out.append(Block("tool_result", text, str(b.get("tool_use_id", "?")),
                             bool(b.get("is_error"))))  # fmt: skip
        else:
            out.append(Block("other", pretty(b)))
    return out


def model_view(step: StepRecorded) -> ModelView:
    request = step.request if isinstance(step.request, dict) else {}
    result = step.result if isinstance(step.result, dict) else {}
    messages = [
        Message(str(m.get("role", "?")), blocks(m.get("content")))
        for m in request.get("messages") or []
        if isinstance(m, dict)
    ]
    tools = [str(t.get("name", "?")) for t in request.get("tools") or [] if isinstance(t, dict)]
    shown = ("system", "messages", "tools")
    rest = {k: v for k, v in request.items() if k not in shown}
    settings = {k: v for k, v in rest.items() if not isinstance(v, dict | list)}
    options = {k: v for k, v in rest.items() if k not in settings}
    return ModelView(
        system=blocks(request.get("system")),
        messages=messages,
        tools=tools,
        settings=settings,
        options=pretty(options) if options else "",
        response=blocks(result.get("content")) if result else [],
        stop_reason=result.get("stop_reason") if result else None,
    )


@dataclass(frozen=True, slots=True)
class CircuitView:
    """A tool's breaker around one of its calls, from the ``circuit_transitions`` read
    model: its state when the call started and the transitions while it ran."""

    #: closed, open, half_open, or unknown (more transitions during the call than were read).
    before: str
    since: CircuitTransitionRow | None
    during: list[CircuitTransitionRow]


def circuit_view(
    recent: Sequence[CircuitTransitionRow], started: datetime, ended: datetime, *, complete: bool
) -> CircuitView:
    """``recent``: the tool's last transitions ordered before the step in the log, newest
    first (a call's own transitions are logged before its step is); ``complete``: they are
    all there are, not the first of a page."""
    during = [t for t in recent if started <= t.at <= ended]
    before = next((t for t in recent if t.at < started), None)
    state = before.to_state if before else "closed" if complete else "unknown"
    return CircuitView(state, before, during[::-1])
