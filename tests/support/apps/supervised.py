"""A supervisor and its specialists, for the supervisor-worker tests (public API only).

The offline model plans deterministically: the plan type asks for exactly
three subtasks, and the offline model fills each subtask's ``worker`` and
``description`` from the request's quoted strings in turn, ``timeout`` from
``timeout N`` (see ``runtime/llm/offline/schemas.py``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

import msgspec

from runtime import Context, Event, Plan, Specialist, Subtask, Supervision, Supervisor, TaskAssigned


class ResearchRequested(Event, tag="tests.research_requested"):
    text: str


class ThreePlan(Plan):
    subtasks: Annotated[list[Subtask], msgspec.Meta(min_length=3, max_length=3)]


class Researcher(Specialist):
    name = "researcher"
    system = "You look facts up about customers' orders."


class Writer(Specialist):
    name = "writer"
    system = "You write short replies to customers."


class Broken(Specialist):
    """Fails every subtask (a tool that is down, say)."""

    name = "broken"

    async def perform(self, task: TaskAssigned, ctx: Context) -> Any:
        raise LookupError(f"nothing found for {task.description!r}")


class Slow(Specialist):
    """Answers long after any sensible timeout (``SLOW_SECONDS``, default 60)."""

    name = "slow"

    async def perform(self, task: TaskAssigned, ctx: Context) -> Any:
        await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "60")))
        return "too late"


class Lead(Supervisor):
    name = "lead"
    subscribes = (ResearchRequested,)
    workers = (Researcher, Writer, Broken, Slow)
    plan_type = ThreePlan

    def request(self, event: Event) -> str:
        assert isinstance(event, ResearchRequested)
        return event.text

    async def synthesise(self, supervision: Supervision, ctx: Context) -> Any:
        done = [t.worker for t in supervision.outcomes if t.status == "completed"]
        summary = await super().synthesise(supervision, ctx)
        return {"summary": summary, "from": done}


class NoPlan(ThreePlan):
    """A plan no answer satisfies (a rule the schema cannot say)."""

    def __post_init__(self) -> None:
        raise ValueError("every subtask needs a budget line")


class Unplannable(Lead):
    name = "unplannable"
    plan_type = NoPlan


def request(*workers: str, timeout: float) -> ResearchRequested:
    """A request the offline model plans as one subtask per worker, in this order."""
    parts = " ".join(f'"{w}" "task for {w}"' for w in workers)
    return ResearchRequested(text=f"Handle the customer email. {parts} timeout {timeout}")


agents = [Lead(), Researcher(), Writer(), Broken(), Slow()]
#: A deployment whose slow worker pool is down (its subtasks can only time out).
team = [Lead(), Researcher(), Writer()]
