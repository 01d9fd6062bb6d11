"""Promise 6, first half: the database itself refuses UPDATE, DELETE and TRUNCATE."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import asyncpg
import pytest

from runtime.log import audit
from runtime.log.migrations import migrate, status
from runtime.log.pool import create_pool, with_user
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.events import Noted
from tests.support.servers import Servers, drop_schema, fresh_schema

CHANGES = {
    "UPDATE": "UPDATE {t} SET {col} = {col}",
    "DELETE": "DELETE FROM {t}",
    "TRUNCATE": "TRUNCATE {t}",
}


@pytest.mark.parametrize("table", ["events", "seals", "seal_heads"])
@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_runtime_role_has_no_privilege_to_change_the_log(
    log: EventLog, table: str, change: str
) -> None:
    await log.append("s", [Noted(text="keep me")])
    sql = CHANGES[change].format(
        t=f'"{log.schema}".{table}', col="stream_id" if table != "seals" else "upto_tx"
    )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await log.pool.execute(sql)
    assert len(await log.read_stream("s")) == 1


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_triggers_refuse_the_owner_too(
    log: EventLog, admin: asyncpg.Connection, settings: Settings, change: str
) -> None:
    await log.append("s", [Noted(text="keep me")])
    sql = CHANGES[change].format(t=f'"{log.schema}".events', col="producer")
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{settings.owner_role}"')
        with pytest.raises(asyncpg.PostgresError) as info:
            await admin.execute(sql)
    assert info.value.sqlstate == "AR003"
    assert f"append-only: {change} refused" in str(info.value)
    assert len(await log.read_stream("s")) == 1


async def test_status_reports_guards_and_a_disabled_trigger(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    st = await status(settings)
    assert st.pending == []
    assert st.guards
    assert all(g.in_force for g in st.guards), st.guards
    await admin.execute(
        f'ALTER TABLE "{settings.db_schema}".events DISABLE TRIGGER events_refuse_truncate'
    )
    st = await status(settings)
    off = [g for g in st.guards if not g.in_force]
    assert [(g.name, g.detail) for g in off] == [("events: TRUNCATE trigger", "DISABLED")]


async def test_migrate_is_idempotent_and_records_versions(settings: Settings) -> None:
    report = await migrate(settings)
    assert report.applied == []
    assert report.already_applied == [
        "0001_event_log", "0002_agents", "0003_guards", "0004_snapshots", "0005_commit_many",
        "0006_response_cache",
    ]  # fmt: skip
    assert report.roles_separated


async def test_a_role_that_cannot_create_roles_gets_a_plain_answer(
    servers: Servers, admin: asyncpg.Connection
) -> None:
    role = "t_limited_" + uuid.uuid4().hex[:8]
    schema = fresh_schema()
    database = await admin.fetchval("SELECT current_database()")
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    await admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
    limited_url = with_user(servers.database_url, role, None)
    cfg = Settings.from_env({}, db_schema=schema).with_urls(
        redis_url=servers.redis_url, database_url=limited_url
    )
    try:
        report = await migrate(cfg)
        assert not report.roles_separated
        assert any("cannot CREATE ROLE" in note for note in report.notes)
        st = await status(cfg, runtime_role=role)
        runtime = next(g for g in st.guards if g.name == "runtime role")
        assert not runtime.in_force
        assert "owns the log" in runtime.detail
        # The triggers still refuse the owner.
        pool = await create_pool(limited_url)
        try:
            await EventLog(pool, schema=schema).append("s", [Noted(text="x")])
            for sql in (f'DELETE FROM "{schema}".events', f'TRUNCATE "{schema}".events'):
                with pytest.raises(asyncpg.PostgresError) as info:
                    await pool.execute(sql)
                assert info.value.sqlstate == "AR003"
        finally:
            await pool.close()
    finally:
        await drop_schema(servers.database_url, schema)
        await admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM "{role}"')
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')


# -- issue 9: the runtime role cannot choose the commit order or write seals ------------


def _insert_with(log: EventLog, column: str, value: str) -> str:
    """An INSERT of one event row naming ``column`` as well."""
    q = f'"{log.schema}".events'
    override = " OVERRIDING SYSTEM VALUE" if column == "position" else ""
    zeros = "decode(repeat('00', 32), 'hex')"
    return (
        f"INSERT INTO {q} (event_id, stream_id, stream_version, event_type, schema_version, "
        f"recorded_at, data, prev_hash, hash, {column}){override} VALUES (gen_random_uuid(), "
        f"""'forged', 1, 'test.noted', 1, now(), '{{"text": "forged"}}', {zeros}, {zeros}, """
        f"'{value}')"
    )


@pytest.mark.parametrize(("column", "value"), [("tx_id", "1"), ("position", "999999")])
async def test_runtime_role_cannot_choose_tx_id_or_position(
    log: EventLog, column: str, value: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await log.pool.execute(_insert_with(log, column, value))
    async with log.pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.copy_records_to_table(
                "events",
                schema_name=log.schema,
                columns=["event_id", "stream_id", column],
                records=[(uuid.uuid4(), "forged", int(value))],
            )
    # The writer's own paths (function, INSERT, COPY) still work.
    await log.append("s", [Noted(text="one")], 0)
    await log.append("s", [Noted(text=str(i)) for i in range(3)], 1)
    await log.append("s", [Noted(text=str(i)) for i in range(70)], 4)
    await log.append("s", [Noted(text="any")])
    assert len(await log.read_stream("s")) == 75
    assert len(await log.read_all()) == 75


async def test_with_the_old_table_wide_insert_a_row_slips_behind_every_reader(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> None:
    """The broken variant (before issue 9): INSERT on every column lets tx_id be chosen."""
    await log.append("s", [Noted(text="first")], 0)
    cursor = (await log.read_all())[-1].log_position
    await admin.execute(f'GRANT INSERT ON "{log.schema}".events TO "{settings.app_role}"')
    await log.pool.execute(_insert_with(log, "tx_id", "1"))
    # Behind the reader's cursor: a tail reader never delivers it.
    assert await log.read_all(cursor) == []
    assert len(await log.read_all()) == 2
    st = await status(settings)
    bad = {g.name: g.detail for g in st.guards if not g.in_force}
    assert "can write position, tx_id" in bad["runtime role: tx_id, position"]
    # audit verify names the forged transaction id (and the forged row's bad hash).
    report = await audit.verify(admin, log.schema)
    order = [p for p in report.problems if p.kind == "order"]
    assert [p.stream_id for p in order] == ["forged"]
    assert "tx_id 1 is not a transaction that committed" in str(order[0])
    # A migrate puts the privileges back.
    await migrate(settings)
    assert all(g.in_force for g in (await status(settings)).guards)


@pytest.mark.parametrize("table", ["seals", "seal_heads", "schema_migrations"])
async def test_runtime_role_cannot_write_seals_or_migrations(log: EventLog, table: str) -> None:
    q = f'"{log.schema}".{table}'
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await log.pool.execute(f"INSERT INTO {q} DEFAULT VALUES")
    if table == "schema_migrations":
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await log.pool.fetch(f"SELECT * FROM {q}")
    else:
        async with log.pool.acquire() as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.copy_records_to_table(
                    table, schema_name=log.schema, columns=["seal_id"], records=[(1,)]
                )
    # It still seals: through seal_log(), which records what the log holds.
    await log.append("s", [Noted(text="x")], 0)
    async with log.pool.acquire() as conn:
        assert await audit.seal(conn, log.schema) is not None


# -- issue 9: the guards fire in every session mode --------------------------------------


async def test_replica_mode_does_not_bypass_the_guards(
    log: EventLog, admin: asyncpg.Connection
) -> None:
    await log.append("s", [Noted(text="keep me")])
    for change in sorted(CHANGES):
        sql = CHANGES[change].format(t=f'"{log.schema}".events', col="producer")
        async with admin.transaction():
            await admin.execute("SET LOCAL session_replication_role = replica")
            with pytest.raises(asyncpg.PostgresError) as info:
                await admin.execute(sql)
        assert info.value.sqlstate == "AR003", change
    for table in ("seals", "seal_heads", "inbox"):
        async with admin.transaction():
            await admin.execute("SET LOCAL session_replication_role = replica")
            with pytest.raises(asyncpg.PostgresError) as info:
                await admin.execute(f'TRUNCATE "{log.schema}".{table} CASCADE')
        assert info.value.sqlstate == "AR003", table
    assert len(await log.read_stream("s")) == 1


async def test_an_origin_only_trigger_is_bypassed_in_replica_mode_and_reported(
    log: EventLog, admin: asyncpg.Connection, settings: Settings
) -> None:
    """The broken variant (0001's plain ENABLE): replica mode deletes; db status says so."""
    await log.append("s", [Noted(text="gone soon")])
    events = f'"{log.schema}".events'
    await admin.execute(f"ALTER TABLE {events} ENABLE TRIGGER events_refuse_update_delete")
    async with admin.transaction():
        await admin.execute("SET LOCAL session_replication_role = replica")
        assert await admin.execute(f"DELETE FROM {events}") == "DELETE 1"
    assert await log.read_stream("s") == []
    off = [(g.name, g.detail) for g in (await status(settings)).guards if not g.in_force]
    assert len(off) == 1
    name, detail = off[0]
    assert name == "events: UPDATE/DELETE trigger"
    assert "events_refuse_update_delete" in detail
    assert "replica" in detail


async def test_db_status_reports_an_owners_replica_trigger(
    admin: asyncpg.Connection, settings: Settings
) -> None:
    seals = f'"{settings.db_schema}".seals'
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "COLUMNS": "250",
    }
    ok = await _cli(env, "db", "status")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "NOT in force" not in ok.stdout
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{settings.owner_role}"')
        await admin.execute(f"ALTER TABLE {seals} ENABLE REPLICA TRIGGER seals_refuse_truncate")
    st = await status(settings)
    off = [(g.name, g.detail) for g in st.guards if not g.in_force]
    assert [name for name, _ in off] == ["seals: TRUNCATE trigger"]
    assert "seals_refuse_truncate" in off[0][1] and "only in replica" in off[0][1]
    bad = await _cli(env, "db", "status")
    assert bad.returncode == 1
    assert "seals_refuse_truncate" in bad.stdout
    assert "NOT in force" in bad.stdout
    assert "not in force" in bad.stderr


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "runtime", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
