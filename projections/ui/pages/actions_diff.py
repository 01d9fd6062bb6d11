"""Unified diffs as two columns (recorded | replayed, run A | run B), for the action pages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

from projections.diff import ActivationDiff, RunDiff, StepDiff

RowKind = Literal["same", "changed", "removed", "added", "hunk", "note"]


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of a side-by-side diff: the left and right text (None: nothing there)."""

    kind: RowKind
    left: str | None
    right: str | None


def side_by_side(lines: Iterable[str]) -> list[Row]:
    """The rows of unified diff ``lines``, split view: a run of removed lines is paired
    with the run of added lines after it, context on both sides. A line that is no part
    of a diff (a truncation mark, "only run A took step 3", an event's heading) becomes a
    ``note`` spanning both columns, and a diff may start again after it."""
    rows: list[Row] = []
    removed: list[str] = []
    added: list[str] = []
    in_hunk = False

    def flush() -> None:
        for i in range(max(len(removed), len(added))):
            left = removed[i] if i < len(removed) else None
            right = added[i] if i < len(added) else None
            kind: RowKind = "changed" if left is not None and right is not None else (
                "removed" if left is not None else "added")  # fmt: skip
            rows.append(Row(kind, left, right))
        removed.clear()
        added.clear()

    for line in lines:
        if not in_hunk and line.startswith(("--- ", "+++ ")):
            continue  # the file headers: the columns' headings say which is which
        if line.startswith("@@"):
            flush()
            rows.append(Row("hunk", line, line))
            in_hunk = True
        elif in_hunk and line.startswith("-"):
            if added:  # a removal after an addition starts a new change
                flush()
            removed.append(line[1:])
        elif in_hunk and line.startswith("+"):
            added.append(line[1:])
        elif in_hunk and line.startswith(" "):
            flush()
            rows.append(Row("same", line[1:], line[1:]))
        else:
            flush()
            rows.append(Row("note", line, None))
            in_hunk = False
    flush()
    return rows


@dataclasses.dataclass(frozen=True, slots=True)
class StepView:
    step: StepDiff
    rows: list[Row]
    first: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ActivationView:
    """An aligned pair of activations as the diff page shows it."""

    diff: ActivationDiff
    #: same, only-a, only-b or differs.
    status: str
    steps: list[StepView]
    emitted: list[Row]
    #: This activation holds the runs' first difference (as ``RunDiff.first_difference``).
    first: bool
    #: ... and it is not one of its steps (the activation itself, its events or outcome).
    first_here: bool


def activation_views(d: RunDiff) -> list[ActivationView]:
    """Each activation of the diff, the first difference marked where
    :attr:`RunDiff.first_difference` finds it."""
    views: list[ActivationView] = []
    found = False
    for a in d.activations:
        status = "same" if a.same else f"only-{a.only_in}" if a.only_in else "differs"
        first = not found and not a.same
        found = found or first
        # The first difference is its first step's unless the pair parts before any step.
        in_step = first and a.only_in is None and a.trigger_type_a == a.trigger_type_b
        in_step = in_step and bool(a.steps)
        steps = [StepView(s, side_by_side(s.diff), in_step and i == 0)
                 for i, s in enumerate(a.steps)]  # fmt: skip
        views.append(ActivationView(a, status, steps, side_by_side(a.emitted), first,
                                    first and not in_step))  # fmt: skip
    return views
