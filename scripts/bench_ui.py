"""Benchmark the run explorer's pages against the JSON routes serving the same data.

In a throwaway schema it builds:

  - a run of about 1,000 events (a trigger, two activations of ~500 LLM and tool
    steps each, their emitted events and completions, an approval, a dead letter),
    appended through ``EventLog.append`` and folded by the real projector;
  - 100,000 more rows of the ``runs`` read model, copies of that run's row with new
    ids, times, statuses and costs, written by COPY: the runs table's figure measures
    the query and the rendering, not the projector (bench_projections measures that).

Then, in-process (httpx through ASGITransport to ``create_api``'s app, with its
lifespan; the session cookie for /ui, the bearer for JSON), alternating page and JSON
requests one at a time, it reports the median server time of

  a. the run page, ``GET /ui/runs/{id}`` of the 1,000-event run, beside its JSON
     counterpart ``GET /runs/{id}`` + ``GET /runs/{id}/timeline``: target ratio <= 2,
     and under 200 ms;
  b. a page of the runs table, ``GET /ui/`` (50 runs, newest first) over the 100,000
     runs, beside ``GET /runs?limit=50``: target ratio <= 2, and under 100 ms.

A page that does not answer 200 gets no figure (it says so): a missing page is not fast.

Servers: ``DATABASE_URL`` if set, else the embedded PostgreSQL in ``--state-dir``.

Usage::

    .venv/bin/python scripts/bench_ui.py --quick   # under a minute
    .venv/bin/python scripts/bench_ui.py --json    # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/bench_ui.py --write-readme

The exit code is 0 whatever the figures: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from bench_log import server
from bench_projections import Shape
from benchlib import (
    Figure,
    drop_schemas,
    figure_rows,
    machine,
    print_json_line,
    quiet_logging,
    readme_table,
    write_readme,
)
from rich.console import Console
from rich.table import Table

from runtime.log.migrations import migrate
from runtime.log.pool import connect, open_runtime_pool, redact
from runtime.log.store import NO_STREAM, EventLog
from runtime.settings import Settings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
NAME = "bench_ui"
TOKEN = secrets.token_hex(16)
STATUSES = ("completed", "completed", "completed", "failed", "waiting_for_approval", "running")


@dataclasses.dataclass(frozen=True)
class Sizes:
    runs: int
    #: Steps of the big run's two activations (+9 events: about 1,000 in all).
    steps: tuple[int, int]
    requests: int
    repeat: int


FULL = Sizes(runs=100_000, steps=(496, 495), requests=200, repeat=3)
QUICK = Sizes(runs=100_000, steps=(496, 495), requests=40, repeat=1)


def new_figures() -> dict[str, Figure]:
    return {
        "run_json": Figure("a. GET /runs/{id} + /runs/{id}/timeline (JSON, baseline)", "ms"),
        "run_page": Figure("a. run page GET /ui/runs/{id}, 1,000 events", "ms", "run_json", 200),
        "run_ratio": Figure("a. run page / its JSON", "×", None, 2),
        "table_json": Figure("b. GET /runs?limit=50 (JSON, baseline)", "ms"),
        "table_page": Figure("b. runs table GET /ui/, a page of 50", "ms", "table_json", 100),
        "table_ratio": Figure("b. runs table / its JSON", "×", None, 2),
    }


@dataclasses.dataclass
class Info:
    url: str
    version: str
    run_events: int = 0
    runs: int = 0
    build_seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)


# -- building -----------------------------------------------------------------------------


async def append_run(lg: EventLog, steps: tuple[int, int]) -> tuple[uuid.UUID, int]:
    """The big run, appended as the worker writes it; its id and its events."""
    appends = Shape(steps).run(0)  # run 0: with an approval, a dead letter, a circuit event
    written = 0
    for stream, events in appends:
        await lg.append(stream, events, None if stream.startswith("circuit-") else NO_STREAM)
        written += len(events)
    run_id = appends[0][1][0].run_id
    assert run_id is not None
    return run_id, written


async def copy_runs(admin: asyncpg.Connection, table: str, template_id: uuid.UUID, n: int) -> None:
    """``n`` rows like the template run's, with their own ids, times, statuses and costs."""
    schema, name = (part.strip('"') for part in table.split("."))
    template = await admin.fetchrow(f"SELECT * FROM {table} WHERE run_id = $1", template_id)
    assert template is not None, "the projector did not fold the run"
    columns = list(template.keys())
    rng = random.Random(7)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = []
    for i in range(n):
        row = dict(template)
        shift = dt.timedelta(seconds=i * 13)
        for column, value in template.items():
            if isinstance(value, dt.datetime):
                row[column] = t0 + shift + (value - template["started_at"])
        row.update(run_id=uuid.uuid4(), status=STATUSES[i % len(STATUSES)])
        if "cost_usd" in row:
            row["cost_usd"] = type(template["cost_usd"])(round(rng.uniform(0, 0.5), 6))
        rows.append(tuple(row[c] for c in columns))
    await admin.copy_records_to_table(name, schema_name=schema, records=rows, columns=columns)
    await admin.execute(f"ANALYZE {table}")


# -- measuring ----------------------------------------------------------------------------


async def fetch(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    response = await client.get(url, headers=headers)
    await response.aread()
    return response


async def alternate(
    client: httpx.AsyncClient,
    page: tuple[list[str], dict[str, str]],
    json: tuple[list[str], dict[str, str]],
    requests: int,
) -> tuple[float, float]:
    """Median ms of the page's URLs (fetched in turn) and of the JSON ones, interleaved so
    that whatever else the machine does falls on both alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    sides = [(0, page), (1, json)]
    for i in range(requests):
        # Which goes first alternates; each time is filed under its own side.
        for side, (urls, headers) in sides if i % 2 else sides[::-1]:
            t0 = time.perf_counter()
            for url in urls:
                r = await fetch(client, url, headers)
                if r.status_code != 200:
                    raise RuntimeError(f"{url} answered {r.status_code}")
            times[side].append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


async def check(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], what: str, info: Info
) -> str | None:
    """The page's HTML if it answers 200 with HTML; else None, and a note why."""
    r = await fetch(client, url, headers)
    if r.status_code != 200 or "text/html" not in r.headers.get("content-type", ""):
        info.notes.append(
            f"{what}: {url} answered {r.status_code} ({r.headers.get('content-type')}): "
            "the page is missing or broken, so it gets no figure"
        )
        return None
    return r.text


async def measure(
    app: Any, run_id: uuid.UUID, sizes: Sizes, figures: dict[str, Figure], info: Info,
    err: Console,
) -> None:  # fmt: skip
    cookie, _ = app.state.ui.sessions.issue()
    ui = {"cookie": f"agentrt_session={cookie}"}
    bearer = {"authorization": f"Bearer {TOKEN}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        run_page = [f"/ui/runs/{run_id}"]
        run_json = [f"/runs/{run_id}", f"/runs/{run_id}/timeline"]
        table_page, table_json = ["/ui/"], ["/runs?limit=50"]
        html = await check(client, table_page[0], ui, "b. runs table", info)
        shown = html.count('href="/ui/runs/') if html is not None else 50
        if shown < 50:
            info.notes.append(f"b: the runs table showed {shown} runs, not 50")
        pairs = [
            ("run", run_page, run_json, await check(client, run_page[0], ui, "a. run page", info)),
            ("table", table_page, table_json, html),
        ]
        for key, page, json_urls, ok in pairs:
            if ok is None:
                continue
            await alternate(client, (page, ui), (json_urls, bearer), 5)  # warm-up
            page_ms, json_ms = await alternate(client, (page, ui), (json_urls, bearer),
                                               sizes.requests)  # fmt: skip
            figures[f"{key}_page"].runs.append(page_ms)
            figures[f"{key}_json"].runs.append(json_ms)
            figures[f"{key}_ratio"].runs.append(page_ms / json_ms)
            err.print(f"  {key}: page {page_ms:.1f} ms, JSON {json_ms:.1f} ms "
                      f"({page_ms / json_ms:.2f}×)")  # fmt: skip


async def run(
    args: argparse.Namespace, admin_url: str, err: Console
) -> tuple[dict[str, Figure], Info]:
    sizes = dataclasses.replace(
        QUICK if args.quick else FULL,
        **{k: v for k, v in (("runs", args.runs), ("requests", args.requests),
                             ("repeat", args.repeat)) if v is not None},
    )  # fmt: skip
    if args.events is not None:
        half = max(1, (args.events - 9) // 2)
        sizes = dataclasses.replace(sizes, steps=(half, half))
    schema = f"benchui_{secrets.token_hex(4)}"
    settings = Settings.from_env(db_schema=schema, api_token=TOKEN).with_urls(
        redis_url=None, database_url=admin_url
    )
    admin = await connect(admin_url)
    figures = new_figures()
    info = Info(redact(admin_url), str(await admin.fetchval("SHOW server_version")))
    pool: asyncpg.Pool | None = None
    try:
        from projections.api.app import create_api
        from projections.engine import Projector
        from projections.registry import registered

        err.print(f"[dim]migrating scratch schema {schema}[/]")
        await migrate(settings)
        pool = await open_runtime_pool(settings, max_size=8)
        lg = EventLog(pool, schema=schema)
        t0 = time.perf_counter()
        run_id, info.run_events = await append_run(lg, sizes.steps)
        await Projector(lg, registered(settings=settings), settings).catch_up()
        err.print(f"  the run: {info.run_events:,} events appended and projected "
                  f"({time.perf_counter() - t0:.1f}s)")  # fmt: skip
        t1 = time.perf_counter()
        await copy_runs(admin, f'"{settings.read_schema}".runs', run_id, sizes.runs)
        info.runs = sizes.runs + 1
        took = time.perf_counter() - t1
        err.print(f"  {sizes.runs:,} synthetic rows COPied into the runs read model "
                  f"({took:.1f}s): the table's figure is query + render")  # fmt: skip
        info.build_seconds = time.perf_counter() - t0
        app = create_api(settings, pool=pool)
        async with app.router.lifespan_context(app):
            for r in range(sizes.repeat):
                err.print(f"[bold]repeat {r + 1}/{sizes.repeat}[/]")
                notes = len(info.notes)
                await measure(app, run_id, sizes, figures, info, err)
                if r and len(info.notes) > notes:
                    del info.notes[notes:]  # said once
    finally:
        if pool is not None:
            await pool.close()
        await drop_schemas(admin, [settings.read_schema, schema], err)
        await admin.close()
    return figures, info


# -- output -------------------------------------------------------------------------------


def rows(figures: dict[str, Figure]) -> list[dict[str, Any]]:
    """The ``--json`` rows; a page's row also carries its ratio to its JSON counterpart."""
    found = figure_rows(figures)
    for row in found:
        if row["unit"] == "ms" and row["value"] is not None and row["ceiling"]:
            row["ratio"] = round(row["value"] / row["ceiling"], 3)
    return found


def describe(info: Info, repeat: int) -> str:
    return (
        f"PostgreSQL {info.version}; the run page of a {info.run_events:,}-event run; the "
        f"runs table over {info.runs:,} runs (rows written by COPY: query + render, not the "
        f"projector); in-process (ASGI), requests one at a time, medians; {repeat} repeat(s)"
    )


def render(figures: dict[str, Figure], info: Info, repeat: int, out: Console) -> None:
    out.print(f"[bold]agentrt run explorer benchmark[/]  {describe(info, repeat)}")
    out.print(f"[dim]server: {info.url}; {machine()}[/]")
    table = Table()
    for col in ("figure", "value", "unit", "JSON", "target", ""):
        table.add_column(col, justify="left" if col in ("figure", "unit", "") else "right")
    for row in figure_rows(figures):
        value = "—" if row["value"] is None else f"{row['value']:,.2f}"
        ceiling = "" if row["ceiling"] is None else f"{row['ceiling']:,.2f}"
        target, mark = _judged(row)
        table.add_row(row["name"], value, row["unit"], ceiling, target, mark)
    out.print(table)
    for note in info.notes:
        out.print(f"[yellow]{note}[/]")


def _judged(row: dict[str, Any]) -> tuple[str, str]:
    """A row's target and whether it was met, as text (ms: below it; ×: at most it)."""
    if row["target"] is None:
        return "", ""
    bound = float(row["target"])
    if row["unit"] == "ms":
        target = f"<{bound:g} ms"
        ok = None if row["value"] is None else row["value"] < bound
    else:
        target = f"≤{bound:g}×"
        ok = None if row["value"] is None else row["value"] <= bound
    return target, "not measured" if ok is None else "✓ pass" if ok else "✗ MISS"


def readme_block(figures: dict[str, Figure], info: Info, repeat: int) -> str:
    lines = [
        f"<!-- {NAME}:start -->",
        f"Measured with `scripts/bench_ui.py` on {dt.date.today().isoformat()}: {machine()}, "
        f"{describe(info, repeat)}. The ceiling column of a page is its JSON counterpart's time.",
        "",
        *readme_table(figures),
        *(f"\n{note}" for note in info.notes),
        f"<!-- {NAME}:end -->",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the run explorer's pages.")
    add = parser.add_argument
    add("--quick", action="store_true", help="fewer requests, one repeat (under a minute)")
    add("--json", action="store_true", help='print {"figures": [...]} as the last line of stdout')
    add("--write-readme", action="store_true", help=f"replace README.md's {NAME} block")
    add("--runs", type=int, default=None, help="rows of the runs table (100,000)")
    add("--events", type=int, default=None, help="events of the run page's run (about 1,000)")
    add("--requests", type=int, default=None, help="requests per figure (200; quick 40)")
    add("--repeat", type=int, default=None, help="repeats, medians reported (3; quick 1)")
    add("--state-dir", type=Path, default=Path(".agentrt/bench"),
        help="embedded server state directory (default .agentrt/bench)")  # fmt: skip
    add("--keep-server", action="store_true", help="leave an embedded server this run started")
    args = parser.parse_args(argv)
    for name in ("runs", "events", "requests", "repeat"):
        value = getattr(args, name)
        if value is not None and value < (51 if name == "runs" else 11 if name == "events" else 1):
            parser.error(f"--{name} is too small")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    err = Console(stderr=True, width=150)
    out = err if args.json else Console(width=150)
    with server(args.state_dir, args.keep_server, err) as srv:
        figures, info = asyncio.run(run(args, srv.admin_url, err))
    repeat = args.repeat or (QUICK if args.quick else FULL).repeat
    render(figures, info, repeat, out)
    if args.write_readme:
        write_readme(README, NAME, readme_block(figures, info, repeat), err)
    if args.json:
        print_json_line(rows(figures))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
