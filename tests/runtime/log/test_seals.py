"""Promise 6: the seal chain stays one line, whoever seals and however often at once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from runtime.errors import MigrationError
from runtime.log import audit, chain
from runtime.log.migrations import migrate
from runtime.log.pool import runtime_url
from runtime.log.store import NO_STREAM, EventLog
from runtime.settings import Settings
from tests.support.events import Noted

SEALERS = 6


async def _hold_seal_lock(admin: asyncpg.Connection, schema: str) -> None:
    await admin.execute("SELECT pg_advisory_lock(hashtext($1))", f"agentrt.seal.{schema}")


async def _waiting_on_advisory(admin: asyncpg.Connection, n: int) -> None:
    """Until ``n`` sessions wait for an advisory lock (bounded: 60 s)."""
    for _ in range(600):
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        if waiting >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {waiting} of {n} sealers reached the seal lock")


async def _seal_on_own_connection(url: str, schema: str) -> audit.SealResult | None:
    conn = await asyncpg.connect(url)
    try:
        return await audit.seal(conn, schema)
    finally:
        await conn.close()


async def _concurrent_seals(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> list[audit.SealResult | None]:
    """``SEALERS`` seals on separate connections, all released at once by the seal lock."""
    await _hold_seal_lock(admin, log.schema)
    url = runtime_url(settings)
    try:
        tasks = [
            asyncio.create_task(_seal_on_own_connection(url, log.schema)) for _ in range(SEALERS)
        ]
        await _waiting_on_advisory(admin, SEALERS)
    finally:
        await admin.execute("SELECT pg_advisory_unlock(hashtext($1))", f"agentrt.seal.{log.schema}")
    return await asyncio.gather(*tasks)


async def _chain(admin: asyncpg.Connection, schema: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await admin.fetch(
        f'SELECT seal_id, prev_digest, digest FROM "{schema}".seals ORDER BY seal_id'
    )
    return rows


async def test_concurrent_seals_keep_one_linear_chain(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> None:
    for round_ in range(2):
        for s in ("a", "b", "c"):
            await log.append(f"s-{s}-{round_}", [Noted(text=s, n=i) for i in range(3)], NO_STREAM)
        results = await _concurrent_seals(log, admin, settings)
        # One of them seals the new events; the others find nothing left to seal.
        sealed = [r for r in results if r is not None]
        assert len(sealed) == 1, results
        assert sealed[0].event_count == 9 * (round_ + 1)
    seals = await _chain(admin, log.schema)
    assert len(seals) == 2
    prev = bytes(32)
    for s in seals:
        assert s["prev_digest"] == prev, "the seal chain forked"
        prev = s["digest"]
    report = await audit.verify(admin, log.schema)
    assert report.ok, report.problems
    assert report.seals == 2


async def test_a_forked_seal_is_refused_by_the_database(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> None:
    """Even a writer that skips the lock cannot give a seal a second successor."""
    await log.append("s", [Noted(text="x")], NO_STREAM)
    async with log.pool.acquire() as conn:
        first = await audit.seal(conn, log.schema)
    assert first is not None
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{settings.owner_role}"')
        with pytest.raises(asyncpg.UniqueViolationError):
            await admin.execute(
                f'INSERT INTO "{log.schema}".seals (upto_tx, from_tx, event_count, head_count, '
                "prev_digest, digest) VALUES ('1', '0', 1, 1, $1, $2)",
                bytes(32),
                b"\x01" * 32,
            )


async def _old_seal(url: str, schema: str, owner: str) -> str:
    """The seal before issue 9: REPEATABLE READ, the lock taken in the snapshot's statement."""
    conn = await asyncpg.connect(url)
    q = f'"{schema}"'
    try:
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute(f'SET LOCAL ROLE "{owner}"')
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"agentrt.seal.{schema}"
            )
            horizon = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())")
            last = await conn.fetchrow(
                f"SELECT upto_tx, event_count, digest FROM {q}.seals ORDER BY seal_id DESC LIMIT 1"
            )
            from_tx = last["upto_tx"] if last else 0
            prev = last["digest"] if last else chain.GENESIS
            heads = await conn.fetch(
                f"SELECT DISTINCT ON (stream_id) stream_id, stream_version, hash FROM {q}.events "
                "WHERE tx_id >= $1 AND tx_id < $2 ORDER BY stream_id, stream_version DESC",
                from_tx,
                horizon,
            )
            if not heads:
                return "nothing"
            count = await conn.fetchval(
                f"SELECT count(*) FROM {q}.events WHERE tx_id < $1", horizon
            )
            head_list = [(r[0], r[1], r[2]) for r in heads]
            seal_id = await conn.fetchval(
                f"INSERT INTO {q}.seals (upto_tx, from_tx, event_count, head_count, prev_digest, "
                "digest) VALUES ($1, $2, $3, $4, $5, $6) RETURNING seal_id",
                horizon,
                from_tx,
                count,
                len(head_list),
                prev,
                chain.heads_digest(prev, head_list),
            )
            await conn.executemany(
                f"INSERT INTO {q}.seal_heads VALUES ($1, $2, $3, $4)",
                [(seal_id, *h) for h in head_list],
            )
        return "sealed"
    except asyncpg.UniqueViolationError:
        return "refused"
    finally:
        await conn.close()


async def test_the_old_seal_would_fork_and_the_database_refuses_it(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> None:
    """The broken variant, kept: every old sealer's snapshot predates the lock, so each
    writes a sibling of the same predecessor; the unique prev_digest refuses all but one."""
    for s in ("a", "b"):
        await log.append(f"s-{s}", [Noted(text=s)], NO_STREAM)
    await _hold_seal_lock(admin, log.schema)
    try:
        tasks = [
            asyncio.create_task(
                _old_seal(settings.require_database_url(), log.schema, settings.owner_role)
            )
            for _ in range(SEALERS)
        ]
        await _waiting_on_advisory(admin, SEALERS)
    finally:
        await admin.execute("SELECT pg_advisory_unlock(hashtext($1))", f"agentrt.seal.{log.schema}")
    outcomes = sorted(await asyncio.gather(*tasks))
    # Without the constraint these would all be "sealed": six siblings, a fork for good.
    assert outcomes == ["refused"] * (SEALERS - 1) + ["sealed"]
    assert len(await _chain(admin, log.schema)) == 1
    report = await audit.verify(admin, log.schema)
    assert report.ok, report.problems


async def test_migrating_a_log_whose_seals_forked_says_so(
    admin: asyncpg.Connection, settings: Settings
) -> None:
    """A fork written before migration 0003 stops it with the seals named, not a bare
    unique violation."""
    q = f'"{settings.db_schema}"'
    await admin.execute(f"ALTER TABLE {q}.seals DROP CONSTRAINT seals_one_successor")
    for digest in (b"\x01" * 32, b"\x02" * 32):
        await admin.execute(
            f"INSERT INTO {q}.seals (upto_tx, from_tx, event_count, head_count, prev_digest, "
            "digest) VALUES ('5', '0', 0, 0, $1, $2)",
            bytes(32),
            digest,
        )
    await admin.execute(f"DELETE FROM {q}.schema_migrations WHERE version = 3")
    with pytest.raises(MigrationError) as info:
        await migrate(settings)
    assert "0003_guards failed: the seal chain forked" in str(info.value)
    assert "seals {1,2} share one predecessor" in str(info.value)


async def test_sealing_inside_a_repeatable_read_transaction_is_refused(log: EventLog) -> None:
    """Its snapshot would predate the seal lock (the fork above): refused, by name."""
    await log.append("s", [Noted(text="x")], NO_STREAM)
    async with log.pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError) as info:
            async with conn.transaction(isolation="repeatable_read"):
                await audit.seal(conn, log.schema)
        assert info.value.sqlstate == "AR004"
        assert "READ COMMITTED" in str(info.value)
        assert await audit.seal(conn, log.schema) is not None


async def test_a_seal_over_more_than_one_order_chunk_verifies(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    """seal_log() hashes the commit order in chunks of ORDER_CHUNK rows; Python agrees."""
    total = chain.ORDER_CHUNK + 4_000
    for i in range(0, total, 5_000):
        n = min(5_000, total - i)
        await log.append(f"s-{i}", [Noted(text="x", n=j) for j in range(n)], NO_STREAM)
    async with log.pool.acquire() as conn:
        sealed = await audit.seal(conn, log.schema)
    assert sealed is not None
    assert sealed.event_count == total
    report = await audit.verify(admin, log.schema)
    assert report.ok, report.problems[:3]
