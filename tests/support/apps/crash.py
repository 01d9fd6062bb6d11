"""The agent the kill -9 test runs: one LLM step, one tool step, one emitted event per order."""

from __future__ import annotations

import asyncio
import os
import time

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.effects.tools import ToolContext, tool
from tests.support.apps.orders import OrderPlaced, StockReserved


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line)


@tool
async def reserve(ctx: ToolContext, sku: str, priority: str) -> str:
    """Reserve stock for an order at a priority."""
    await asyncio.sleep(float(os.environ.get("ORDERS_TOOL_DELAY", "0")))
    calls = os.environ.get("ORDERS_CALLS")
    if calls:
        line = f"{ctx.activation_id} {ctx.step} {time.time():.6f}\n"
        await asyncio.to_thread(_append, calls, line)
    return f"{sku}:{priority}"


class Crashy(Agent):
    name = "crashy"
    subscribes = (OrderPlaced,)
    system = "Classify the order's priority. Reply with one of: urgent, normal"
    tools = (reserve,)

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        answer = await ctx.llm(f"Order {event.order_id}: {event.quantity} x {event.sku}")
        priority = "urgent" if "urgent" in answer.text else "normal"
        reservation = await ctx.tool(reserve, sku=event.sku, priority=priority)
        ctx.emit(StockReserved(order_id=event.order_id, reservation=reservation))


agents = [Crashy()]
