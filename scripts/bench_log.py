"""Benchmark the PostgreSQL event log against raw asyncpg ceilings on the same server.

One run measures, side by side and on the same PostgreSQL server:

ceilings (raw asyncpg, one connection, a plain copy of the log's table):
  * single-row ``INSERT``, one per autocommit transaction (rows/s = tx/s);
  * ``COPY`` of 1000 rows per transaction (``copy_records_to_table``);
  * a keyset-paged ``SELECT`` of the table, 1000 rows a page, raw Records.

the log (``runtime.log.EventLog``, through the runtime's pool):
  * ``append`` with 1, 100 and 1000 typed events per call, each call to a new
    stream with ``expected_version=NO_STREAM`` (the optimistic check runs);
  * ``read_all`` plus decoding into typed events, paged by 1000 following
    ``log_position``.

The ceiling table is created ``LIKE <log schema>.events INCLUDING ALL`` in a
scratch schema: the same columns, types, defaults (identity position,
``tx_id = pg_current_xact_id()``), CHECK constraints and indexes (primary key,
unique event id, unique (stream, version), (tx_id, position)), but no trigger
and no append function. Raw rows are built before the clock starts (a raw
client has its bytes ready); the log's figures include its own encoding of
typed msgspec events. Both get the same bodies (about 300-500 bytes of JSON),
uuid ids and 32-byte hashes.

Servers: ``DATABASE_URL`` (a superuser or schema-owner URL) if set, otherwise
an embedded PostgreSQL in ``--state-dir`` (default ``.agentrt/bench``) with
its durable defaults (fsync on). Everything goes into fresh ``bench_<random>``
schemas that are dropped at the end.

Usage::

    .venv/bin/python scripts/bench_log.py            # full run, about a minute (2 cores)
    .venv/bin/python scripts/bench_log.py --quick    # well under a minute
    .venv/bin/python scripts/bench_log.py --json     # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/bench_log.py --write-readme

The exit code is 0 whatever the figures: this is a measurement, not a test.
Missed targets are listed at the end of the human output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import random
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from benchlib import (
    Figure,
    cells,
    drop_schemas,
    figure_rows,
    machine,
    met,
    quiet_logging,
    readme_table,
    write_readme,
)
from rich.console import Console
from rich.table import Table

from runtime.events.model import (
    START,
    Event,
    LogPosition,
    NewEvent,
    encode_body,
    event_type_of,
    new_event_id,
    utcnow,
)
from runtime.log.migrations import migrate
from runtime.log.pool import connect, open_runtime_pool, redact
from runtime.log.store import NO_STREAM, EventLog
from runtime.ops.embedded import EmbeddedServices
from runtime.settings import Settings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARK_START = "<!-- bench_log:start -->"
MARK_END = "<!-- bench_log:end -->"
TARGET = 0.7
PAGE = 1000

#: The columns a raw writer fills (position and tx_id come from their defaults).
INSERT_COLUMNS = (
    "event_id",
    "stream_id",
    "stream_version",
    "event_type",
    "schema_version",
    "run_id",
    "causation_id",
    "producer",
    "recorded_at",
    "trace",
    "data",
    "prev_hash",
    "hash",
)
#: The columns the log reads back, in the log's own order.
SELECT_COLUMNS = (
    "position, tx_id, event_id, stream_id, stream_version, event_type, schema_version, run_id, "
    "causation_id, producer, recorded_at, trace, data, prev_hash, hash"
)


class BenchSample(Event, tag="bench.sample"):
    """The benchmark's event body: a few strings, an int and a list of strings."""

    subject: str
    sender: str
    attempt: int
    labels: list[str]
    summary: str


# -- workload -------------------------------------------------------------------------


# fmt: off
_WORDS = (
    "invoice", "shipment", "customer", "refund", "priority", "escalate", "review", "contract",
    "renewal", "support", "billing", "account", "urgent", "follow", "update", "request",
    "approval", "pending", "resolved", "agent", "handoff", "quote", "order", "delivery",
)
# fmt: on


class Workload:
    """Builds typed events and the equivalent raw rows, deterministically."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self._streams = 0

    def stream(self, prefix: str = "bench") -> str:
        self._streams += 1
        return f"{prefix}-{self._streams}"

    def _text(self, low: int, high: int) -> str:
        target = self._rng.randint(low, high)
        words: list[str] = []
        size = 0
        while size < target:
            word = self._rng.choice(_WORDS)
            words.append(word)
            size += len(word) + 1
        return " ".join(words)[:target]

    def body(self) -> BenchSample:
        rng = self._rng
        return BenchSample(
            subject=self._text(40, 70),
            sender=f"{rng.choice(_WORDS)}.{rng.randint(1, 9999)}@example.com",
            attempt=rng.randint(0, 100_000),
            labels=[rng.choice(_WORDS) for _ in range(rng.randint(3, 6))],
            summary=self._text(150, 300),
        )

    def events(self, n: int) -> list[NewEvent]:
        run_id = new_event_id()
        cause = new_event_id()
        trace = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        return [
            NewEvent(
                body=self.body(),
                event_id=new_event_id(),
                run_id=run_id,
                causation_id=cause,
                producer="bench-agent",
                trace=trace,
                recorded_at=utcnow(),
            )
            for _ in range(n)
        ]

    def rows(self, n: int, stream: str) -> list[tuple[Any, ...]]:
        """``n`` raw rows of one stream (versions 1..n), in ``INSERT_COLUMNS`` order."""
        out: list[tuple[Any, ...]] = []
        for version, ev in enumerate(self.events(n), start=1):
            out.append(
                (
                    ev.event_id,
                    stream,
                    version,
                    event_type_of(ev.body),
                    type(ev.body).__schema_version__,
                    ev.run_id,
                    ev.causation_id,
                    ev.producer,
                    ev.recorded_at,
                    ev.trace,
                    encode_body(ev.body).decode(),
                    os.urandom(32),
                    os.urandom(32),
                )
            )
        return out


# -- figures --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    single: int
    batch100_calls: int
    batch1000_calls: int
    copy_batches: int
    #: Rows each read pass covers (small enough that both tables stay in shared_buffers).
    read_rows: int
    #: Timed passes over those rows per measurement.
    read_passes: int
    warmup_single: int


FULL = Sizes(
    single=4000,
    batch100_calls=500,
    batch1000_calls=100,
    copy_batches=150,
    read_rows=50_000,
    read_passes=4,
    warmup_single=100,
)
QUICK = Sizes(
    single=2000,
    batch100_calls=200,
    batch1000_calls=40,
    copy_batches=50,
    read_rows=30_000,
    read_passes=3,
    warmup_single=50,
)


def new_figures() -> dict[str, Figure]:
    f = Figure
    return {
        "raw_insert": f("raw INSERT, 1 row per tx (ceiling)", "rows/s"),
        "raw_copy": f("raw COPY, 1000 rows per tx (ceiling)", "rows/s"),
        "raw_select": f("raw SELECT, keyset pages of 1000 (ceiling)", "rows/s"),
        "append_1": f("EventLog.append, batch 1", "events/s", "raw_insert", TARGET),
        "append_100": f("EventLog.append, batch 100", "events/s", "raw_copy"),
        "append_1000": f("EventLog.append, batch 1000", "events/s", "raw_copy", TARGET),
        "read_all": f(
            "EventLog.read_all + decode, pages of 1000", "events/s", "raw_select", TARGET
        ),
    }


# -- the servers ----------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    admin_url: str
    mode: str


@contextlib.contextmanager
def server(state_dir: Path, keep: bool, err: Console) -> Iterator[Server]:
    """The server to measure: DATABASE_URL if set, else an embedded (durable) one."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield Server(url, "DATABASE_URL")
        return
    services = EmbeddedServices(state_dir)
    was_running = services.postgres.running_pid() is not None
    started = time.perf_counter()
    urls = services.up(postgres=True, redis=False)
    err.print(
        f"[dim]embedded PostgreSQL in {state_dir} "
        f"({'already running' if was_running else 'started'}, "
        f"{time.perf_counter() - started:.1f}s)[/]"
    )
    stop = None if was_running or keep else services.postgres.stop
    try:
        yield Server(urls["DATABASE_URL"], f"embedded ({state_dir})")
    finally:
        if stop is not None:
            err.print("[dim]stopping embedded PostgreSQL[/]")
            stop()


# -- measurements ---------------------------------------------------------------------


async def checkpoint(admin: asyncpg.Connection) -> None:
    """Flush dirty buffers so one phase's checkpoint does not land in the next."""
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await admin.execute("CHECKPOINT")


async def raw_insert(
    conn: asyncpg.Connection, table: str, wl: Workload, n: int, warmup: int
) -> float:
    sql = (
        f"INSERT INTO {table} ({', '.join(INSERT_COLUMNS)}) VALUES "
        f"({', '.join(f'${i}' for i in range(1, len(INSERT_COLUMNS) + 1))})"
    )
    for row in [wl.rows(1, wl.stream("raw"))[0] for _ in range(warmup)]:
        await conn.execute(sql, *row)
    rows = [wl.rows(1, wl.stream("raw"))[0] for _ in range(n)]
    t0 = time.perf_counter()
    for row in rows:
        await conn.execute(sql, *row)
    return n / (time.perf_counter() - t0)


async def raw_copy(conn: asyncpg.Connection, schema: str, wl: Workload, batches: int) -> float:
    async def copy(records: list[tuple[Any, ...]]) -> None:
        await conn.copy_records_to_table(
            "events", schema_name=schema, columns=list(INSERT_COLUMNS), records=records
        )

    await copy(wl.rows(PAGE, wl.stream("raw")))
    prepared = [wl.rows(PAGE, wl.stream("raw")) for _ in range(batches)]
    t0 = time.perf_counter()
    for records in prepared:
        await copy(records)
    return batches * PAGE / (time.perf_counter() - t0)


async def raw_select(conn: asyncpg.Connection, table: str, n: int, passes: int) -> float:
    sql = (
        f"SELECT {SELECT_COLUMNS} FROM {table} "
        "WHERE (tx_id, position) > ($1::xid8, $2::bigint) ORDER BY tx_id, position LIMIT $3"
    )

    async def scan(limit: int) -> int:
        tx, pos, read = 0, 0, 0
        while read < limit:
            rows = await conn.fetch(sql, tx, pos, PAGE)
            if not rows:
                break
            read += len(rows)
            tx, pos = rows[-1][1], rows[-1][0]
        return read

    await scan(n)  # warm-up: plans, caches, and hint bits set on the fresh rows
    t0 = time.perf_counter()
    read = sum([await scan(n) for _ in range(passes)])
    return read / (time.perf_counter() - t0)


async def log_append(lg: EventLog, wl: Workload, batch: int, calls: int) -> float:
    for _ in range(3 if batch >= 100 else 20):
        await lg.append(wl.stream(), wl.events(batch), NO_STREAM)
    prepared = [(wl.stream(), wl.events(batch)) for _ in range(calls)]
    t0 = time.perf_counter()
    for stream, events in prepared:
        await lg.append(stream, events, NO_STREAM)
    return calls * batch / (time.perf_counter() - t0)


async def log_read(lg: EventLog, n: int, passes: int) -> float:
    async def scan(limit: int) -> int:
        after: LogPosition = START
        read = 0
        while read < limit:
            events = await lg.read_all(after, PAGE)
            if not events:
                break
            read += len(events)
            after = events[-1].log_position
        return read

    await scan(n)  # warm-up, as for the raw scan
    t0 = time.perf_counter()
    read = sum([await scan(n) for _ in range(passes)])
    return read / (time.perf_counter() - t0)


async def top_up(
    admin: asyncpg.Connection,
    lg: EventLog,
    raw_schema: str,
    log_schema: str,
    wl: Workload,
    rows: int,
) -> None:
    """Make sure both tables hold at least ``rows`` rows for the read measurements."""
    have = await admin.fetchval(f'SELECT count(*) FROM "{raw_schema}".events')
    while have < rows:
        await admin.copy_records_to_table(
            "events",
            schema_name=raw_schema,
            columns=list(INSERT_COLUMNS),
            records=wl.rows(PAGE, wl.stream("raw")),
        )
        have += PAGE
    have = await admin.fetchval(f'SELECT count(*) FROM "{log_schema}".events')
    while have < rows:
        await lg.append(wl.stream(), wl.events(PAGE), NO_STREAM)
        have += PAGE
    await admin.execute(f'ANALYZE "{raw_schema}".events')
    await admin.execute(f'ANALYZE "{log_schema}".events')


# -- the run --------------------------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    mode: str
    url: str
    version: str
    durability: str
    notify: bool
    ceiling_table: str
    body_bytes: str
    repeat: int
    sizes: Sizes
    seconds: float = 0.0


async def describe_tables(admin: asyncpg.Connection, log_schema: str, raw_schema: str) -> str:
    """Check the ceiling table matches the log's; describe it in one sentence."""

    async def shape(schema: str) -> tuple[list[tuple[str, str]], list[str], int]:
        cols = await admin.fetch(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a "
            "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum",
            f'"{schema}".events',
        )
        idx = await admin.fetch(
            "SELECT pg_get_indexdef(indexrelid) AS d FROM pg_index WHERE indrelid = $1::regclass",
            f'"{schema}".events',
        )
        triggers = await admin.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
            f'"{schema}".events',
        )
        defs = sorted(
            r["d"].split(" USING ", 1)[1] + (" unique" if "UNIQUE" in r["d"] else "") for r in idx
        )
        return [(r["attname"], r["t"]) for r in cols], defs, int(triggers)

    log_cols, log_idx, log_trg = await shape(log_schema)
    raw_cols, raw_idx, raw_trg = await shape(raw_schema)
    if log_cols != raw_cols or log_idx != raw_idx or raw_trg:
        raise RuntimeError(f"ceiling table differs from the log's: {raw_cols} {raw_idx}")
    return (
        f"{raw_schema}.events = LIKE {log_schema}.events INCLUDING ALL: same {len(raw_cols)} "
        f"columns and types, defaults and CHECKs, same {len(raw_idx)} indexes "
        f"({'; '.join(raw_idx)}); no triggers (the log has {log_trg}, none on INSERT), "
        f"no append function; raw rows pre-built before timing"
    )


async def run(
    args: argparse.Namespace, srv: Server, err: Console
) -> tuple[dict[str, Figure], RunInfo]:
    sizes = QUICK if args.quick else FULL
    tag = secrets.token_hex(4)
    log_schema, raw_schema = f"bench_{tag}", f"bench_{tag}_raw"
    settings = Settings.from_env(db_schema=log_schema).with_urls(
        redis_url=None, database_url=srv.admin_url
    )
    admin = await connect(settings.require_database_url())
    pool: asyncpg.Pool | None = None
    raw: asyncpg.Connection | None = None
    figures = new_figures()
    try:
        version = str(await admin.fetchval("SHOW server_version"))
        fsync = await admin.fetchval("SHOW fsync")
        sync_commit = await admin.fetchval("SHOW synchronous_commit")
        durability = f"fsync={fsync}, synchronous_commit={sync_commit}"
        if fsync != "on" or sync_commit != "on":
            err.print(
                f"[bold yellow]warning:[/] the server runs with {durability}: "
                "these are not durable figures"
            )
        err.print(f"[dim]migrating scratch schema {log_schema}[/]")
        await migrate(settings)
        await admin.execute(f'CREATE SCHEMA "{raw_schema}"')
        await admin.execute(
            f'CREATE TABLE "{raw_schema}".events (LIKE "{log_schema}".events INCLUDING ALL)'
        )
        ceiling_table = await describe_tables(admin, log_schema, raw_schema)
        pool = await open_runtime_pool(settings)
        lg = EventLog(pool, schema=log_schema)
        raw = conn = await connect(settings.require_database_url())
        wl = Workload()
        sample = [len(encode_body(wl.body())) for _ in range(2000)]
        body_bytes = f"{min(sample)}..{max(sample)} bytes, mean {statistics.fmean(sample):.0f}"
        table = f'"{raw_schema}".events'
        info = RunInfo(
            srv.mode,
            redact(settings.require_database_url()),
            version,
            durability,
            settings.log_notify,
            ceiling_table,
            body_bytes,
            args.repeat,
            sizes,
        )

        async def measure(key: str, label: str, fn: Callable[[], Awaitable[float]]) -> None:
            await checkpoint(admin)
            # The benchmark holds its whole workload in memory; a long-running
            # reader or writer does not. Freeze what exists so the collector
            # does not rescan it on every pass (the same for ceiling and log).
            gc.collect()
            gc.freeze()
            err.print(f"  {label} ...", end="")
            t0 = time.perf_counter()
            value = await fn()
            figures[key].runs.append(value)
            err.print(f" {value:,.0f} {figures[key].unit} ({time.perf_counter() - t0:.1f}s)")

        started = time.perf_counter()
        for r in range(args.repeat):
            err.print(f"[bold]repeat {r + 1}/{args.repeat}[/]")
            # Pairs measured back to back, in alternating order, so drift on a
            # noisy machine hits ceiling and log alike.
            pairs: list[list[tuple[str, str, Callable[[], Awaitable[float]]]]] = [
                [
                    (
                        "raw_insert",
                        f"raw INSERT x{sizes.single}",
                        lambda: raw_insert(conn, table, wl, sizes.single, sizes.warmup_single),
                    ),
                    (
                        "append_1",
                        f"append batch 1 x{sizes.single}",
                        lambda: log_append(lg, wl, 1, sizes.single),
                    ),
                ],
                [
                    (
                        "raw_copy",
                        f"raw COPY 1000 x{sizes.copy_batches}",
                        lambda: raw_copy(conn, raw_schema, wl, sizes.copy_batches),
                    ),
                    (
                        "append_1000",
                        f"append batch 1000 x{sizes.batch1000_calls}",
                        lambda: log_append(lg, wl, 1000, sizes.batch1000_calls),
                    ),
                    (
                        "append_100",
                        f"append batch 100 x{sizes.batch100_calls}",
                        lambda: log_append(lg, wl, 100, sizes.batch100_calls),
                    ),
                ],
                [
                    (
                        "raw_select",
                        f"raw SELECT {sizes.read_rows} rows x{sizes.read_passes}",
                        lambda: raw_select(conn, table, sizes.read_rows, sizes.read_passes),
                    ),
                    (
                        "read_all",
                        f"read_all + decode {sizes.read_rows} events x{sizes.read_passes}",
                        lambda: log_read(lg, sizes.read_rows, sizes.read_passes),
                    ),
                ],
            ]
            for i, pair in enumerate(pairs):
                if i == 2 and r == 0:
                    await top_up(admin, lg, raw_schema, log_schema, wl, sizes.read_rows)
                for key, label, fn in pair if r % 2 == 0 else list(reversed(pair)):
                    await measure(key, label, fn)
        info.seconds = time.perf_counter() - started
        return figures, info
    finally:
        if raw is not None:
            await raw.close()
        if pool is not None:
            await pool.close()
        await drop_schemas(admin, (raw_schema, log_schema), err)
        await admin.close()


# -- output ---------------------------------------------------------------------------


def dashed(row: dict[str, Any]) -> list[str]:
    """``cells`` for the terminal: a dash where there is nothing, ``info`` for a ratio
    without a target."""
    *numbers, mark = cells(row)
    if not mark and row["ceiling"] is not None:
        mark = "info"
    return [cell or "—" for cell in numbers] + [mark]


def render(figures: dict[str, Figure], info: RunInfo, out: Console) -> None:
    rows = figure_rows(figures)
    sizes = info.sizes
    out.print(
        f"[bold]agentrt event log benchmark[/]  PostgreSQL {info.version}, {info.mode}, "
        f"{info.durability}, NOTIFY {'on' if info.notify else 'off'}"
    )
    out.print(f"[dim]server: {info.url}[/]")
    out.print(f"[dim]ceiling table: {info.ceiling_table}[/]")
    out.print(
        f"[dim]event bodies: {info.body_bytes} of JSON; one connection, sequential calls; "
        f"median of {info.repeat} run(s); {sizes.single} single rows, "
        f"{sizes.copy_batches} COPYs / {sizes.batch1000_calls} appends of 1000, "
        f"{sizes.batch100_calls} appends of 100, {sizes.read_passes} passes over the first "
        f"{sizes.read_rows} rows per run "
        f"({info.seconds:.0f}s measuring)[/]"
    )
    table = Table(show_lines=False)
    for col in ("figure", "value", "unit", "ceiling", "ratio", "target", "", "runs"):
        table.add_column(col, justify="left" if col in ("figure", "unit", "") else "right")
    for row, f in zip(rows, figures.values(), strict=True):
        value, ceiling, ratio, target, mark = dashed(row)
        runs = ", ".join(f"{v:,.0f}" for v in f.runs) if len(f.runs) > 1 else ""
        style = "red" if "MISS" in mark else ("green" if "pass" in mark else "")
        table.add_row(
            row["name"],
            value,
            row["unit"],
            ceiling,
            ratio,
            target,
            f"[{style}]{mark}[/]" if style else mark,
            runs,
        )
    out.print(table)
    missed = [r for r in rows if r["target"] is not None and not met(r)]
    if missed:
        out.print("[bold red]targets missed:[/]")
        for r in missed:
            value, ceiling, ratio, target, _ = dashed(r)
            out.print(
                f"  [red]✗[/] {r['name']}: {value} {r['unit']} is "
                f"{'n/a' if r['ratio'] is None else ratio} of its ceiling {ceiling}, "
                f"target {target}"
            )
    else:
        out.print("[bold green]all targets met[/]")


def readme_block(figures: dict[str, Figure], info: RunInfo) -> str:
    mode = "DATABASE_URL" if info.mode == "DATABASE_URL" else "embedded"
    lines = [
        MARK_START,
        f"Measured with `scripts/bench_log.py` on {dt.date.today().isoformat()}: "
        f"{machine()}, PostgreSQL {info.version} "
        f"({mode}, {info.durability}, NOTIFY {'on' if info.notify else 'off'}), "
        f"median of {info.repeat} run(s). Ceilings are raw asyncpg on a copy of the `events` "
        f"table without triggers or the append function; bodies are {info.body_bytes} of JSON.",
        "",
        *readme_table(figures),
        MARK_END,
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark EventLog against raw asyncpg ceilings on the same PostgreSQL."
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smaller run (well under a minute with server start)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"figures": [...]} as the last line of stdout (the table goes to stderr)',
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per measurement, medians reported (default 3, quick 2)",
    )
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help="replace the bench_log block of README.md with the figures",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".agentrt/bench"),
        help="embedded server state directory (default .agentrt/bench)",
    )
    parser.add_argument(
        "--keep-server",
        action="store_true",
        help="leave an embedded server this run started running",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    err = Console(stderr=True)
    # The human table goes to stdout, or to stderr when stdout carries the JSON.
    out = err if args.json else Console()
    if not out.is_terminal:
        out = Console(stderr=out.stderr, width=160)
    with server(args.state_dir, args.keep_server, err) as srv:
        figures, info = asyncio.run(run(args, srv, err))
    render(figures, info, out)
    if args.write_readme:
        write_readme(README, "bench_log", readme_block(figures, info), err)
    if args.json:
        print(json.dumps({"figures": figure_rows(figures)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
