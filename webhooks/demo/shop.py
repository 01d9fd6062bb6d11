"""The support desk's shop: a real ``shop.orders`` table in PostgreSQL, seeded by the app,
and the tool agents use to look a customer's orders up.

The table lives in the database of ``DATABASE_URL`` (the one ``agentrt up`` starts or
is given), in a schema of its own; it is created and seeded on first use, idempotently
(several workers may start at once: an advisory lock orders them).
"""

from __future__ import annotations

import asyncio
import os
from typing import Literal

import asyncpg
import msgspec

from runtime import ToolContext, tool

SCHEMA = os.environ.get("AGENTRT_SAMPLE_SHOP_SCHEMA", "shop")

#: (order id, customer email, status, total in cents, refunded in cents, items)
SEED: tuple[tuple[str, str, str, int, int, str], ...] = (
    ("A-1042", "ada@example.com", "paid", 12900, 0, "Business plan, 12 months"),
    ("A-1043", "ada@example.com", "paid", 12900, 0, "Business plan, 12 months (duplicate charge)"),
    ("A-1101", "grace@example.com", "paid", 4900, 0, "Team plan, monthly"),
    ("A-2001", "klaus.weber@example.de", "paid", 5900, 0, "Mechanical keyboard"),
    ("A-3001", "amelie.martin@example.fr", "returned", 45900, 0, "Standing desk"),
    ("A-4001", "ana.perez@example.org", "delivered", 8900, 0, "Ceramic lamp"),
)  # fmt: skip

_LOCK = 0x5A0_5E3D  # advisory lock key of the seeding


class Order(msgspec.Struct, frozen=True):
    id: str
    status: str
    total_cents: int
    refunded_cents: int
    items: str


_pools: dict[int, asyncpg.Pool] = {}


async def _pool() -> asyncpg.Pool:
    """This event loop's pool on ``DATABASE_URL`` (the table seeded once)."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(id(loop))
    if pool is None:
        url = os.environ.get("DATABASE_URL")
        if not url:
            raise RuntimeError("the sample shop needs DATABASE_URL (agentrt up sets it)")
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        await seed(pool)
        _pools[id(loop)] = pool
    return pool


async def seed(pool: asyncpg.Pool) -> None:
    """Create ``shop.orders`` and its seed rows unless they are there."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{SCHEMA}".orders (id text PRIMARY KEY, '
            "customer text NOT NULL, status text NOT NULL, total_cents bigint NOT NULL, "
            "refunded_cents bigint NOT NULL DEFAULT 0, items text NOT NULL)"
        )
        await conn.executemany(
            f'INSERT INTO "{SCHEMA}".orders VALUES ($1, $2, $3, $4, $5, $6) '
            "ON CONFLICT (id) DO NOTHING",
            SEED,
        )


@tool
async def find_orders(
    ctx: ToolContext, customer: str, status: Literal["any", "paid", "returned"] = "any"
) -> list[Order]:
    """Look up a customer's orders in the shop database, newest first.

    Args:
        customer: the customer's email address
        status: only orders in this status
    """
    pool = await _pool()
    rows = await pool.fetch(
        f'SELECT id, status, total_cents, refunded_cents, items FROM "{SCHEMA}".orders '
        "WHERE lower(customer) = lower($1) AND ($2 = 'any' OR status = $2) ORDER BY id DESC",
        customer,
        status,
    )
    ctx.log.info("shop.find_orders", customer=customer, found=len(rows))
    return [Order(*r) for r in rows]
