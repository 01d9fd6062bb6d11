"""The projection engine: folds the log into read-model tables, exactly once, rebuildable.

A :class:`Projection` is a named, versioned fold from events to tables in the
read schema (``<schema>_read``). The :class:`Projector` runs a set of them:

* **Live**, every projection whose tables were built by its current version
  moves in one lane: one reader (the log's never-skipping ``read_all``, promise
  4) from the lowest of their checkpoints, and per page ONE transaction that
  locks their checkpoint rows, folds into each the events past its own
  checkpoint, and moves the checkpoints (promise 5: a crash anywhere rolls
  the page back whole; the page is folded again after a restart).
* **Rebuilds** fold from the start into shadow tables (``<table>__rebuild``)
  while the live tables keep serving, build the indexes, then swap: one
  transaction locks the projection's checkpoint row (the lane waits on it),
  folds the last events, drops the live tables and renames the shadows into
  their place, and sets the checkpoint. A query waiting on the swap's lock
  reads the new table once it commits; no query ever sees an empty one.
  A projection that is new, or whose code version differs from the one its
  tables were built with, is rebuilt when the projector starts (or only
  flagged, with ``AGENTRT_PROJECTION_VERSION_CHANGE=flag``).

Which projections run is :mod:`projections.registry`'s business: the built-ins,
the ``--app`` module's, the ``agentrt.projections`` entry-point group's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg
import msgspec
import structlog

from projections.errors import ProjectionBusy, UnknownProjection
from runtime.errors import AppLoadError
from runtime.events.model import START, LogPosition, RecordedEvent
from runtime.log.store import EventLog
from runtime.settings import Settings

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
#: Suffix of a rebuild's shadow tables.
SHADOW = "__rebuild"
#: The checkpoint row of a rebuild in progress is ``<name>`` + this.
_REBUILDING = "#rebuild"
#: Reconnect delays when PostgreSQL goes away under the live lane.
_BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Errors after which a page is simply tried again (nothing of it committed).
_RETRY = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InvalidCachedStatementError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    OSError,
)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Tables(Mapping[str, str]):
    """A projection's tables by logical name -> quoted, schema-qualified physical name.

    During a rebuild the same names point at the shadow tables, so ``apply``
    is written once.
    """

    def __init__(self, schema: str, names: Iterable[str], suffix: str = "") -> None:
        self.schema = schema
        self.suffix = suffix
        self._physical = {n: n + suffix for n in names}

    def __getitem__(self, name: str) -> str:
        return f"{_ident(self.schema)}.{_ident(self._physical[name])}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._physical)

    def __len__(self) -> int:
        return len(self._physical)

    def parts(self, name: str) -> tuple[str, str]:
        """(schema, physical table name), unquoted: for ``copy_records_to_table``."""
        return self.schema, self._physical[name]


class Projection:
    """A named, versioned fold from events to read-model tables. Subclass it::

        class OrdersByDay(Projection):
            name = "orders_by_day"
            version = 1
            types = frozenset({"order.placed"})
            tables = {"orders_by_day": "(day date PRIMARY KEY, orders bigint NOT NULL)"}

            async def apply(self, conn, events, tables):
                counts = Counter(e.recorded_at.date() for e in events)
                await conn.executemany(
                    f"INSERT INTO {tables['orders_by_day']} VALUES ($1, $2) "
                    "ON CONFLICT (day) DO UPDATE SET orders = "
                    f"{tables['orders_by_day']}.orders + excluded.orders",
                    list(counts.items()),
                )

    ``apply`` runs inside the engine's transaction, which also moves the
    checkpoint: keep no state between calls outside the tables.
    """

    name: ClassVar[str] = ""
    #: Bump when the fold or the tables change: the projection is rebuilt on start.
    version: ClassVar[int] = 1
    #: The event types it folds (None: every event). The engine passes it only these.
    types: ClassVar[frozenset[str] | None] = None
    #: Table name -> its column list, ``"(id uuid PRIMARY KEY, ...)"``.
    tables: ClassVar[dict[str, str]] = {}
    #: ``CREATE INDEX ON {table} (...)`` statements; ``{table}`` is filled in.
    #: Built after a rebuild's bulk load, before the swap.
    indexes: ClassVar[tuple[str, ...]] = ()

    def wanted(self, events: Sequence[RecordedEvent]) -> Sequence[RecordedEvent]:
        """The events of ``types`` among ``events`` (all of them when ``types`` is None)."""
        types = self.types
        return events if types is None else [e for e in events if e.event_type in types]

    def version_key(self) -> str:
        """What the checkpoint records as the version its tables were built with."""
        return str(self.version)

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        raise NotImplementedError(f"projection {self.name!r} has no apply()")

    def __repr__(self) -> str:
        return f"<projection {self.name!r} v{self.version_key()}>"


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where one projection stands (``agentrt projections status``)."""

    name: str
    #: The version of the code loaded here.
    version: str
    #: The version its live tables were built with (None: never built).
    built_version: str | None
    #: live | stale (built by another version) | new (never built) | rebuilding
    state: str
    #: The checkpoint: the last event folded (TX:POSITION), or None.
    position: str | None
    events_applied: int
    #: Events in the log past the checkpoint (counted up to a million).
    lag_events: int
    #: Age of the oldest event not folded yet (0 when caught up).
    lag_seconds: float
    updated_at: datetime | None = None
    #: A rebuild in progress (or interrupted): events folded so far and its total.
    rebuild_done: int | None = None
    rebuild_total: int | None = None


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """A rebuild's progress, reported after every page."""

    name: str
    done: int
    total: int
    #: Seconds since the rebuild started, and the estimate of those left.
    elapsed: float
    eta: float | None
    phase: str = "folding"


@dataclasses.dataclass(slots=True)
class _Checkpoint:
    version: str
    at: LogPosition
    events: int


def _validate(projections: Sequence[Projection]) -> dict[str, Projection]:
    by_name: dict[str, Projection] = {}
    owners: dict[str, str] = {}
    for p in projections:
        where = f"projection {type(p).__qualname__}"
        if not isinstance(p, Projection):
            raise AppLoadError(where, f"{p!r} is not a Projection")
        if not _NAME.match(p.name or ""):
            raise AppLoadError(where, f"name {p.name!r} must match {_NAME.pattern}")
        if p.name in by_name:
            raise AppLoadError(where, f"two projections are named {p.name!r}")
        if not p.tables:
            raise AppLoadError(where, "declares no tables")
        for table in p.tables:
            if not _NAME.match(table) or table == "projection_checkpoints":
                raise AppLoadError(where, f"table name {table!r} must match {_NAME.pattern}")
            if table in owners:
                raise AppLoadError(
                    where, f"table {table!r} belongs to projection {owners[table]!r} already"
                )
            owners[table] = p.name
        by_name[p.name] = p
    return by_name


class Projector:
    """Runs projections over one log (see the module docstring)."""

    def __init__(
        self,
        log: EventLog,
        projections: Sequence[Projection],
        settings: Settings,
        *,
        batch: int | None = None,
    ) -> None:
        self.log = log
        self.settings = settings
        self.projections = _validate(projections)
        self.batch = batch or settings.projection_batch
        #: Pages of a rebuild are larger: fewer statements per event, and a crash only
        #: restarts the rebuild (the live tables never saw its pages).
        self.rebuild_batch = max(self.batch, min(self.batch * 5, 5000)) if batch is None else batch
        self.schema = settings.read_schema
        s = _ident(self.schema)
        self._cp = f"{s}.projection_checkpoints"
        self._ready = False

    @property
    def pool(self) -> asyncpg.Pool:
        return self.log.pool

    def live_tables(self, p: Projection) -> Tables:
        return Tables(self.schema, p.tables)

    def _get(self, name: str) -> Projection:
        p = self.projections.get(name)
        if p is None:
            known = ", ".join(sorted(self.projections)) or "none"
            raise UnknownProjection(f"no projection {name!r} (registered: {known})")
        return p

    # -- checkpoints -------------------------------------------------------------

    async def setup(self) -> None:
        """The checkpoint table (once per process)."""
        if self._ready:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            # Two processes creating it at once would collide in pg_type.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._cp)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._cp} ("
                " name text PRIMARY KEY, version text NOT NULL,"
                " tx xid8 NOT NULL, position bigint NOT NULL, event_id uuid,"
                " events bigint NOT NULL DEFAULT 0, total bigint,"
                " last_event_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now())"
            )
        self._ready = True

    async def checkpoints(self) -> dict[str, _Checkpoint]:
        await self.setup()
        rows = await self.pool.fetch(f"SELECT name, version, tx, position, events FROM {self._cp}")
        return {
            r["name"]: _Checkpoint(
                r["version"], LogPosition(int(r["tx"]), r["position"]), r["events"]
            )
            for r in rows
        }

    async def current(self) -> tuple[list[Projection], list[Projection]]:
        """(projections whose tables match their code version, those that do not)."""
        cps = await self.checkpoints()
        live: list[Projection] = []
        stale: list[Projection] = []
        for p in self.projections.values():
            cp = cps.get(p.name)
            (live if cp is not None and cp.version == p.version_key() else stale).append(p)
        return live, stale

    # -- the live lane -----------------------------------------------------------

    async def _fold_page(
        self, lane: Sequence[Projection], page: Sequence[RecordedEvent]
    ) -> list[Projection]:
        """Fold one page into every lane projection past its checkpoint, in ONE transaction
        with the checkpoints. Returns the projections whose checkpoint was found at another
        version (rebuilt meanwhile by another version: they leave the lane)."""
        last = page[-1]
        upto = last.log_position
        gone: list[Projection] = []
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT name, version, tx, position FROM {self._cp} "
                "WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE",
                [p.name for p in lane],
            )
            cps = {r[0]: (r[1], LogPosition(int(r[2]), r[3])) for r in rows}
            moved: list[tuple[str, int]] = []
            for p in lane:
                cp = cps.get(p.name)
                if cp is None or cp[0] != p.version_key():
                    gone.append(p)
                    continue
                at = cp[1]
                if at >= upto:
                    continue  # another process folded this page already
                fresh = [e for e in page if (e.tx, e.position) > at]
                events = p.wanted(fresh)
                if events:
                    await p.apply(conn, events, self.live_tables(p))
                moved.append((p.name, len(fresh)))
            if moved:
                await conn.execute(
                    f"UPDATE {self._cp} c SET tx = $2::text::xid8, position = $3, event_id = $4, "
                    "events = c.events + m.n, last_event_at = $5, updated_at = now() "
                    "FROM unnest($1::text[], $6::bigint[]) AS m(name, n) WHERE c.name = m.name",
                    [m[0] for m in moved],
                    str(upto.tx),
                    upto.position,
                    last.event_id,
                    last.recorded_at,
                    [m[1] for m in moved],
                )
        return gone

    async def _lane_start(self, lane: Sequence[Projection]) -> LogPosition:
        cps = await self.checkpoints()
        return min((cps[p.name].at for p in lane if p.name in cps), default=START)

    async def catch_up(self, *, progress: Callable[[Progress], None] | None = None) -> int:
        """Bring every projection to the head of the log once; returns the events read.

        New and version-changed projections are rebuilt first (``rebuild``
        policy) or left alone (``flag``); then the lane folds to the head.
        """
        await self.setup()
        live, stale = await self.current()
        if stale and self.settings.projection_version_change == "rebuild":
            await self.rebuild_many([p.name for p in stale], progress=progress)
            live, _ = await self.current()
        elif stale:
            for p in stale:
                log.warning("projection.stale", projection=p.name, version=p.version_key())
        if not live:
            return 0
        position = await self._lane_start(live)
        read = 0
        while True:
            page = await self.log.read_all(position, self.batch)
            if not page:
                return read
            gone = await self._fold_page(live, page)
            live = [p for p in live if p not in gone]
            read += len(page)
            position = page[-1].log_position
            if not live or len(page) < self.batch:
                return read

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Follow the log until ``stop`` is set: the lane live, rebuilds beside it."""
        await self.setup()
        stop = stop or asyncio.Event()
        live, stale = await self.current()
        rebuilt: asyncio.Queue[Projection] = asyncio.Queue()
        rebuilds: list[asyncio.Task[None]] = []
        policy = self.settings.projection_version_change
        if stale and policy == "rebuild":
            # One after the other: each holds two connections while it runs.
            rebuilds.append(asyncio.create_task(self._rebuild_then(stale, rebuilt),
                                                name="rebuilds"))  # fmt: skip
        for p in stale if policy != "rebuild" else ():
            log.warning("projection.stale", projection=p.name, version=p.version_key(),
                        hint="`agentrt projections rebuild` it, or set "
                        "AGENTRT_PROJECTION_VERSION_CHANGE=rebuild")  # fmt: skip
        log.info("projector.started", live=[p.name for p in live],
                 rebuilding=[p.name for p in stale] if policy == "rebuild" else [])  # fmt: skip
        try:
            await self._follow(live, rebuilt, stop)
        finally:
            for task in rebuilds:
                task.cancel()
            await asyncio.gather(*rebuilds, return_exceptions=True)
            log.info("projector.stopped")

    async def _rebuild_then(
        self, stale: Sequence[Projection], done: asyncio.Queue[Projection]
    ) -> None:
        """Rebuild the stale projections in one pass (one at a time for those another
        process is rebuilding already: they are skipped), then hand them to the lane."""
        try:
            await self.rebuild_many([p.name for p in stale])
            ready = list(stale)
        except ProjectionBusy:
            ready = []
            for p in stale:
                try:
                    await self.rebuild(p.name)
                    ready.append(p)
                except ProjectionBusy:
                    log.info("projection.rebuild_elsewhere", projection=p.name)
        except Exception as exc:  # a projection's bug: say so loudly, keep the lane running
            log.error("projection.rebuild_failed", projections=[p.name for p in stale],
                      error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return
        for p in ready:
            await done.put(p)

    async def _follow(
        self, lane: list[Projection], rebuilt: asyncio.Queue[Projection], stop: asyncio.Event
    ) -> None:
        position: LogPosition | None = None
        failures = 0
        poll = self.settings.poll_interval
        while not stop.is_set():
            while not rebuilt.empty():
                lane.append(rebuilt.get_nowait())
                position = None  # it may be behind the lane: start from the lowest checkpoint
            try:
                if position is None:
                    position = await self._lane_start(lane)
                page = await self.log.read_all(position, self.batch) if lane else []
                if page:
                    gone = await self._fold_page(lane, page)
                    for p in gone:
                        log.warning("projection.left_lane", projection=p.name,
                                    reason="its checkpoint is at another version")  # fmt: skip
                        lane.remove(p)
                    position = page[-1].log_position
                failures = 0
            except _RETRY as exc:
                delay = _BACKOFF[min(failures, len(_BACKOFF) - 1)]
                failures += 1
                log.warning("projector.retry", error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                position = None
                await self._sleep(stop, delay)
                continue
            if len(page) < self.batch:
                await self._sleep(stop, poll)

    @staticmethod
    async def _sleep(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    # -- rebuilds ----------------------------------------------------------------

    async def rebuild(
        self, name: str, *, progress: Callable[[Progress], None] | None = None
    ) -> int:
        """Rebuild ``name`` from the start into shadow tables and swap them in; returns the
        events folded. :class:`ProjectionBusy` if another process is rebuilding it."""
        return await self.rebuild_many([name], progress=progress)

    async def rebuild_many(
        self, names: Sequence[str], *, progress: Callable[[Progress], None] | None = None
    ) -> int:
        """Rebuild several projections in ONE pass over the log (each page folded into
        every shadow in one transaction), then swap each in; returns the events read.

        :class:`ProjectionBusy` if another process is rebuilding one of them
        (nothing is started then)."""
        chosen = [self._get(n) for n in dict.fromkeys(names)]
        if not chosen:
            return 0
        await self.setup()
        keys = [f"agentrt.rebuild:{self.schema}:{p.name}" for p in chosen]
        async with self.pool.acquire() as holder:
            taken: list[str] = []
            try:
                for p, key in zip(chosen, keys, strict=True):
                    if not await holder.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                        raise ProjectionBusy(
                            f"projection {p.name!r} is being rebuilt by another process"
                        )
                    taken.append(key)
                return await self._rebuild(chosen, progress)
            finally:
                for key in taken:
                    await holder.execute("SELECT pg_advisory_unlock(hashtext($1))", key)

    async def _rebuild(
        self, chosen: Sequence[Projection], progress: Callable[[Progress], None] | None
    ) -> int:
        label = ", ".join(p.name for p in chosen)
        shadows = {p.name: Tables(self.schema, p.tables, SHADOW) for p in chosen}
        async with self.pool.acquire() as conn:
            total = int(await conn.fetchval(f"SELECT count(*) FROM {self._events}"))
            async with conn.transaction():
                for p in chosen:
                    shadow = shadows[p.name]
                    for table, columns in p.tables.items():
                        await conn.execute(f"DROP TABLE IF EXISTS {shadow[table]}")
                        await conn.execute(f"CREATE TABLE {shadow[table]} {columns}")
                    await conn.execute(
                        f"INSERT INTO {self._cp} (name, version, tx, position, total) "
                        "VALUES ($1, $2, '0'::xid8, 0, $3) ON CONFLICT (name) DO UPDATE SET "
                        "version = excluded.version, tx = '0'::xid8, position = 0, events = 0, "
                        "total = excluded.total, updated_at = now()",
                        p.name + _REBUILDING,
                        p.version_key(),
                        total,
                    )
        log.info("projection.rebuild_started", projections=label, events=total)
        started = time.monotonic()
        position, done = START, 0

        def report(phase: str = "folding") -> None:
            if progress is None:
                return
            elapsed = time.monotonic() - started
            rate = done / elapsed if elapsed > 0 and done else 0.0
            eta = max(total - done, 0) / rate if rate else None
            progress(Progress(name=label, done=done, total=max(total, done), elapsed=elapsed,
                              eta=eta, phase=phase))  # fmt: skip

        report()
        # Fold to the head, page by page, while the live tables keep serving. The next
        # page is read while this one is folded.
        size = self.rebuild_batch
        page = await self.log.read_all(position, size)
        while page:
            position = page[-1].log_position
            ahead = asyncio.ensure_future(self.log.read_all(position, size))
            try:
                await self._fold_shadows(chosen, page, shadows)
            except BaseException:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
                raise
            done += len(page)
            report()
            page = await ahead
        report("indexing")
        async with self.pool.acquire() as conn:
            for p in chosen:
                shadow = shadows[p.name]
                for statement in p.indexes:
                    await conn.execute(statement.format_map({t: shadow[t] for t in p.tables}))
        report("swapping")
        extra = 0
        for p in chosen:
            extra = max(extra, await self._swap(p, shadows[p.name], self.live_tables(p),
                                                p.name + _REBUILDING, position))  # fmt: skip
        done += extra
        report("done")
        log.info("projection.rebuilt", projections=label, events=done,
                 seconds=round(time.monotonic() - started, 3))  # fmt: skip
        return done

    @property
    def _events(self) -> str:
        return f"{_ident(self.log.schema)}.events"

    async def _fold_shadows(
        self,
        chosen: Sequence[Projection],
        page: Sequence[RecordedEvent],
        shadows: Mapping[str, Tables],
    ) -> None:
        """Fold a page into each shadow, each projection in its own transaction on its own
        connection, all at once: the server writes one projection's rows while this process
        folds the next one's. (The shadows are private to the rebuild: nothing reads them,
        and each moves its own marker, so their transactions need not be one.)"""
        last = page[-1]

        async def fold(p: Projection) -> None:
            events = p.wanted(page)
            async with self.pool.acquire() as conn, conn.transaction():
                if events:
                    await p.apply(conn, events, shadows[p.name])
                await conn.execute(
                    f"UPDATE {self._cp} SET tx = $2::text::xid8, position = $3, event_id = $4, "
                    "events = events + $5, last_event_at = $6, updated_at = now() "
                    "WHERE name = $1",
                    p.name + _REBUILDING, str(last.tx), last.position, last.event_id,
                    len(page), last.recorded_at,
                )  # fmt: skip

        tasks = [asyncio.ensure_future(fold(p)) for p in chosen]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _swap(
        self, p: Projection, shadow: Tables, live: Tables, marker: str, position: LogPosition
    ) -> int:
        """The atomic swap; returns the events folded into the shadow inside it."""
        folded = 0
        async with self.pool.acquire() as conn, conn.transaction():
            # The live lane locks this row before it writes the live tables: from
            # here on it waits for the swap, then finds the new checkpoint.
            await conn.execute(
                f"INSERT INTO {self._cp} (name, version, tx, position) "
                "VALUES ($1, $2, '0'::xid8, 0) ON CONFLICT (name) DO NOTHING",
                p.name,
                p.version_key(),
            )
            await conn.execute(f"SELECT 1 FROM {self._cp} WHERE name = $1 FOR UPDATE", p.name)
            last: RecordedEvent | None = None
            while True:  # the events committed since the shadow's last page
                page = await self.log.read_all(position, self.batch)
                if not page:
                    break
                tail = p.wanted(page)
                if tail:
                    await p.apply(conn, tail, shadow)
                folded += len(page)
                last = page[-1]
                position = last.log_position
            for table in p.tables:
                _, physical = live.parts(table)
                await conn.execute(f"DROP TABLE IF EXISTS {live[table]}")
                await conn.execute(f"ALTER TABLE {shadow[table]} RENAME TO {_ident(physical)}")
            row = await conn.fetchrow(
                f"SELECT events, event_id, last_event_at FROM {self._cp} WHERE name = $1", marker
            )
            applied = int(row["events"]) + folded
            event_id = last.event_id if last is not None else row["event_id"]
            at = last.recorded_at if last is not None else row["last_event_at"]
            await conn.execute(
                f"UPDATE {self._cp} SET version = $2, tx = $3::text::xid8, position = $4, "
                "event_id = $5, events = $6, last_event_at = $7, total = NULL, "
                "updated_at = now() WHERE name = $1",
                p.name, p.version_key(), str(position.tx), position.position, event_id,
                applied, at,
            )  # fmt: skip
            await conn.execute(f"DELETE FROM {self._cp} WHERE name = $1", marker)
        return folded

    # -- status ------------------------------------------------------------------

    async def status(self) -> list[ProjectionStatus]:
        """Each registered projection's version, checkpoint and lag."""
        await self.setup()
        rows = {r["name"]: r for r in await self.pool.fetch(f"SELECT * FROM {self._cp}")}
        lag_sql = (
            f"SELECT count(*), min(recorded_at) FROM (SELECT recorded_at FROM {self._events} "
            "WHERE (tx_id, position) > ($1::text::xid8, $2::bigint) "
            "AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) LIMIT 1000000) t"
        )
        now = datetime.now(UTC)
        out = []
        measured: dict[tuple[int, int], tuple[Any, ...]] = {}
        for p in self.projections.values():
            row = rows.get(p.name)
            building = rows.get(p.name + _REBUILDING)
            tx, pos = (int(row["tx"]), row["position"]) if row is not None else (0, 0)
            lags = measured.get((tx, pos))
            if lags is None:  # projections at one checkpoint share its lag: counted once
                lags = measured[(tx, pos)] = tuple(await self.pool.fetchrow(lag_sql, str(tx), pos))
            lag, oldest = lags
            if building is not None:
                state = "rebuilding"
            elif row is None:
                state = "new"
            elif row["version"] != p.version_key():
                state = "stale"
            else:
                state = "live"
            out.append(
                ProjectionStatus(
                    name=p.name,
                    version=p.version_key(),
                    built_version=row["version"] if row is not None else None,
                    state=state,
                    position=f"{tx}:{pos}" if row is not None else None,
                    events_applied=int(row["events"]) if row is not None else 0,
                    lag_events=int(lag),
                    lag_seconds=max((now - oldest).total_seconds(), 0.0) if oldest else 0.0,
                    updated_at=row["updated_at"] if row is not None else None,
                    rebuild_done=int(building["events"]) if building is not None else None,
                    rebuild_total=(int(building["total"] or 0) if building is not None else None),
                )
            )
        return out
