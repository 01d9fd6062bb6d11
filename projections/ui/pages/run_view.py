"""What the run page draws, computed in Python so its template stays a plain loop: the
waterfall's bars and a step's prompt, response and calls as display blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import msgspec

from projections.queries import CircuitTransitionRow, TimelineEntry
from runtime.events.builtin import StepRecorded

#: The waterfall's SVG is this many units wide (its viewBox); bars are placed in them.
WIDTH = 1000.0
#: The narrowest bar drawn (an instant, or a step far shorter than the run), in units.
MIN_WIDTH = 3.0
#: Indentation steps of the tree (deeper entries are indented as much as this).
MAX_DEPTH = 16


class Row(NamedTuple):
    """One timeline entry with its bar: ``x``/``w`` in viewBox units, as SVG attributes."""

    e: TimelineEntry
    x: str
    w: str
    #: Milliseconds from the run's first moment to the entry's start.
    offset: float
    #: ``timed`` (it has a duration), else ``instant`` (a mark where it was recorded).
    bar: str
    indent: int
    #: The fragment with its detail (a step's, or the event's).
    detail: str


@dataclass(frozen=True, slots=True)
class Waterfall:
    rows: list[Row]
    start: datetime | None
    span_ms: float


def waterfall(run_id: Any, entries: Sequence[TimelineEntry], started: datetime) -> Waterfall:
    """The bars of ``entries``: each from its start (``recorded_at - duration_ms``) to its
    end, on one scale from the run's first moment to its last."""
    if not entries:
        return Waterfall([], None, 0.0)
    starts = [_start(e) for e in entries]
    t0 = min(min(starts), started)
    t1 = max(e.recorded_at for e in entries)
    span = max((t1 - t0) / timedelta(milliseconds=1), 1.0)
    scale = WIDTH / span
    ms = timedelta(milliseconds=1)
    base = f"/ui/runs/{run_id}"
    rows = []
    for e, s in zip(entries, starts, strict=True):
        x = (s - t0) / ms * scale
        timed = bool(e.duration_ms)
        w = max((e.duration_ms or 0.0) * scale, MIN_WIDTH)
        x = min(x, WIDTH - w)
        kind = "steps" if e.event_type == "step.recorded" else "events"
        rows.append(
            Row(e, f"{x:.1f}", f"{w:.1f}", (s - t0) / ms, "timed" if timed else "instant",
                min(e.depth, MAX_DEPTH), f"{base}/{kind}/{e.position}")
        )  # fmt: skip
    return Waterfall(rows, t0, span)


def _start(e: TimelineEntry) -> datetime:
    if e.duration_ms:
        return e.recorded_at - timedelta(milliseconds=e.duration_ms)
    return e.recorded_at


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
