"""Causation order: a run's events as a tree, each trigger before what it caused.

In log order a run's first steps come before its trigger (they are appended
as they happen; the trigger commits with the activation). Readers that show a
run (``agentrt demo``, ``agentrt runs show``, the timeline API) order it by
causation instead: depth first, siblings in log order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def causation_order(
    rows: Sequence[Sequence[Any]], *, id_at: int, cause_at: int
) -> list[tuple[int, int, Any]]:
    """Depth-first by causation, siblings in the order given (log order): the
    (index, depth, parent id) of every row. A row whose cause is not among the rows
    is a root; a cycle (impossible in a sound log) cannot hide rows: what the walk
    misses is appended as roots."""
    index = {row[id_at]: i for i, row in enumerate(rows)}
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for i, row in enumerate(rows):
        parent = index.get(row[cause_at])
        if parent is None or parent == i:
            roots.append(i)
        else:
            children.setdefault(parent, []).append(i)
    out: list[tuple[int, int, Any]] = []
    seen = bytearray(len(rows))
    for root in roots:
        stack = [(root, 0, None)]
        while stack:
            i, depth, parent_id = stack.pop()
            if seen[i]:
                continue
            seen[i] = 1
            out.append((i, depth, parent_id))
            kids = children.get(i)
            if kids:
                me = rows[i][id_at]
                stack.extend((k, depth + 1, me) for k in reversed(kids))
    if len(out) < len(rows):
        out.extend((i, 0, None) for i in range(len(rows)) if not seen[i])
    return out
