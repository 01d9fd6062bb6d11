"""The log's stream ids: every stream the runtime writes is named here, nowhere else.

A run is everything caused by one ingress event; its events live in ``run-<id>``.
"""

from __future__ import annotations

from uuid import UUID


def run_stream(run_id: UUID) -> str:
    """The run's own stream: its trigger, what its agents emitted, their completions."""
    return f"run-{run_id}"


def activation_stream(activation_id: UUID) -> str:
    """The durable steps of one activation, at version = step number (promise 3)."""
    return f"act-{activation_id}"


def circuit_stream(name: str) -> str:
    """A circuit breaker's state transitions."""
    return f"circuit-{name}"


def dead_letters_stream(agent: str) -> str:
    """Dead letters of an agent that have no run (an entry that never decoded)."""
    return f"dead-letters-{agent}"


def timers_stream(agent: str) -> str:
    """Timers an agent scheduled outside any run."""
    return f"timers-{agent}"
