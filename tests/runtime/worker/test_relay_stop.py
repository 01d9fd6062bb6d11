"""A relay told to stop stops, even while the log grows and wake-ups keep coming.

Cancelling its tail reader in the middle of a query used to leave asyncpg's
connection release pending, and the relay's stop with it (seen as a 120 s
test timeout under load; a stand-alone loop of this test's shape hung at its
2nd to 6th stop with two CPU-bound loops beside it, and never in 300 stops
since the reader ends between queries).
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis

from runtime.events.model import NewEvent
from runtime.log.store import EventLog
from runtime.streams.keys import log_wake_channel
from runtime.worker.relay import Relay
from tests.support.apps.orders import Fulfilment, OrderPlaced

STOPS = 25


async def test_a_relay_stops_promptly_while_the_log_grows(
    redis: aioredis.Redis, log: EventLog
) -> None:
    async def grow(n: int, done: asyncio.Event) -> None:
        # Ends between appends: a query cancelled in flight is the very thing to avoid.
        while not done.is_set():
            await log.append(f"run-stop-{n}", [NewEvent(body=OrderPlaced(order_id="o", sku="s"))])
            await redis.publish(log_wake_channel(log.schema), b"")
            await asyncio.sleep(0.001)

    for n in range(STOPS):
        stop = asyncio.Event()
        relay = Relay(log, redis, [Fulfilment()], poll_interval=0.05, timer_interval=0.05)
        running = asyncio.create_task(relay.run(stop))
        writing = asyncio.Event()
        writer = asyncio.create_task(grow(n, writing))
        try:
            await asyncio.sleep(0.2)
            stop.set()
            done, _ = await asyncio.wait([running], timeout=8)
            assert done, f"stop {n + 1} of {STOPS}: the relay did not stop within 8 s"
            running.result()
        finally:
            writing.set()
            await writer
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
