"""A long multi-step handler, for the checkpointing test: each step a recorded tool call.

``LONGWORK_EFFECTS`` names the file each step's side effect appends a line to;
``LONGWORK_HOLD_AFTER=N`` makes the handler stop after step N (recorded) and
wait there, writing ``N`` to ``LONGWORK_HELD``, until the test kills it.
``Unchecked`` does the same work outside ``ctx`` (no checkpoints): the broken variant.
"""

from __future__ import annotations

import asyncio
import os

from runtime import Agent, Context, ToolContext, tool
from tests.support.apps.orders import OrderPlaced, StockReserved

STEPS = 4


def _append(name: str, line: str) -> None:
    path = os.environ.get(name)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _effect(order_id: str, n: int) -> str:
    _append("LONGWORK_EFFECTS", f"{order_id} {n}")
    return f"{order_id}:{n}"


@tool
async def work(ctx: ToolContext, order_id: str, n: int) -> str:
    """One step of the long job (a side effect: a line in the effects file)."""
    return await asyncio.to_thread(_effect, order_id, n)


async def _hold(n: int) -> None:
    if os.environ.get("LONGWORK_HOLD_AFTER") == str(n):
        await asyncio.to_thread(_append, "LONGWORK_HELD", str(n))
        await asyncio.sleep(3600)  # until killed


class Checkpointed(Agent):
    name = "longjob"
    subscribes = (OrderPlaced,)
    tools = (work,)

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        done = []
        for n in range(1, STEPS + 1):
            done.append(await ctx.tool(work, order_id=event.order_id, n=n))  # a checkpoint
            await _hold(n)
        ctx.emit(StockReserved(order_id=event.order_id, reservation=",".join(done)))


class Unchecked(Checkpointed):
    """Broken on purpose: the same work, called directly instead of as steps."""

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        done = []
        for n in range(1, STEPS + 1):
            done.append(await asyncio.to_thread(_effect, event.order_id, n))
            await _hold(n)
        ctx.emit(StockReserved(order_id=event.order_id, reservation=",".join(done)))
