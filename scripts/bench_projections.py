"""Benchmark the read side against baselines measured in the same run, on the same PostgreSQL.

It builds, in throwaway schemas, a log shaped like real runs (default 1,000,000
events over 10,000 runs; ``--quick`` 100,000 over 1,000): each run a trigger,
two activations with LLM steps (usage: tokens and cost) and tool steps, an
emitted event each and their ``activation.completed``; every 10th run an
approval requested and decided, every 20th a dead-lettered activation, every
50th a circuit transition. One more run, of exactly 1,000 events (a trigger,
997 tool steps, an emitted event, its completion), is made so that replay can
re-run it with the agent below. Then it measures, each figure beside its
baseline:

  a. rebuilding every built-in projection from the start in one pass
     (``Projector.rebuild_many``), events/s, beside reading and decoding the same
     events with no fold (``EventLog.read_all`` pages of ``projection_batch``):
     target >= 50% of that;
  b. replaying the 1,000-event run (``replay_run``) beside reading and decoding
     its events (``EventLog.read_run``): within 3x (a rate ratio >= 1/3);
  c. ``GET /runs/{id}/timeline`` of that run, p99 under concurrent requests
     (httpx through ASGITransport to the query API in-process) beside a raw query
     of the same rows with the same concurrency: within 3x;
  d. ``EventLog.read_all`` + decode beside a raw keyset-paged SELECT of the same
     table: >= 70%.

Peers' figures, from the issue and not measured here, are printed beside ours.

Servers: ``DATABASE_URL`` if set, else the embedded PostgreSQL in ``--state-dir``.

Usage::

    .venv/bin/python scripts/bench_projections.py --quick   # under a minute
    .venv/bin/python scripts/bench_projections.py --json    # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/bench_projections.py --write-readme

The exit code is 0 whatever the figures: this is a measurement, not a test.
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
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from bench_log import raw_select, server
from benchlib import (
    Figure,
    drop_schemas,
    figure_rows,
    machine,
    met,
    percentile,
    quiet_logging,
    readme_table,
    write_readme,
)
from rich.console import Console
from rich.table import Table

from runtime import Agent, Context, Event, ToolContext, tool
from runtime.agents.context import activation_id_for
from runtime.effects.steps import request_hash
from runtime.events.builtin import (
    ActivationCompleted,
    ActivationDeadLettered,
    ApprovalDecided,
    ApprovalRequested,
    CircuitTransitioned,
    StepRecorded,
)
from runtime.events.ids import activation_stream, circuit_stream, run_stream
from runtime.events.model import START, LogPosition, NewEvent
from runtime.events.values import Usage
from runtime.log.migrations import migrate
from runtime.log.pool import connect, open_runtime_pool, redact
from runtime.log.store import NO_STREAM, EventLog
from runtime.settings import Settings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
NAME = "bench_projections"
PAGE = 1000
REPLAY_STEPS = 997  # + trigger, emitted event, completion = 1,000 events
#: Concurrent clients of the timeline route (and of its raw baseline).
CLIENTS = 8
TOKEN = secrets.token_hex(16)

#: Figures from the issue, measured by others on this machine class: printed, not measured.
PEERS = [
    ("eventsourcing: read + decode", "127,000 events/s"),
    ("LangGraph: read a 1,000-step history (no replay)", "177 ms"),
]


# -- the agent whose run is replayed -----------------------------------------------------


class BenchTicked(Event, tag="bench.ticked"):
    n: int


class BenchTallied(Event, tag="bench.tallied"):
    total: int


class BenchRequested(Event, tag="bench.requested"):
    """A run's trigger in the big log (an ingress event)."""

    subject: str
    sender: str
    text: str


class BenchHandled(Event, tag="bench.handled"):
    """What the big log's activations emit."""

    label: str
    summary: str


@tool
async def lookup(ctx: ToolContext, i: int) -> int:
    """A stand-in tool: what replay feeds back is its recorded result."""
    return i * 2


class Ticker(Agent):
    """Takes ``n`` tool steps and emits their total: the replayed run's agent."""

    name = "ticker"
    subscribes = (BenchTicked,)
    tools = (lookup,)

    async def handle(self, event: BenchTicked, ctx: Context) -> None:
        total = 0
        for i in range(event.n):
            total += await ctx.tool(lookup, i=i)
        ctx.emit(BenchTallied(total=total))


# -- building the log ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    runs: int
    #: Steps of each of a run's two activations (about 95 events a run in all).
    steps: tuple[int, int]
    repeat: int
    requests: int


FULL = Sizes(runs=10_000, steps=(40, 50), repeat=3, requests=2000)
QUICK = Sizes(runs=1_000, steps=(40, 50), repeat=1, requests=160)

_WORDS = (
    "invoice",
    "refund",
    "priority",
    "customer",
    "shipment",
    "contract",
    "renewal",
    "billing",
    "account",
    "urgent",
    "review",
    "approval",
    "delivery",
    "quote",
)


class Shape:
    """Builds runs as the worker writes them (steps first, then trigger, emitted, completed)."""

    def __init__(self, steps: tuple[int, int], seed: int = 11) -> None:
        self.steps = steps
        self.rng = random.Random(seed)
        self.t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)

    def text(self, words: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(words))

    def when(self, i: int) -> dt.datetime:
        return self.t0 + dt.timedelta(seconds=i * 7)

    def step(self, agent: str, aid: uuid.UUID, n: int, run_id: uuid.UUID) -> NewEvent:
        if n % 3 != 0:
            request: Any = {"model": "claude-haiku-4-5", "prompt": self.text(30)}
            body = StepRecorded(
                activation_id=aid,
                agent=agent,
                step=n,
                kind="llm",
                name="claude-haiku-4-5",
                request_hash=request_hash("llm", "claude-haiku-4-5", request),
                request=request,
                result={"text": self.text(25)},
                usage=Usage(
                    model="claude-haiku-4-5",
                    input_tokens=self.rng.randint(80, 900),
                    output_tokens=self.rng.randint(10, 300),
                    cost_usd=round(self.rng.uniform(0.0001, 0.004), 6),
                ),
                duration_ms=round(self.rng.uniform(200, 2000), 3),
            )
        else:
            request = {"email": f"user{n}@example.com"}
            body = StepRecorded(
                activation_id=aid,
                agent=agent,
                step=n,
                kind="tool",
                name="lookup_customer",
                request_hash=request_hash("tool", "lookup_customer", request),
                request=request,
                result={"id": f"cus_{n}", "plan": "team"},
                duration_ms=round(self.rng.uniform(1, 50), 3),
            )
        return NewEvent(body=body, run_id=run_id, causation_id=run_id, producer=agent)

    def run(self, i: int) -> list[tuple[str, list[NewEvent]]]:
        """One run as (stream, events) appends, in the worker's order."""
        rid = uuid.uuid4()
        at = self.when(i)
        appends: list[tuple[str, list[NewEvent]]] = []
        trigger = NewEvent(
            body=BenchRequested(
                subject=self.text(6), sender=f"u{i}@example.com", text=self.text(60)
            ),
            event_id=rid,
            run_id=rid,
            recorded_at=at,
        )
        cause = rid
        run_events: list[NewEvent] = []
        for k, (agent, steps) in enumerate(zip(("triage", "responder"), self.steps, strict=True)):
            aid = activation_id_for(agent, cause)
            appends.append(
                (
                    activation_stream(aid),
                    [self.step(agent, aid, n, rid) for n in range(1, steps + 1)],
                )
            )
            emitted = NewEvent(
                body=BenchHandled(label=agent, summary=self.text(20)),
                run_id=rid,
                causation_id=cause,
                producer=agent,
            )
            done = NewEvent(
                body=ActivationCompleted(
                    agent=agent,
                    activation_id=aid,
                    trigger_id=cause,
                    trigger_type="bench.requested" if k == 0 else "bench.handled",
                    steps=steps,
                    emitted=[emitted.event_id],
                    duration_ms=round(self.rng.uniform(500, 9000), 3),
                ),
                run_id=rid,
                causation_id=cause,
                producer=agent,
            )
            batch = ([trigger] if k == 0 else []) + [emitted, done]
            if k == 1 and i % 10 == 0:
                approval = uuid.uuid4()
                batch += [
                    NewEvent(
                        body=ApprovalRequested(
                            approval_id=approval, agent=agent, subject="send the reply?"
                        ),
                        run_id=rid,
                        causation_id=cause,
                        producer=agent,
                    ),
                    NewEvent(
                        body=ApprovalDecided(approval_id=approval, approved=True, by="ops"),
                        run_id=rid,
                        causation_id=cause,
                        producer="human",
                    ),
                ]
            run_events += batch
            cause = emitted.event_id
        if i % 20 == 0:
            run_events.append(
                NewEvent(
                    body=ActivationDeadLettered(
                        agent="auditor",
                        activation_id=activation_id_for("auditor", cause),
                        trigger_id=cause,
                        trigger_type="bench.handled",
                        stream="agent:auditor",
                        entry_id=f"{i}-0",
                        deliveries=3,
                        error_type="RuntimeError",
                        error="the auditor failed three times",
                    ),
                    run_id=rid,
                    causation_id=cause,
                    producer="auditor",
                )
            )
        appends.append((run_stream(rid), run_events))
        if i % 50 == 0:
            appends.append(
                (
                    circuit_stream("crm"),
                    [
                        NewEvent(
                            body=CircuitTransitioned(
                                name="crm",
                                from_state="closed",
                                to_state="open",
                                failures=5,
                                reason="5 failures",
                            ),
                            run_id=rid,
                            producer="breaker",
                        )
                    ],
                )
            )
        return appends


def replay_run_events() -> tuple[uuid.UUID, list[tuple[str, list[NewEvent]]]]:
    """A run Ticker made: the trigger, REPLAY_STEPS tool steps, the tally, the completion."""
    rid = uuid.uuid4()
    agent = Ticker.name
    aid = activation_id_for(agent, rid)
    steps = []
    for i in range(REPLAY_STEPS):
        request = {"i": i}
        body = StepRecorded(
            activation_id=aid,
            agent=agent,
            step=i + 1,
            kind="tool",
            name="lookup",
            request_hash=request_hash("tool", "lookup", request),
            request=request,
            result=i * 2,
            duration_ms=0.05,
        )
        steps.append(NewEvent(body=body, run_id=rid, causation_id=rid, producer=agent))
    trigger = NewEvent(body=BenchTicked(n=REPLAY_STEPS), event_id=rid, run_id=rid)
    tally = NewEvent(
        body=BenchTallied(total=sum(i * 2 for i in range(REPLAY_STEPS))),
        run_id=rid,
        causation_id=rid,
        producer=agent,
    )
    done = NewEvent(
        body=ActivationCompleted(
            agent=agent,
            activation_id=aid,
            trigger_id=rid,
            trigger_type="bench.ticked",
            steps=REPLAY_STEPS,
            emitted=[tally.event_id],
        ),
        run_id=rid,
        causation_id=rid,
        producer=agent,
    )
    return rid, [(activation_stream(aid), steps), (run_stream(rid), [trigger, tally, done])]


async def build_log(lg: EventLog, sizes: Sizes, err: Console) -> tuple[int, uuid.UUID]:
    """Append the runs with a few concurrent writers; the events written and the replay run."""
    shape = Shape(sizes.steps)
    written = 0
    queue: asyncio.Queue[list[tuple[str, list[NewEvent]]] | None] = asyncio.Queue(64)

    async def writer() -> None:
        nonlocal written
        while (appends := await queue.get()) is not None:
            for stream, events in appends:
                # The circuit stream is shared by runs: any version.
                expected = None if stream.startswith("circuit-") else NO_STREAM
                await lg.append(stream, events, expected)
                written += len(events)

    writers = [asyncio.create_task(writer()) for _ in range(6)]
    t0 = time.perf_counter()
    for i in range(sizes.runs):
        await queue.put(shape.run(i))
        if i % 500 == 499:
            err.print(
                f"  [dim]{i + 1:,} runs, {written:,} events ({time.perf_counter() - t0:.0f}s)[/]"
            )
    replay_id, appends = replay_run_events()
    await queue.put(appends)
    for _ in writers:
        await queue.put(None)
    await asyncio.gather(*writers)
    return written, replay_id


# -- measurements -------------------------------------------------------------------------


async def read_rate(lg: EventLog, page: int) -> tuple[float, int]:
    """read_all + decode over the whole log, pages of ``page``: events/s and the count."""
    after: LogPosition = START
    n = 0
    t0 = time.perf_counter()
    while events := await lg.read_all(after, page):
        n += len(events)
        after = events[-1].log_position
    return n / (time.perf_counter() - t0), n


async def rebuild_rate(projector: Any, names: Sequence[str]) -> float:
    t0 = time.perf_counter()
    n = await projector.rebuild_many(list(names))
    return float(n) / (time.perf_counter() - t0)


async def timed(fn: Callable[[], Awaitable[Any]], times: int) -> float:
    """The median seconds of ``times`` calls."""
    runs = []
    for _ in range(times):
        t0 = time.perf_counter()
        await fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


async def p99(call: Callable[[], Awaitable[None]], requests: int, clients: int) -> float:
    """The p99 latency (ms) of ``requests`` calls made by ``clients`` concurrent loops."""
    latencies: list[float] = []
    left = requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(clients)))
    ordered = sorted(latencies)
    if os.environ.get("BENCH_DEBUG"):
        print(f"    p50 {percentile(ordered, 50):.1f} ms, p99 "
              f"{percentile(ordered, 99):.1f} ms, max {ordered[-1] * 1000:.1f} ms",
              file=sys.stderr)  # fmt: skip
    return percentile(ordered, 99)


def new_figures() -> dict[str, Figure]:
    return {
        "read_ceiling": Figure("a. read_all + decode, no fold (baseline)", "events/s"),
        "rebuild": Figure(
            "a. rebuild of every built-in projection", "events/s", "read_ceiling", 0.5
        ),
        "read_run": Figure("b. read_run + decode of a 1,000-event run (baseline)", "runs/s"),
        "replay": Figure("b. replay of that run (within 3x)", "runs/s", "read_run", 1 / 3),
        "replay_ms": Figure("b. replay of that run", "ms"),
        "read_run_ms": Figure("b. read_run + decode of that run", "ms"),
        "raw_timeline": Figure("c. raw query of the timeline rows, 1/p99 (baseline)", "1/s"),
        "timeline": Figure(
            "c. GET /runs/{id}/timeline, 1/p99 (within 3x)", "1/s", "raw_timeline", 1 / 3
        ),
        "timeline_p99": Figure(f"c. GET /runs/{{id}}/timeline p99, {CLIENTS} clients", "ms"),
        "raw_p99": Figure(f"c. raw query p99, {CLIENTS} clients", "ms"),
        "timeline_p99_1": Figure("c. GET /runs/{id}/timeline p99, 1 client", "ms"),
        "raw_p99_1": Figure("c. raw query p99, 1 client", "ms"),
        "raw_select": Figure("d. raw SELECT, keyset pages of 1000 (ceiling)", "rows/s"),
        "read_all": Figure(
            "d. EventLog.read_all + decode, pages of 1000", "events/s", "raw_select", 0.7
        ),
    }


@dataclasses.dataclass
class Info:
    url: str
    version: str
    events: int = 0
    runs: int = 0
    build_seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)


async def run(
    args: argparse.Namespace, admin_url: str, err: Console
) -> tuple[dict[str, Figure], Info]:
    sizes = QUICK if args.quick else FULL
    repeat = args.repeat or sizes.repeat
    tag = secrets.token_hex(4)
    schema = f"benchp_{tag}"
    settings = Settings.from_env(db_schema=schema, api_token=TOKEN).with_urls(
        redis_url=None, database_url=admin_url
    )
    admin = await connect(admin_url)
    figures = new_figures()
    info = Info(redact(admin_url), str(await admin.fetchval("SHOW server_version")))
    pool: asyncpg.Pool | None = None
    raw: asyncpg.Connection | None = None
    try:
        err.print(f"[dim]migrating scratch schema {schema}[/]")
        await migrate(settings)
        pool = await open_runtime_pool(settings, max_size=CLIENTS + 4)
        lg = EventLog(pool, schema=schema)
        err.print(f"building {sizes.runs:,} runs ...")
        t0 = time.perf_counter()
        info.events, replay_id = await build_log(lg, sizes, err)
        info.runs = sizes.runs + 1
        info.build_seconds = time.perf_counter() - t0
        err.print(f"  {info.events:,} events in {info.build_seconds:.0f}s")
        await admin.execute(f'ANALYZE "{schema}".events')
        raw = await connect(admin_url)
        gc.collect()
        gc.freeze()
        for r in range(repeat):
            err.print(f"[bold]repeat {r + 1}/{repeat}[/]")
            await measure_rebuild(lg, settings, figures, info, err)
            await measure_replay(lg, settings, replay_id, figures, info, err)
            await measure_timeline(lg, settings, raw, replay_id, sizes, figures, info, err)
            await measure_read_all(lg, raw, info.events, figures, err)
    finally:
        if raw is not None:
            await raw.close()
        if pool is not None:
            await pool.close()
        await drop_schemas(admin, [settings.read_schema, schema], err)
        await admin.close()
    return figures, info


def _not_measured(info: Info, what: str, exc: BaseException) -> None:
    note = f"{what}: not measured: {type(exc).__name__}: {exc}"
    if note not in info.notes:
        info.notes.append(note)


async def measure_rebuild(
    lg: EventLog, settings: Settings, figures: dict[str, Figure], info: Info, err: Console
) -> None:
    try:
        from projections.builtin import builtin_projections
        from projections.engine import Projector
    except ImportError as exc:
        _not_measured(info, "a (rebuild)", exc)
        return
    projections = builtin_projections([Ticker()], settings)
    projector = Projector(lg, projections, settings)
    names = [p.name for p in projections]
    try:
        ceiling, _ = await read_rate(lg, settings.projection_batch)
        rate = await rebuild_rate(projector, names)
    except Exception as exc:  # a figure that cannot be taken is reported, not faked
        _not_measured(info, "a (rebuild)", exc)
        return
    figures["read_ceiling"].runs.append(ceiling)
    figures["rebuild"].runs.append(rate)
    err.print(f"  a. read {ceiling:,.0f} events/s, rebuild {rate:,.0f} events/s")


async def measure_replay(
    lg: EventLog,
    settings: Settings,
    run_id: uuid.UUID,
    figures: dict[str, Figure],
    info: Info,
    err: Console,
) -> None:
    try:
        from projections.replay import replay_run
    except ImportError as exc:
        _not_measured(info, "b (replay)", exc)
        return
    agents = [Ticker()]
    result = await replay_run(lg, agents, run_id, settings=settings)
    if not result.identical:
        _not_measured(info, "b (replay)", RuntimeError(f"the run diverged: {result.divergent}"))
        return
    read_s = await timed(lambda: lg.read_run(run_id), 5)
    replay_s = await timed(lambda: replay_run(lg, agents, run_id, settings=settings), 5)
    figures["read_run"].runs.append(1 / read_s)
    figures["replay"].runs.append(1 / replay_s)
    figures["read_run_ms"].runs.append(read_s * 1000)
    figures["replay_ms"].runs.append(replay_s * 1000)
    err.print(f"  b. read_run {read_s * 1000:.1f} ms, replay {replay_s * 1000:.1f} ms")


async def measure_timeline(
    lg: EventLog,
    settings: Settings,
    raw: asyncpg.Connection,
    run_id: uuid.UUID,
    sizes: Sizes,
    figures: dict[str, Figure],
    info: Info,
    err: Console,
) -> None:
    try:
        from projections.api.app import create_api
        from projections.queries import _TIMELINE_COLUMNS
    except ImportError as exc:
        _not_measured(info, "c (timeline)", exc)
        return
    app = create_api(settings, agents=[Ticker()], pool=lg.pool)
    transport = httpx.ASGITransport(app=app)
    # What the figures before this one left on the heap is moved out of the collector's
    # way: a full collection of it (~0.1 s) is this process's cost, not the route's.
    gc.collect()
    gc.freeze()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    sql = (
        f'SELECT {_TIMELINE_COLUMNS} FROM "{settings.read_schema}".timeline '
        "WHERE run_id = $1 ORDER BY tx, position"
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        url = f"/runs/{run_id}/timeline"
        first = await client.get(url, headers=headers)
        if first.status_code != 200:
            _not_measured(
                info, "c (timeline)", RuntimeError(f"{first.status_code} {first.text[:200]}")
            )
            return
        body = first.json()
        entries = body if isinstance(body, list) else body.get("entries", body.get("items"))
        rows = len(await lg.pool.fetch(sql, run_id))
        if rows != 1000 or not isinstance(entries, list) or len(entries) != rows:
            got = len(entries) if isinstance(entries, list) else "?"
            info.notes.append(
                f"c: the timeline table holds {rows} rows of the run and the "
                f"route answered {got} entries (expected 1000 each)"
            )

        async def api_call() -> None:
            response = await client.get(url, headers=headers)
            response.raise_for_status()
            await response.aread()

        async def raw_call() -> None:
            await lg.pool.fetch(sql, run_id)

        await p99(raw_call, CLIENTS * 2, CLIENTS)  # warm-up: plans, connections
        raw_ms = await p99(raw_call, sizes.requests, CLIENTS)
        api_ms = await p99(api_call, sizes.requests, CLIENTS)
        # One client: the latency itself, without queueing behind the other clients in
        # this one process (the in-process server shares its event loop with them).
        # (200 calls at least: with fewer, the p99 is simply the slowest call.)
        raw_1 = await p99(raw_call, max(sizes.requests, 200), 1)
        api_1 = await p99(api_call, max(sizes.requests, 200), 1)
    figures["raw_p99_1"].runs.append(raw_1)
    figures["timeline_p99_1"].runs.append(api_1)
    figures["raw_timeline"].runs.append(1000 / raw_ms)
    figures["timeline"].runs.append(1000 / api_ms)
    figures["raw_p99"].runs.append(raw_ms)
    figures["timeline_p99"].runs.append(api_ms)
    err.print(f"  c. raw p99 {raw_ms:.1f} ms, timeline p99 {api_ms:.1f} ms "
              f"({CLIENTS} clients); 1 client: {raw_1:.1f} / {api_1:.1f} ms")  # fmt: skip


async def measure_read_all(
    lg: EventLog, raw: asyncpg.Connection, events: int, figures: dict[str, Figure], err: Console
) -> None:
    n = min(events, 100_000)
    table = f'"{lg.schema}".events'
    ceiling = await raw_select(raw, table, n, 1)
    rate = await read_all_first(lg, n)
    figures["raw_select"].runs.append(ceiling)
    figures["read_all"].runs.append(rate)
    err.print(f"  d. raw {ceiling:,.0f} rows/s, read_all {rate:,.0f} events/s")


async def read_all_first(lg: EventLog, n: int) -> float:
    """read_all + decode of the first ``n`` events, after a warm-up pass (as raw_select)."""

    async def scan() -> int:
        after: LogPosition = START
        read = 0
        while read < n and (events := await lg.read_all(after, PAGE)):
            read += len(events)
            after = events[-1].log_position
        return read

    await scan()
    t0 = time.perf_counter()
    read = await scan()
    return read / (time.perf_counter() - t0)


# -- output -------------------------------------------------------------------------------


def render(figures: dict[str, Figure], info: Info, repeat: int, out: Console) -> None:
    out.print(
        f"[bold]agentrt read side benchmark[/]  PostgreSQL {info.version}; {info.events:,} "
        f"events over {info.runs:,} runs (built in {info.build_seconds:.0f}s); median of "
        f"{repeat} run(s)"
    )
    out.print(f"[dim]server: {info.url}; {machine()}[/]")
    table = Table()
    for col in ("figure", "value", "unit", "baseline", "ratio", "target", ""):
        table.add_column(col, justify="left" if col in ("figure", "unit", "") else "right")
    for row in figure_rows(figures):
        value, ceiling, ratio, target, mark = _cells(row)
        table.add_row(row["name"], value, row["unit"], ceiling, ratio, target, mark)
    out.print(table)
    out.print("[bold]peers (their figures, from the issue; not measured here)[/]")
    for name, value in PEERS:
        out.print(f"  {name}: {value}")
    for note in info.notes:
        out.print(f"[yellow]{note}[/]")


def _cells(row: dict[str, Any]) -> list[str]:
    def num(v: float | None) -> str:
        if v is None:
            return "—"
        return f"{v:,.2f}" if row["unit"] in ("ms", "runs/s", "1/s") else f"{v:,.0f}"

    target = ""
    if row["target"] is not None:
        target = f"≥{row['target']:.0%}" if row["unit"] != "ms" else f"<{row['target']:g} ms"
    ok = met(row)
    mark = (
        ""
        if row["target"] is None
        else "not measured"
        if ok is None
        else ("✓ pass" if ok else "✗ MISS")
    )
    ratio = "" if row["ratio"] is None else f"{row['ratio']:.1%}"
    return [num(row["value"]), num(row["ceiling"]), ratio, target, mark]


def readme_block(figures: dict[str, Figure], info: Info, repeat: int) -> str:
    lines = [
        f"<!-- {NAME}:start -->",
        f"Measured with `scripts/bench_projections.py` on {dt.date.today().isoformat()}: "
        f"{machine()}, PostgreSQL {info.version}; {info.events:,} events over {info.runs:,} "
        f"runs; median of {repeat} run(s). Each figure beside its baseline from the same run; "
        "within-3x figures are rates (1/time), so their target is a ratio of 33%.",
        "",
        *readme_table(figures),
        "",
        "Peers, their figures (not measured here): "
        + "; ".join(f"{name}: {value}" for name, value in PEERS)
        + ".",
        *(f"\n{note}" for note in info.notes),
        f"<!-- {NAME}:end -->",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the read side against baselines.")
    parser.add_argument(
        "--quick", action="store_true", help="100,000 events over 1,000 runs (under a minute)"
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"figures": [...]} as the last line of stdout'
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per measurement, medians reported (default 3, quick 1)",
    )
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help=f"replace the {NAME} block of README.md with the figures",
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
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
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
        print(json.dumps({"figures": figure_rows(figures), "notes": info.notes}))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
