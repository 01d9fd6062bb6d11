"""Ordered SQL migrations, applied in one transaction and recorded in a table."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources

import asyncpg
import structlog

from runtime.errors import MigrationError
from runtime.log.pool import connect, redact
from runtime.settings import Settings

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: One lock for every schema on the server: roles are server-wide objects.
_LOCK_KEY = "agentrt.migrate"
#: Tables of the log that only ever grow, and the triggers that keep them so.
GUARDED_TABLES = ("events", "seals", "seal_heads", "inbox")
#: Columns of ``events`` the database fills in and the runtime role cannot write.
FORCED_COLUMNS = ("tx_id", "position")
#: Tables the runtime role only reads (it seals through ``seal_log()``).
SEAL_TABLES = ("seals", "seal_heads")
#: pg_trigger.tgenabled: only 'A' fires in every session_replication_role.
_TRIGGER_STATES = {
    "O": "enabled for origin sessions only: SET session_replication_role = replica skips it",
    "R": "fires only in replica sessions (ENABLE REPLICA TRIGGER)",
    "D": "DISABLED",
}


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class MigrateReport:
    applied: list[str]
    already_applied: list[str]
    #: Whether the connecting role could create the owner and app roles.
    roles_separated: bool
    connect_role: str
    notes: list[str]


def load_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files(__name__).iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must run 1..N without gaps, found {versions}")
    return found


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def migrate(settings: Settings) -> MigrateReport:
    """Bring the schema up to date; create the owner and app roles where allowed."""
    url = settings.require_database_url()
    migrations = load_migrations()
    schema, owner, app = (
        _ident(settings.db_schema),
        _ident(settings.owner_role),
        _ident(settings.app_role),
    )
    read = _ident(settings.read_schema)
    notes: list[str] = []
    conn = await connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _LOCK_KEY)
            me = await conn.fetchrow(
                "SELECT current_user AS name, rolsuper, rolcreaterole "
                "FROM pg_roles WHERE rolname = current_user"
            )
            can_create_roles = bool(me["rolsuper"] or me["rolcreaterole"])
            if can_create_roles:
                await _ensure_roles(conn, settings, is_super=bool(me["rolsuper"]))
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner}")
                schema_owner = await conn.fetchval(
                    "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1",
                    settings.db_schema,
                )
                if schema_owner.strip('"') != settings.owner_role:
                    raise MigrationError(
                        f"schema {settings.db_schema!r} exists and is owned by {schema_owner}, "
                        f"not by the owner role {settings.owner_role!r}; drop it, hand it over "
                        f"(ALTER SCHEMA ... OWNER TO {settings.owner_role}) or pick another "
                        f"AGENTRT_DB_SCHEMA"
                    )
                # The read models' schema: the runtime role creates, swaps and drops
                # its tables there (projections are rebuilt from the log at will).
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {read} AUTHORIZATION {owner}")
                await conn.execute(f"SET LOCAL ROLE {owner}")
            else:
                notes.append(
                    f"role {me['name']!r} cannot CREATE ROLE: migrations ran as {me['name']!r}, "
                    f"which owns the schema and could disable the log's triggers. Create a role "
                    f"with only INSERT and SELECT on the log and set AGENTRT_RUNTIME_DATABASE_URL "
                    f"to it; `agentrt db status` shows which guards are in force."
                )
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {read}")
            await conn.execute(f"SET LOCAL search_path TO {schema}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
            recorded = {r["version"]: r for r in rows}
            applied: list[str] = []
            already: list[str] = []
            for m in migrations:
                label = f"{m.version:04d}_{m.name}"
                row = recorded.get(m.version)
                if row is not None:
                    if row["checksum"] != m.checksum:
                        raise MigrationError(
                            f"migration {label} was changed after it was applied "
                            f"(recorded checksum {row['checksum'][:12]}, file {m.checksum[:12]}); "
                            f"add a new migration instead of editing an applied one"
                        )
                    already.append(label)
                    continue
                try:
                    await conn.execute(m.sql)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {label} failed: {exc}") from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
                applied.append(label)
            unknown = sorted(set(recorded) - {m.version for m in migrations})
            if unknown:
                notes.append(f"the database has migrations this agentrt does not know: {unknown}")
            if can_create_roles:
                await _grant(conn, schema, owner, app)
                await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA {read} TO {app}")
    finally:
        await conn.close()
    log.info("db.migrated", url=redact(url), schema=settings.db_schema, applied=applied)
    return MigrateReport(applied, already, can_create_roles, str(me["name"]), notes)


async def _ensure_roles(conn: asyncpg.Connection, settings: Settings, *, is_super: bool) -> None:
    existing = {
        r["rolname"]
        for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])",
            [settings.owner_role, settings.app_role],
        )
    }
    owner, app = _ident(settings.owner_role), _ident(settings.app_role)
    if settings.owner_role not in existing:
        # NOLOGIN: nobody connects as the owner; migrations SET ROLE to it.
        await conn.execute(f"CREATE ROLE {owner} NOLOGIN")
    if settings.app_role not in existing:
        await conn.execute(f"CREATE ROLE {app} LOGIN")
    if settings.app_password is not None:
        # A literal is required here (no parameters in utility statements).
        quoted = "'" + settings.app_password.replace("'", "''") + "'"
        await conn.execute(f"ALTER ROLE {app} PASSWORD {quoted}")
    if not is_super:
        member = await conn.fetchval(
            "SELECT pg_has_role(current_user, $1, 'MEMBER')", settings.owner_role
        )
        if not member:
            await conn.execute(f"GRANT {owner} TO CURRENT_USER")


async def _grant(conn: asyncpg.Connection, schema: str, owner: str, app: str) -> None:
    """The runtime role's privileges, set afresh after every migrate.

    SELECT and INSERT on the log's tables, except: on ``events`` INSERT only
    on the columns the writer supplies (the database fills in ``tx_id`` and
    ``position``: a writer that chose them could slip a row behind every tail
    reader); the seal tables only read (it seals through ``seal_log()``, which
    records what the log holds); nothing on ``schema_migrations``. Column
    privileges cost nothing per row (checked once per statement, COPY too).
    """
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {app}")
    await conn.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA {schema} TO {app}")
    await conn.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} "
        f"GRANT SELECT, INSERT ON TABLES TO {app}"
    )
    await conn.execute(f"REVOKE ALL ON {schema}.schema_migrations FROM {app}")
    for table in SEAL_TABLES:
        await conn.execute(f"REVOKE ALL ON {schema}.{table} FROM {app}")
        await conn.execute(f"GRANT SELECT ON {schema}.{table} TO {app}")
    columns = await conn.fetchval(
        "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped "
        "AND NOT (attname = ANY ($2::text[]))",
        f"{schema}.events",
        list(FORCED_COLUMNS),
    )
    # Revoking the table privilege also drops every column privilege: grant after.
    await conn.execute(f"REVOKE INSERT ON {schema}.events FROM {app}")
    await conn.execute(f"GRANT INSERT ({columns}) ON {schema}.events TO {app}")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {schema}.seal_log() TO {app}")
    # Snapshots are a cache of folds: dropped and taken again at will.
    await conn.execute(f"GRANT DELETE ON {schema}.snapshots TO {app}")
    # The response cache's index points at the log; an expired entry is replaced.
    await conn.execute(f"GRANT UPDATE ON {schema}.response_cache TO {app}")


@dataclasses.dataclass(frozen=True)
class Guard:
    name: str
    in_force: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class DbStatus:
    server_version: str
    connect_role: str
    schema_exists: bool
    applied: list[str]
    pending: list[str]
    changed: list[str]
    guards: list[Guard]


async def status(settings: Settings, *, runtime_role: str | None = None) -> DbStatus:
    """What is applied, what is pending, and which append-only guards are in force."""
    url = settings.require_database_url()
    migrations = load_migrations()
    conn = await connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        me = await conn.fetchval("SELECT current_user")
        schema_exists = bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", settings.db_schema
            )
        )
        recorded: dict[int, str] = {}
        if schema_exists and await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"{_ident(settings.db_schema)}.schema_migrations"
        ):
            rows = await conn.fetch(
                f"SELECT version, checksum FROM {_ident(settings.db_schema)}.schema_migrations"
            )
            recorded = {r["version"]: r["checksum"] for r in rows}
        applied, pending, changed = [], [], []
        for m in migrations:
            label = f"{m.version:04d}_{m.name}"
            if m.version not in recorded:
                pending.append(label)
            else:
                applied.append(label)
                if recorded[m.version] != m.checksum:
                    changed.append(label)
        guards = await _guards(conn, settings, runtime_role) if schema_exists else []
    finally:
        await conn.close()
    return DbStatus(str(version), str(me), schema_exists, applied, pending, changed, guards)


async def _guards(
    conn: asyncpg.Connection, settings: Settings, runtime_role: str | None
) -> list[Guard]:
    guards: list[Guard] = []
    triggers = {
        r["tgname"]: r["tgenabled"]
        for r in await conn.fetch(
            "SELECT t.tgname, t.tgenabled::text AS tgenabled FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND NOT t.tgisinternal",
            settings.db_schema,
        )
    }
    for table in GUARDED_TABLES:
        for suffix, what in (
            ("refuse_update_delete", "UPDATE/DELETE"),
            ("refuse_truncate", "TRUNCATE"),
        ):
            name = f"{table}_{suffix}"
            state = triggers.get(name)
            label = f"{table}: {what} trigger"
            if state is None:
                guards.append(Guard(label, False, "missing"))
            elif state == "A":
                guards.append(Guard(label, True, "enabled in every session mode"))
            else:
                fix = f"ALTER TABLE {settings.db_schema}.{table} ENABLE ALWAYS TRIGGER {name}"
                detail = _TRIGGER_STATES.get(state, f"tgenabled {state!r}")
                guards.append(
                    Guard(label, False, detail if state == "D" else f"{name}: {detail} ({fix})")
                )
    role = runtime_role or settings.app_role
    role_row = await conn.fetchrow("SELECT rolsuper FROM pg_roles WHERE rolname = $1", role)
    if role_row is None:
        guards.append(
            Guard(
                "runtime role",
                False,
                f"role {role!r} does not exist; the runtime connects as the owner "
                f"(set AGENTRT_RUNTIME_DATABASE_URL or migrate as a role that can CREATE ROLE)",
            )
        )
        return guards
    if role_row["rolsuper"]:
        guards.append(Guard("runtime role", False, f"{role!r} is a superuser"))
        return guards
    events = f"{_ident(settings.db_schema)}.events"
    owner = await conn.fetchval(
        "SELECT pg_has_role($1, c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = $2::regclass",
        role,
        events,
    )
    extra = [
        priv
        for priv in ("UPDATE", "DELETE", "TRUNCATE")
        if await conn.fetchval("SELECT has_table_privilege($1, $2, $3)", role, events, priv)
    ]
    if owner:
        guards.append(
            Guard("runtime role", False, f"{role!r} owns the log and can disable triggers")
        )
        return guards
    if extra:
        guards.append(Guard("runtime role", False, f"{role!r} holds {', '.join(extra)} on the log"))
    else:
        guards.append(
            Guard("runtime role", True, f"{role!r} has only INSERT and SELECT on the log")
        )
    chosen = [
        column
        for column in FORCED_COLUMNS
        for priv in ("INSERT", "UPDATE")
        if await conn.fetchval(
            "SELECT has_column_privilege($1, $2, $3, $4)", role, events, column, priv
        )
    ]
    guards.append(
        Guard(
            "runtime role: tx_id, position",
            not chosen,
            f"{role!r} can write {', '.join(sorted(set(chosen)))}"
            if chosen
            else "set by the database only",
        )
    )
    writable = [
        f"{table} ({priv})"
        for table in (*SEAL_TABLES, "schema_migrations")
        for priv in ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
        if await conn.fetchval(
            "SELECT CASE WHEN to_regclass($2) IS NULL THEN false "
            "ELSE has_table_privilege($1, $2, $3) END",
            role,
            f"{_ident(settings.db_schema)}.{table}",
            priv,
        )
    ]
    guards.append(
        Guard(
            "runtime role: seals, migrations",
            not writable,
            f"{role!r} can write {', '.join(writable)}"
            if writable
            else "read only (seals through seal_log())",
        )
    )
    return guards
