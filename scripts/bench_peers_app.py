"""The agent ``scripts/bench_peers.py`` runs in ``agentrt worker``: a durable three-step workflow.

On each ``bench_peers.requested`` event the ``bench_peers`` agent calls three
trivial tools, each a durable step (recorded in the log before the handler
goes on, through the tool's circuit breaker), then emits ``bench_peers.done``
with a result built from the three, which commits with the activation. The
same workflow as the DBOS and LangGraph ones in the benchmark: three steps
returning small dicts, and a recorded result.

Public API only, as an application would write it. Run with
``agentrt worker --app bench_peers_app`` (``scripts/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

from runtime import Agent, Context, Event, ToolContext, tool


class WorkRequested(Event, tag="bench_peers.requested"):
    """One workflow to run (what the benchmark writes into the ingress streams)."""

    seq: int


class WorkDone(Event, tag="bench_peers.done"):
    """The workflow's recorded result."""

    seq: int
    total: int


@tool
async def step_one(ctx: ToolContext, seq: int) -> dict[str, int]:
    """The first step: a small dict."""
    return {"seq": seq, "step": 1}


@tool
async def step_two(ctx: ToolContext, seq: int) -> dict[str, int]:
    """The second step: a small dict."""
    return {"seq": seq, "step": 2}


@tool
async def step_three(ctx: ToolContext, seq: int) -> dict[str, int]:
    """The third step: a small dict."""
    return {"seq": seq, "step": 3}


class ThreeSteps(Agent):
    name = "bench_peers"
    subscribes = (WorkRequested,)
    tools = (step_one, step_two, step_three)

    async def handle(self, event: WorkRequested, ctx: Context) -> None:
        one = await ctx.tool(step_one, seq=event.seq)
        two = await ctx.tool(step_two, seq=one["seq"])
        three = await ctx.tool(step_three, seq=two["seq"])
        ctx.emit(WorkDone(seq=event.seq, total=one["step"] + two["step"] + three["step"]))


agents = [ThreeSteps()]
