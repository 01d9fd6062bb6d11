"""Promise 6, first half: the database itself refuses UPDATE, DELETE and TRUNCATE."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

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
    assert report.already_applied == ["0001_event_log", "0002_agents"]
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
