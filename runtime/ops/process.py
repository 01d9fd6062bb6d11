"""Process-wide tuning for long-running servers (the ingress, workers)."""

from __future__ import annotations

import gc


def settle_gc() -> None:
    """Move everything allocated so far out of the garbage collector's sight.

    A server's startup objects (modules, routes, schemas, decoders) live as
    long as the process, yet every full collection walks them: in the
    ingress benchmark that was a 17-47 ms pause about once a second, which
    was the whole of its p99. ``gc.freeze()`` after startup removes them from
    collections (CPython's documented use of it); new garbage is still
    collected as before.
    """
    gc.collect()
    gc.freeze()
