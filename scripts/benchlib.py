"""What the benchmark scripts share: figures and their rows, the README block, the machine,
quiet logging, the servers and their description, child processes, dropping scratch schemas.

A figure is a median over runs. Rate figures (any unit but ``ms`` and ``×``)
get a ratio to their ceiling and a target share of it; ``ms`` figures a target
to stay below, ``×`` figures (a ratio of two readings, such as memory after 5
minutes over memory after 1) a target to stay at or below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog
from rich.console import Console

T = TypeVar("T")

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Units of figures whose target is an upper bound rather than a share of a ceiling.
BOUNDED_UNITS = frozenset({"ms", "×"})


@dataclasses.dataclass
class Figure:
    name: str
    unit: str
    ceiling_key: str | None = None
    #: A share of the ceiling to reach (rates), or a value to stay below (ms).
    target: float | None = None
    runs: list[float] = dataclasses.field(default_factory=list)

    @property
    def value(self) -> float | None:
        runs = [r for r in self.runs if not math.isnan(r)]
        return statistics.median(runs) if runs else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def figure_rows(figures: dict[str, Figure]) -> list[dict[str, Any]]:
    """The ``--json`` rows: ratio is value / ceiling for rates only."""
    rows = []
    for f in figures.values():
        ceiling = figures[f.ceiling_key].value if f.ceiling_key else None
        rate = f.unit not in BOUNDED_UNITS
        ratio = f.value / ceiling if rate and f.value and ceiling else None
        digits = 1 if rate else 2
        rows.append(
            {
                "name": f.name,
                "value": _round(f.value, digits),
                "unit": f.unit,
                "ceiling": _round(ceiling, digits),
                "ratio": _round(ratio, 3),
                "target": f.target,
            }
        )
    return rows


def met(row: dict[str, Any]) -> bool | None:
    if row["target"] is None:
        return None
    if row["unit"] in BOUNDED_UNITS:
        if row["value"] is None:
            return None
        value, bound = float(row["value"]), float(row["target"])
        return value <= bound if row["unit"] == "×" else value < bound
    return None if row["ratio"] is None else row["ratio"] >= row["target"]


def cells(row: dict[str, Any]) -> list[str]:
    """value, ceiling, ratio, target and mark, as text."""

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:,.2f}" if row["unit"] in ("ms", "×") else f"{v:,.0f}"

    target = ""
    if row["target"] is not None:
        target = (
            f"<{row['target']:g} ms" if row["unit"] == "ms"
            else f"≤{row['target']:g}×" if row["unit"] == "×"
            else f"≥{row['target']:.0%}"
        )  # fmt: skip
    ok = met(row)
    mark = "" if row["target"] is None else "?" if ok is None else "✓ pass" if ok else "✗ MISS"
    ratio = "" if row["ratio"] is None else f"{row['ratio']:.1%}"
    return [num(row["value"]), num(row["ceiling"]), ratio, target, mark]


def readme_table(figures: dict[str, Figure]) -> list[str]:
    """The figures as the lines of a Markdown table (the README block's)."""
    lines = [
        "| figure | value | unit | ceiling | ratio | target | |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in figure_rows(figures):
        value, ceiling, ratio, target, mark = cells(row)
        lines.append(
            f"| {row['name']} | {value} | {row['unit']} | {ceiling} | {ratio} | {target} | {mark} |"
        )
    return lines


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``ordered`` (seconds), in milliseconds."""
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] * 1000


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (``VmRSS`` of /proc/<pid>/status);
    NaN if the process is gone or the kernel does not say."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    return math.nan


def proc_cpu(pid: int) -> float:
    """CPU seconds so far of process ``pid`` (all its threads, user and system), from
    /proc/<pid>/stat; NaN if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return math.nan


async def reap(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Wait up to ``grace`` seconds for child ``proc`` to exit, then kill it and wait."""
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def with_db(url: str, db: int) -> str:
    """``url`` pointed at Redis database ``db`` (the path for redis://, ``?db=`` for unix://)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"]
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=urlencode([*query, ("db", str(db))])))
    return urlunsplit(parts._replace(path=f"/{db}", query=urlencode(query)))


def server_version(info: dict[str, Any]) -> str:
    """The server's name and version from its ``INFO server``, as it reports them at run time:
    ``Valkey 9.0.0`` from Valkey (whose ``redis_version`` is a fixed compatibility
    number), ``Redis 7.4.2`` from Redis."""
    name = str(info.get("server_name") or "redis")
    version = info.get(f"{name}_version") or info.get("redis_version") or "?"
    return f"{name[:1].upper()}{name[1:]} {version}"


@dataclasses.dataclass
class Servers:
    """The Redis and PostgreSQL a benchmark runs on, and where each came from
    (``REDIS_URL`` / ``DATABASE_URL`` or ``embedded``)."""

    redis_url: str
    database_url: str
    redis_mode: str
    pg_mode: str
    #: True when the benchmark may rewrite Redis's AOF (an embedded server).
    redis_owned: bool


def add_server_options(parser: argparse.ArgumentParser, redis_db: int) -> None:
    """The options of :func:`servers`: ``--redis-db`` (default ``redis_db``), ``--state-dir``,
    ``--keep-server``."""
    add = parser.add_argument
    add(
        "--redis-db",
        type=int,
        default=redis_db,
        help=f"the Redis database the benchmark flushes ({redis_db})",
    )
    add(
        "--state-dir",
        type=Path,
        default=Path(".agentrt/bench"),
        help="embedded servers' state when REDIS_URL/DATABASE_URL are unset (.agentrt/bench)",
    )
    add("--keep-server", action="store_true", help="leave embedded servers this run started")


@contextlib.contextmanager
def servers(args: argparse.Namespace, err: Console) -> Iterator[Servers]:
    """REDIS_URL / DATABASE_URL if set, else the embedded durable servers in
    ``args.state_dir`` (stopped after, if this run started them and not
    ``args.keep_server``); Redis pointed at ``args.redis_db``."""
    from runtime.ops.embedded import EmbeddedServices

    redis_url, database_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    stops = []
    redis_mode, pg_mode = "REDIS_URL", "DATABASE_URL"
    if not redis_url or not database_url:
        services = EmbeddedServices(args.state_dir)
        need_redis, need_pg = not redis_url, not database_url
        running = {
            "redis": need_redis and services.redis.state().running,
            "postgres": need_pg and services.postgres.running_pid() is not None,
        }
        started = time.perf_counter()
        urls = services.up(redis=need_redis, postgres=need_pg)
        err.print(
            f"[dim]embedded servers in {args.state_dir}: "
            + ", ".join(
                f"{name} {'already running' if running[name] else 'started'}"
                for name, need in (("redis", need_redis), ("postgres", need_pg))
                if need
            )
            + f" ({time.perf_counter() - started:.1f}s)[/]"
        )
        if need_redis:
            redis_url, redis_mode = urls["REDIS_URL"], "embedded"
            if not running["redis"] and not args.keep_server:
                stops.append(services.redis.stop)
        if need_pg:
            database_url, pg_mode = urls["DATABASE_URL"], "embedded"
            if not running["postgres"] and not args.keep_server:
                stops.append(services.postgres.stop)
    assert redis_url and database_url
    try:
        yield Servers(
            with_db(redis_url, args.redis_db), database_url, redis_mode, pg_mode,
            redis_owned=redis_mode == "embedded",
        )  # fmt: skip
    finally:
        for stop in stops:
            err.print("[dim]stopping an embedded server this run started[/]")
            stop()


async def claim_redis_db(redis: Any, db: int, ours: Callable[[bytes], bool], foreign: str) -> None:
    """Wait (up to 120 s) for a freshly started Redis to load its AOF, then refuse
    (``SystemExit``, the client closed) a database ``db`` holding a key that is not
    ``ours``: the benchmark flushes it. ``foreign`` says what such a key is, in the message."""
    from redis.exceptions import BusyLoadingError

    deadline = time.monotonic() + 120
    while True:
        try:
            if not int((await redis.info("persistence")).get("loading", 0)):
                break
        except BusyLoadingError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("Redis was still loading its data after 120s")
        await asyncio.sleep(0.1)
    async for key in redis.scan_iter(count=100):
        if not ours(key):
            await redis.aclose()
            raise SystemExit(
                f"Redis database {db} holds {key!r}, {foreign}: refusing to flush it; pick an "
                "empty database with --redis-db"
            )


async def describe_servers(srv: Servers, admin: Any, redis: Any, err: Console) -> tuple[str, str]:
    """What the run's PostgreSQL (asyncpg connection ``admin``) and Redis are, for the
    figures' context: version, origin and durability settings; a warning when PostgreSQL
    does not run with fsync and synchronous_commit on."""
    from redis.exceptions import RedisError

    version = str(await admin.fetchval("SHOW server_version"))
    fsync = await admin.fetchval("SHOW fsync")
    sync_commit = await admin.fetchval("SHOW synchronous_commit")
    if fsync != "on" or sync_commit != "on":
        err.print(
            f"[bold yellow]warning:[/] PostgreSQL runs with fsync={fsync}, "
            f"synchronous_commit={sync_commit}: these are not durable figures"
        )
    rinfo = await redis.info("server")
    try:
        conf = await redis.config_get("append*")
        aof = (f"AOF, appendfsync {conf.get('appendfsync', '?')}"
               if conf.get("appendonly") == "yes" else "AOF off")  # fmt: skip
    except RedisError:
        aof = "durability unknown"
    postgres = (
        f"PostgreSQL {version} ({srv.pg_mode}, fsync={fsync}, synchronous_commit={sync_commit})"
    )
    return postgres, f"{server_version(rinfo)} ({srv.redis_mode}, {aof})"


def main_consoles(as_json: bool, width: int = 180) -> tuple[Console, Console]:
    """A benchmark's start: quiet logging, SIGTERM raised as KeyboardInterrupt (so cleanups
    run), and its consoles ``(err, out)``: ``err`` on stderr, ``out`` for the human output on
    stdout, or on stderr when stdout carries the ``--json`` line; ``width`` columns when it is
    not a terminal."""
    quiet_logging()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    err = Console(stderr=True)
    out = err if as_json else Console()
    if not out.is_terminal:
        out = Console(stderr=out.stderr, width=width)
    return err, out


def run_on_servers(
    args: argparse.Namespace, err: Console, run: Callable[[Servers], Coroutine[Any, Any, T]]
) -> T | None:
    """``asyncio.run(run(srv))`` on :func:`servers`; None when interrupted (after saying so)."""
    try:
        with servers(args, err) as srv:
            return asyncio.run(run(srv))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return None


def print_json_line(rows: list[dict[str, Any]]) -> None:
    """The ``--json`` output: stdout's last line, one object ``{"figures": rows}``."""
    print(json.dumps({"figures": rows}), flush=True)


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # less idle and iowait


def machine() -> str:
    cpu, memory = "unknown CPU", "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line for line in lines if line.startswith("model name")).split(":", 1)[1]
        lines = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(line for line in lines if line.startswith("MemTotal:")).split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    return f"{len(os.sched_getaffinity(0))} CPUs ({cpu.strip()}), {memory} RAM"


def write_readme(readme: Path, name: str, block: str, err: Console) -> None:
    """Replace what stands between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    mark_start, mark_end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    try:
        text = readme.read_text(encoding="utf-8")
    except FileNotFoundError:
        err.print(f"[yellow]warning:[/] {readme} not found; not written")
        return
    start, end = text.find(mark_start), text.find(mark_end)
    if start < 0 or end < start:
        err.print(f"[yellow]warning:[/] {readme} has no {mark_start} markers; left unchanged")
        return
    readme.write_text(text[:start] + block + text[end + len(mark_end) :], encoding="utf-8")
    err.print(f"[dim]wrote the figures into {readme}[/]")


def quiet_logging() -> None:
    """Runtime log lines go to stderr, warnings and up only (stdout is for figures)."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


async def drop_schemas(admin: Any, schemas: Sequence[str], err: Console) -> None:
    """``DROP SCHEMA ... CASCADE`` each of ``schemas`` on asyncpg connection ``admin``;
    a failure is a warning."""
    import asyncpg

    for schema in schemas:
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        except asyncpg.PostgresError as exc:
            err.print(f"[yellow]warning:[/] could not drop schema {schema}: {exc}")


@dataclasses.dataclass
class Count:
    """A counted figure (the chaos run's lost events, duplicates, ...) and the most it may be:
    ``bound`` 0 for what must never happen, None for a figure without a target."""

    name: str
    value: int
    unit: str
    bound: int | None = None


def count_rows(counts: dict[str, Count]) -> list[dict[str, Any]]:
    """The ``--json`` rows of counted figures: the same keys as :func:`figure_rows`, no
    ceiling or ratio; ``target`` is the bound to stay at or below."""
    return [
        {"name": c.name, "value": c.value, "unit": c.unit, "ceiling": None, "ratio": None,
         "target": c.bound}
        for c in counts.values()
    ]  # fmt: skip


def count_met(row: dict[str, Any]) -> bool | None:
    """Whether a counted figure stayed within its bound (None: no bound)."""
    return None if row["target"] is None else row["value"] <= row["target"]


def count_cells(row: dict[str, Any]) -> list[str]:
    """value, ceiling, ratio, target and mark of a counted figure, as text."""
    ok = count_met(row)
    target = "" if row["target"] is None else f"≤{row['target']:,}"
    mark = "" if ok is None else "✓ pass" if ok else "✗ MISS"
    return [f"{row['value']:,}", "", "", target, mark]


def count_table(counts: dict[str, Count]) -> list[str]:
    """Counted figures as the lines of a Markdown table (the columns of :func:`readme_table`)."""
    lines = [
        "| figure | value | unit | ceiling | ratio | target | |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in count_rows(counts):
        value, ceiling, ratio, target, mark = count_cells(row)
        lines.append(
            f"| {row['name']} | {value} | {row['unit']} | {ceiling} | {ratio} | {target} | {mark} |"
        )
    return lines
