"""A small agent app for the runtime tests: an order comes in, a tool reserves stock, events follow.

Knobs come from the environment so that subprocess workers (the kill -9 test)
run exactly this code: ``ORDERS_TOOL_DELAY`` (seconds a tool call takes) and
``ORDERS_CALLS`` (a file each tool call appends a line to, with its idempotency key).
"""

from __future__ import annotations

import asyncio
import os

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.effects.tools import ToolContext, tool
from runtime.events.model import Event


class OrderPlaced(Event, tag="orders.placed"):
    order_id: str
    sku: str
    quantity: int = 1
    #: Test knob: the handler raises while this is true.
    fail: bool = False


class StockReserved(Event, tag="orders.stock_reserved"):
    order_id: str
    reservation: str


class OrderAudited(Event, tag="orders.audited"):
    order_id: str
    seen_by: str


@tool
async def reserve_stock(ctx: ToolContext, sku: str, quantity: int) -> str:
    """Reserve items of a SKU; returns the reservation id."""
    delay = float(os.environ.get("ORDERS_TOOL_DELAY", "0"))
    if delay:
        await asyncio.sleep(delay)
    calls = os.environ.get("ORDERS_CALLS")
    if calls:
        line = f"{ctx.idempotency_key} {ctx.activation_id} {ctx.step}\n"
        await asyncio.to_thread(_append, calls, line)
    if os.environ.get("ORDERS_TOOL_FAIL"):
        raise ConnectionError("the stock service is down")
    return f"res-{sku}-{quantity}-{ctx.idempotency_key[:8]}"


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line)


class Fulfilment(Agent):
    name = "fulfilment"
    subscribes = (OrderPlaced,)
    tools = (reserve_stock,)

    async def handle(self, event: OrderPlaced, ctx: Context) -> None:
        if event.fail:
            raise RuntimeError(f"cannot fulfil order {event.order_id}")
        reservation = await ctx.tool(reserve_stock, sku=event.sku, quantity=event.quantity)
        ctx.emit(StockReserved(order_id=event.order_id, reservation=reservation))


class Auditor(Agent):
    name = "auditor"
    subscribes = (StockReserved,)
    reads_ingress = False

    def initial_state(self) -> list[str]:
        return []

    def evolve(self, state: list[str], event: object) -> list[str]:
        return [*state, getattr(event, "event_type", "?")]

    async def handle(self, event: StockReserved, ctx: Context) -> None:
        ctx.emit(OrderAudited(order_id=event.order_id, seen_by=f"{len(ctx.state)} earlier"))


agents = [Fulfilment(), Auditor()]
