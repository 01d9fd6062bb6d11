"""Promise 6, second half: the hash chain and seals make tampering evident."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys

import asyncpg
import pytest

from runtime.events.model import NewEvent, RecordedEvent
from runtime.log import audit, chain
from runtime.log.store import NO_STREAM, EventLog
from runtime.settings import Settings
from tests.support.events import Noted


async def tamper(admin: asyncpg.Connection, schema: str, sql: str, *args: object) -> None:
    """As a superuser, with the guards switched off for one transaction."""
    async with admin.transaction():
        for table in ("events", "seals", "seal_heads"):
            await admin.execute(f'ALTER TABLE "{schema}".{table} DISABLE TRIGGER USER')
        await admin.execute(sql, *args)
        for table in ("events", "seals", "seal_heads"):
            await admin.execute(f'ALTER TABLE "{schema}".{table} ENABLE TRIGGER USER')


async def fill(log: EventLog) -> dict[str, list[RecordedEvent]]:
    for stream in ("s-a", "s-b", "s-c"):
        await log.append(stream, [Noted(text=f"{stream} {i}", n=i) for i in range(4)], NO_STREAM)
    return {s: await log.read_stream(s) for s in ("s-a", "s-b", "s-c")}


async def verify(admin: asyncpg.Connection, log: EventLog) -> audit.VerifyReport:
    return await audit.verify(admin, log.schema)


async def test_intact_log_verifies(log: EventLog, admin: asyncpg.Connection) -> None:
    await fill(log)
    async with log.pool.acquire() as conn:
        sealed = await audit.seal(conn, log.schema)
        assert sealed is not None
        assert sealed.head_count == 3
        assert sealed.event_count == 12
        assert await audit.seal(conn, log.schema) is None  # nothing new
    await log.append("s-a", [Noted(text="later")], 4)
    async with log.pool.acquire() as conn:
        again = await audit.seal(conn, log.schema)
    assert again is not None
    assert again.head_count == 1
    assert again.event_count == 13
    report = await verify(admin, log)
    assert report.ok, report.problems
    assert (report.events, report.streams, report.seals) == (13, 3, 2)


def test_python_and_sql_agree_on_the_chain() -> None:
    content = hashlib.sha256(b"x").digest()
    expected = hashlib.sha256(bytes(32) + (1).to_bytes(8, "big") + content + b"s").digest()
    assert chain.link(bytes(32), 1, content, "s") == expected


async def test_altered_body_is_named(log: EventLog, admin: asyncpg.Connection) -> None:
    streams = await fill(log)
    target = streams["s-b"][2]
    await tamper(
        admin,
        log.schema,
        f'UPDATE "{log.schema}".events SET data = $2 WHERE event_id = $1',
        target.event_id,
        '{"type":"test.noted","text":"forged","n":2}',
    )
    report = await verify(admin, log)
    assert not report.ok
    first = report.first
    assert first is not None
    assert (first.kind, first.event_id) == ("altered", target.event_id)
    assert str(target.event_id) in str(first)


async def test_altered_envelope_field_is_named(log: EventLog, admin: asyncpg.Connection) -> None:
    streams = await fill(log)
    target = streams["s-a"][1]
    await tamper(
        admin,
        log.schema,
        f'UPDATE "{log.schema}".events SET producer = $2 WHERE event_id = $1',
        target.event_id,
        "mallory",
    )
    report = await verify(admin, log)
    assert report.first is not None
    assert report.first.event_id == target.event_id


async def test_deleted_middle_event_is_named(log: EventLog, admin: asyncpg.Connection) -> None:
    streams = await fill(log)
    target = streams["s-c"][1]
    await tamper(
        admin, log.schema, f'DELETE FROM "{log.schema}".events WHERE event_id = $1', target.event_id
    )
    report = await verify(admin, log)
    first = report.first
    assert first is not None
    assert (first.kind, first.stream_id, first.stream_version) == ("missing", "s-c", 2)


async def test_deleted_stream_tail_and_whole_stream_are_caught_by_seals(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    streams = await fill(log)
    async with log.pool.acquire() as conn:
        await audit.seal(conn, log.schema)
    await tamper(
        admin,
        log.schema,
        f'DELETE FROM "{log.schema}".events WHERE event_id = $1',
        streams["s-a"][3].event_id,
    )
    await tamper(admin, log.schema, f"DELETE FROM \"{log.schema}\".events WHERE stream_id = 's-b'")
    report = await verify(admin, log)
    missing = {(p.stream_id, p.stream_version) for p in report.problems if p.kind == "missing"}
    assert ("s-a", 4) in missing
    assert ("s-b", 4) in missing
    assert any("covers 12 events" in p.detail for p in report.problems)


async def test_rewritten_chain_is_caught_by_the_seal(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    """A forger who recomputes every hash of a stream still differs from its seal."""
    streams = await fill(log)
    async with log.pool.acquire() as conn:
        await audit.seal(conn, log.schema)
    last = streams["s-a"][3]
    forged = NewEvent(
        body=Noted(text="forged", n=3), event_id=last.event_id, recorded_at=last.recorded_at
    )
    data = b'{"type":"test.noted","text":"forged","n":3}'
    content = chain.content_hash(
        event_id=forged.event_id,
        event_type="test.noted",
        schema_version=1,
        run_id=None,
        causation_id=None,
        producer=None,
        recorded_at=forged.recorded_at,
        trace=None,
        data=data,
    )
    new_hash = chain.link(last.prev_hash, 4, content, "s-a")
    await tamper(
        admin,
        log.schema,
        f'UPDATE "{log.schema}".events SET data = $2, hash = $3 WHERE event_id = $1',
        last.event_id,
        data.decode(),
        new_hash,
    )
    report = await verify(admin, log)
    assert [(p.kind, p.event_id) for p in report.problems] == [("altered", last.event_id)]
    assert "seal 1" in report.problems[0].detail


async def test_problems_are_reported_in_log_order(log: EventLog, admin: asyncpg.Connection) -> None:
    streams = await fill(log)
    later, earlier = streams["s-c"][0], streams["s-a"][2]
    for target in (later, earlier):
        await tamper(
            admin,
            log.schema,
            f"UPDATE \"{log.schema}\".events SET producer = 'x' WHERE event_id = $1",
            target.event_id,
        )
    report = await verify(admin, log)
    assert [p.event_id for p in report.problems] == [earlier.event_id, later.event_id]


async def test_cli_verify_exits_nonzero_and_names_the_event(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> None:
    streams = await fill(log)
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": log.schema,
    }
    ok = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "runtime", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    target = streams["s-b"][0]
    await tamper(
        admin,
        log.schema,
        f"UPDATE \"{log.schema}\".events SET producer = 'x' WHERE event_id = $1",
        target.event_id,
    )
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "runtime", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout
    assert str(target.event_id) in bad.stdout


pytestmark = pytest.mark.filterwarnings("error")


async def test_a_writer_chain_that_does_not_start_at_the_head_is_ignored(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    """The database links the chain itself unless the writer's starts at the real head."""
    await log.append("s-w", [Noted(text="first")], NO_STREAM)
    batch = log._encode("s-w", [Noted(text="second")], 1)
    batch.prev = bytes(32)  # claims the stream is new: a wrong head
    batch.links = [bytes(32), hashlib.sha256(b"forged").digest()]
    async with log.pool.acquire() as conn:
        await conn.fetchrow(log._sql_append, *batch.args())
    # A second, independent log has no cached head: the database links it.
    other = EventLog(log.pool, schema=log.schema)
    await other.append("s-w", [Noted(text="third")], 2)
    await log.append("s-w", [Noted(text="fourth")])  # any version: linked server-side
    report = await verify(admin, log)
    assert report.ok, report.problems
    assert report.events == 4


async def test_chains_written_by_copy_verify(log: EventLog, admin: asyncpg.Connection) -> None:
    await log.append("s-copy", [Noted(text=str(i)) for i in range(150)], NO_STREAM)
    await log.append("s-copy", [Noted(text="one more")], 150)
    await log.append("s-copy", [Noted(text=str(i)) for i in range(80)])
    report = await verify(admin, log)
    assert report.ok, report.problems[:3]
    assert report.events == 231


# -- issue 9: the commit order (tx_id, position) is covered too ---------------------------


async def move(admin: asyncpg.Connection, schema: str, *statements: str) -> None:
    """As a superuser, guards off, ``position`` made writable: rewrite the commit order."""
    events = f'"{schema}".events'
    async with admin.transaction():
        await admin.execute(f"ALTER TABLE {events} DISABLE TRIGGER USER")
        await admin.execute(f"ALTER TABLE {events} ALTER COLUMN position SET GENERATED BY DEFAULT")
        for sql in statements:
            await admin.execute(sql.format(t=events))
        await admin.execute(f"ALTER TABLE {events} ALTER COLUMN position SET GENERATED ALWAYS")
        await admin.execute(f"ALTER TABLE {events} ENABLE TRIGGER USER")


def swap_positions(a: RecordedEvent, b: RecordedEvent) -> list[str]:
    return [
        f"UPDATE {{t}} SET position = -1 WHERE event_id = '{a.event_id}'",
        f"UPDATE {{t}} SET position = {a.position} WHERE event_id = '{b.event_id}'",
        f"UPDATE {{t}} SET position = {b.position} WHERE event_id = '{a.event_id}'",
    ]


async def seal(log: EventLog) -> audit.SealResult:
    async with log.pool.acquire() as conn:
        result = await audit.seal(conn, log.schema)
    assert result is not None
    return result


async def test_positions_swapped_within_a_stream_are_named(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    streams = await fill(log)
    v2, v3 = streams["s-a"][1], streams["s-a"][2]
    await move(admin, log.schema, *swap_positions(v2, v3))
    report = await verify(admin, log)
    assert [(p.kind, p.stream_id, p.stream_version) for p in report.problems] == [
        ("order", "s-a", 3)
    ]


async def test_positions_swapped_across_streams_are_caught_by_the_seal(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    """Each stream's positions still rise: only the sealed commit order shows the swap."""
    streams = await fill(log)
    await seal(log)
    await move(admin, log.schema, *swap_positions(streams["s-a"][3], streams["s-b"][0]))
    report = await verify(admin, log)
    assert [p.kind for p in report.problems] == ["order"]
    assert "seal 1" in report.problems[0].detail
    assert "commit order" in report.problems[0].detail


async def test_transactions_swapped_inside_a_sealed_range_are_caught(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    streams = await fill(log)
    await seal(log)
    a, b = streams["s-a"][0], streams["s-c"][0]
    statements = [
        "UPDATE {t} SET tx_id = '0' WHERE stream_id = 's-a'",
        f"UPDATE {{t}} SET tx_id = '{a.tx}' WHERE stream_id = 's-c'",
        f"UPDATE {{t}} SET tx_id = '{b.tx}' WHERE stream_id = 's-a'",
    ]
    await move(admin, log.schema, *statements)
    report = await verify(admin, log)
    assert [p.kind for p in report.problems] == ["order"]
    assert "commit order" in report.problems[0].detail


async def test_a_row_moved_to_a_far_future_transaction_is_named(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    """No seal needed: no transaction has that id yet, and no reader would ever deliver it."""
    streams = await fill(log)
    target = streams["s-b"][3]
    await move(
        admin,
        log.schema,
        f"UPDATE {{t}} SET tx_id = '9000000000' WHERE event_id = '{target.event_id}'",
    )
    assert target.event_id not in {e.event_id for e in await log.read_all(limit=100)}
    report = await verify(admin, log)
    assert [(p.kind, p.event_id) for p in report.problems] == [("order", target.event_id)]
    assert "tx_id 9000000000" in report.problems[0].detail


async def test_a_row_moved_into_a_sealed_range_is_caught(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    streams = await fill(log)
    await seal(log)
    await log.append("s-late", [Noted(text="after the seal")], NO_STREAM)
    late = (await log.read_stream("s-late"))[0]
    earlier = streams["s-a"][0]
    await move(
        admin,
        log.schema,
        f"UPDATE {{t}} SET tx_id = '{earlier.tx}' WHERE event_id = '{late.event_id}'",
    )
    report = await verify(admin, log)
    assert [p.kind for p in report.problems] == ["order"]
    assert "seal 1 covers 12 events" in report.problems[0].detail
    assert "now holds 13" in report.problems[0].detail


async def test_a_sealed_head_moved_out_of_its_range_is_named(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    streams = await fill(log)
    await seal(log)
    head = streams["s-c"][3]
    await log.append("s-late", [Noted(text="after the seal")], NO_STREAM)
    late = (await log.read_stream("s-late"))[0]
    await move(
        admin,
        log.schema,
        f"UPDATE {{t}} SET tx_id = '{late.tx}' WHERE event_id = '{head.event_id}'",
    )
    report = await verify(admin, log)
    named = [p for p in report.problems if p.event_id is not None]
    assert [(p.kind, p.event_id) for p in named] == [("order", head.event_id)]
    assert f"now at tx_id {late.tx}" in named[0].detail
    # The sealed range also lost an event.
    assert any("seal 1 covers 12 events" in p.detail for p in report.problems)


async def test_a_rewrite_of_events_and_seals_shows_against_a_kept_digest(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    """A superuser who rewrites an event, its hash and every seal after it passes verify
    alone; the digest of an earlier seal kept outside the database gives them away."""
    streams = await fill(log)
    kept = (await seal(log)).digest
    last = streams["s-a"][3]
    data = b'{"type":"test.noted","text":"forged","n":3}'
    content = chain.content_hash(
        event_id=last.event_id,
        event_type="test.noted",
        schema_version=1,
        run_id=None,
        causation_id=None,
        producer=None,
        recorded_at=last.recorded_at,
        trace=None,
        data=data,
    )
    await tamper(
        admin,
        log.schema,
        f'UPDATE "{log.schema}".events SET data = $2, hash = $3 WHERE event_id = $1',
        last.event_id,
        data.decode(),
        chain.link(last.prev_hash, 4, content, "s-a"),
    )
    await tamper(admin, log.schema, f'DELETE FROM "{log.schema}".seal_heads')
    await tamper(admin, log.schema, f'DELETE FROM "{log.schema}".seals')
    resealed = await seal(log)
    assert resealed.digest != kept
    assert (await audit.verify(admin, log.schema)).ok  # undetected without the kept digest
    assert (await audit.verify(admin, log.schema, kept_digest=resealed.digest)).ok
    report = await audit.verify(admin, log.schema, kept_digest=kept)
    assert [p.kind for p in report.problems] == ["seal"]
    assert kept.hex() in report.problems[0].detail


async def test_order_digest_agrees_across_chunks() -> None:
    """The Python side of seal_log()'s chunked order digest."""
    from uuid import UUID

    ids = [UUID(int=i) for i in range(chain.ORDER_CHUNK + 3)]
    rows = [(10 + i // 7, i + 1, ids[i]) for i in range(len(ids))]

    def chunked(n: int) -> bytes:
        chunks = hashlib.sha256()
        for start in range(0, n, chain.ORDER_CHUNK):
            part = hashlib.sha256()
            for tx, pos, event_id in rows[start : min(n, start + chain.ORDER_CHUNK)]:
                part.update(tx.to_bytes(8, "big") + pos.to_bytes(8, "big") + event_id.bytes)
            chunks.update(part.digest())
        return chunks.digest()

    for n in (0, 1, chain.ORDER_CHUNK, len(rows)):
        digest = chain.OrderDigest()
        for row in rows[:n]:
            digest.add(*row)
        assert digest.digest() == chunked(n), n


async def test_cli_verify_checks_a_kept_digest(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> None:
    await fill(log)
    kept = (await seal(log)).digest.hex()
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": log.schema,
        "COLUMNS": "250",
    }

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "runtime", "audit", "verify", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = await cli("--digest", kept)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    other = await cli("--digest", "ab" * 32)
    assert other.returncode == 1
    assert "no seal has the digest kept outside the database" in other.stdout
    bad = await cli("--digest", "not-hex")
    assert bad.returncode == 2
    assert "not a seal digest" in bad.stderr
