"""Benchmark agentrt against its peers on the same durable three-step workflow, same PostgreSQL.

The workflow: three trivial steps, each returning a small dict and made
durable before the next one starts, then a recorded result. Each system runs
it in one process, on the same PostgreSQL server, one system after the other
in one run (the order rotates between repeats):

agentrt:
  ``agentrt worker --app bench_peers_app`` (``scripts/bench_peers_app.py``),
  as users run it, with the ``agentrt worker`` defaults (concurrency 16,
  batch 32, the runtime pool, the relay on). The agent handles
  ``bench_peers.requested``: three ``await ctx.tool(...)`` steps (each
  recorded in the log before the handler goes on, through the tool's circuit
  breaker), then ``ctx.emit(...)`` of the result. A backlog of events is
  XADDed into the ingress streams ``agentrt:in:{p0..p7}`` before the worker
  starts; workflows/s counts the inbox rows (committed activations) that
  appear during the measured window.
  Durable per workflow: the trigger event, three ``step.recorded`` events
  (each durable before the handler goes on), and in one final transaction
  the result event, ``activation.completed`` and the inbox row; in Redis the
  claim of the activation and the circuit breakers' state.

DBOS:
  a ``@DBOS.workflow`` (async) calling three ``@DBOS.step`` functions and
  returning a result; 16 workflows in flight in one process (asyncio), its
  system database in a fresh schema of the same database (``dbos_system_schema``),
  its default pool. Durable per workflow: the workflow's status row (with its
  inputs) at the start, one ``operation_outputs`` row per step before the next,
  the status and output at the end.

LangGraph:
  a ``StateGraph`` of three nodes (each returns a small update) compiled with
  ``AsyncPostgresSaver`` (langgraph-checkpoint-postgres) on a pool of 16
  connections, a fresh schema of the same database, a new ``thread_id`` per
  run, 16 runs in flight in one process, ``durability="sync"`` (each step's
  checkpoint is written before the next step starts; LangGraph's default is
  ``"async"``, which writes it while the next step runs). Durable per
  workflow: a checkpoint per super-step (the input and each node) with its
  channel blobs, and each node's writes.

Each system gets the same warm-up and measured window; the rows each one
left in its schema are counted after, per workflow, with the write
transactions per workflow (transaction ids PostgreSQL assigned during the
window, over all its sessions: other work on the server counts too).

Servers: ``REDIS_URL`` / ``DATABASE_URL`` if set (DATABASE_URL a superuser or
database-owner URL), otherwise the embedded servers in ``--state-dir``
(default ``.agentrt/bench``). Redis database ``--redis-db`` (default 11) is
flushed before and after; PostgreSQL work goes into fresh ``peers_<random>``
schemas dropped at the end.

The peers are an optional extra: ``pip install '.[peers]'`` (dbos, langgraph,
langgraph-checkpoint-postgres, psycopg). A peer whose packages are missing is
skipped with a message; agentrt is still measured, and the ratio is then null.

Usage::

    .venv/bin/python scripts/bench_peers.py            # full run, about three minutes
    .venv/bin/python scripts/bench_peers.py --quick    # under a minute
    .venv/bin/python scripts/bench_peers.py --json     # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/bench_peers.py --repeat 3 --write-readme

The exit code is 0 whatever the figures: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypedDict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):  # run as a script: the repository's packages first
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchlib import (  # noqa: E402 - scripts/ is the script's own directory
    Figure,
    Servers,
    add_server_options,
    claim_redis_db,
    describe_servers,
    drop_schemas,
    figure_rows,
    machine,
    machine_busy,
    main_consoles,
    print_json_line,
    proc_cpu,
    quiet_logging,
    reap,
    run_on_servers,
    write_readme,
)

README = REPO / "README.md"
SCRIPT = str(Path(__file__).resolve())
#: agentrt's workflows/s over the best peer's, at least.
TARGET = 10.0
AGENT = "bench_peers"
PARTITIONS = 8
#: Workflows in flight in the peers' processes (the worker's default concurrency).
IN_FLIGHT = 16
#: Workflows/s assumed for agentrt before it was measured (sizes the first backlog).
FIRST_ESTIMATE = 2500.0
SYSTEMS = ("agentrt", "dbos", "langgraph")
LABELS = {"agentrt": "agentrt", "dbos": "DBOS", "langgraph": "LangGraph"}
#: What each peer needs: (module to import, distribution to install).
PEER_PACKAGES = {
    "dbos": [("dbos", "dbos")],
    "langgraph": [
        ("langgraph", "langgraph"),
        ("langgraph.checkpoint.postgres", "langgraph-checkpoint-postgres"),
        ("psycopg", "psycopg"),
        ("psycopg_pool", "psycopg-pool"),
    ],
}
DURABLE = {
    "agentrt": "the trigger event, 3 `step.recorded` events (each durable before the handler "
    "goes on), then in one transaction the result event, `activation.completed` and the inbox "
    "row; in Redis the activation's claim and the breakers' state",
    "dbos": "the workflow's status row with its inputs at the start, an `operation_outputs` row "
    "per step (before the next step), the status and output at the end",
    "langgraph": 'with `durability="sync"` (its default is `"async"`): a checkpoint per '
    "super-step (the input and each node) with its channel blobs, and each node's writes, "
    "each step's before the next starts",
}


def missing_packages(system: str) -> list[str]:
    """The distributions ``system`` needs that are not importable here."""
    missing = []
    for module, dist in PEER_PACKAGES.get(system, []):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ModuleNotFoundError, ValueError):  # ValueError: a module set to None
            found = False
        if not found:
            missing.append(dist)
    return missing


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- the peers (each in a child process of this script) --------------------------------


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    system: str
    database_url: str
    schema: str
    warmup: float
    duration: float


async def closed_loop(one: Callable[[int], Awaitable[Any]], spec: PeerSpec) -> int:
    """Run ``one(seq)`` in IN_FLIGHT loops through warm-up and window; says ``start`` and
    ``end`` on stdout at the window's edges (the parent meters between them). The number
    of workflows completed in all, the tail included."""
    t0 = time.monotonic()
    start, end = t0 + spec.warmup, t0 + spec.warmup + spec.duration
    seq = 0
    completed = 0
    in_window = 0

    async def loop() -> None:
        nonlocal seq, completed, in_window
        while time.monotonic() < end:
            seq += 1
            await one(seq)
            completed += 1
            if start <= time.monotonic() < end:
                in_window += 1

    async def edges() -> None:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        print("start", flush=True)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        print("end", flush=True)

    await asyncio.gather(edges(), *(loop() for _ in range(IN_FLIGHT)))
    print(f"window {in_window}", flush=True)
    return completed


async def dbos_main(spec: PeerSpec) -> dict[str, Any]:
    from dbos import DBOS

    DBOS(
        config={
            "name": "bench_peers",
            "system_database_url": spec.database_url,
            "dbos_system_schema": spec.schema,
            "log_level": "WARNING",
        }
    )

    @DBOS.step()
    async def step_one(seq: int) -> dict[str, int]:
        return {"seq": seq, "step": 1}

    @DBOS.step()
    async def step_two(seq: int) -> dict[str, int]:
        return {"seq": seq, "step": 2}

    @DBOS.step()
    async def step_three(seq: int) -> dict[str, int]:
        return {"seq": seq, "step": 3}

    @DBOS.workflow()
    async def three_steps(seq: int) -> dict[str, int]:
        one = await step_one(seq)
        two = await step_two(one["seq"])
        three = await step_three(two["seq"])
        return {"seq": seq, "total": one["step"] + two["step"] + three["step"]}

    DBOS.launch()
    try:
        print("ready", flush=True)
        completed = await closed_loop(three_steps, spec)
    finally:
        DBOS.destroy(destroy_registry=True)
    return {"completed": completed}


class State(TypedDict, total=False):
    """The LangGraph workflow's state: the input and each step's result."""

    seq: int
    one: dict[str, int]
    two: dict[str, int]
    three: dict[str, int]


async def langgraph_main(spec: PeerSpec) -> dict[str, Any]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from langgraph.graph import END, START, StateGraph
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    def step_one(state: State) -> State:
        return {"one": {"seq": state["seq"], "step": 1}}

    def step_two(state: State) -> State:
        return {"two": {"seq": state["one"]["seq"], "step": 2}}

    def step_three(state: State) -> State:
        return {"three": {"seq": state["two"]["seq"], "step": 3}}

    builder = StateGraph(State)
    builder.add_node("step_one", step_one)
    builder.add_node("step_two", step_two)
    builder.add_node("step_three", step_three)
    builder.add_edge(START, "step_one")
    builder.add_edge("step_one", "step_two")
    builder.add_edge("step_two", "step_three")
    builder.add_edge("step_three", END)

    kwargs = {
        "autocommit": True,
        "prepare_threshold": 0,
        "row_factory": dict_row,
        "options": f"-c search_path={spec.schema}",
    }
    async with AsyncConnectionPool(
        spec.database_url, min_size=IN_FLIGHT, max_size=IN_FLIGHT, kwargs=kwargs, open=False
    ) as pool:
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        graph = builder.compile(checkpointer=saver)

        async def one(seq: int) -> None:
            config = {"configurable": {"thread_id": f"run-{seq}-{uuid.uuid4().hex[:8]}"}}
            out = await graph.ainvoke({"seq": seq}, config, durability="sync")  # type: ignore[arg-type]
            assert out["three"]["step"] == 3

        print("ready", flush=True)
        completed = await closed_loop(one, spec)
    return {"completed": completed}


def peer_main(spec: PeerSpec) -> None:
    quiet_logging()
    main = {"dbos": dbos_main, "langgraph": langgraph_main}[spec.system]
    result = asyncio.run(main(spec))
    print("result " + json.dumps(result), flush=True)


# -- measuring -------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One system's measured window in one repeat."""

    system: str
    repeat: int
    #: Workflows/s in the measured window.
    rate: float = math.nan
    #: Cores the system's process used during the window.
    cores: float = math.nan
    #: Cores the whole machine was busy during the window (the servers and other work too).
    busy: float = math.nan
    #: Transaction ids PostgreSQL assigned during the window, per workflow in it.
    xids_per_wf: float = math.nan
    #: Rows left in the system's schema per completed workflow, by table.
    rows_per_wf: dict[str, float] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace, srv: Servers, admin: Any, redis: Any,
                 work_dir: Path, err: Console) -> None:  # fmt: skip
        self.args, self.srv, self.admin, self.redis = args, srv, admin, redis
        self.work_dir, self.err = work_dir, err
        self.estimate = FIRST_ESTIMATE
        self.schemas: list[str] = []
        self.seq = 0

    async def xid(self) -> int:
        return int(await self.admin.fetchval("SELECT pg_current_xact_id()::text::bigint"))

    async def rows_per_workflow(self, schema: str, completed: int) -> dict[str, float]:
        tables = await self.admin.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
            "AND table_type = 'BASE TABLE' ORDER BY table_name",
            schema,
        )
        out = {}
        for (table,) in tables:
            n = await self.admin.fetchval(f'SELECT count(*) FROM "{schema}"."{table}"')
            if n and completed:
                out[table] = n / completed
        return out

    def new_schema(self, system: str) -> str:
        schema = f"peers_{secrets.token_hex(4)}_{system}"
        self.schemas.append(schema)
        return schema

    # -- agentrt ----------------------------------------------------------------------

    def entries(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        """``n`` ingress entries as the webhook ingress writes them (partitions round-robin)."""
        from bench_peers_app import WorkRequested

        from runtime.events.model import encode_body, event_type_of
        from runtime.streams.keys import ingress_stream

        out = []
        for _ in range(n):
            self.seq += 1
            body = WorkRequested(seq=self.seq)
            encoded = encode_body(body)
            fields = {
                "event_id": str(uuid.uuid4()),
                "type": event_type_of(body),
                "schema_version": "1",
                "source": "bench",
                "delivery": f"msg_{self.seq}",
                "received_at": datetime.now(UTC).isoformat(),
                "content_type": "application/json",
                "body": encoded,
                "raw": b'{"payload": ' + encoded + b"}",
            }
            out.append((ingress_stream(self.seq % PARTITIONS), fields))
        return out

    async def agentrt(self, repeat: int) -> Result:
        from runtime.log.migrations import migrate
        from runtime.settings import Settings

        args = self.args
        result = Result("agentrt", repeat)
        schema = self.new_schema("agentrt")
        self.schemas.append(f"{schema}_read")
        settings = Settings.from_env(db_schema=schema).with_urls(
            redis_url=self.srv.redis_url, database_url=self.srv.database_url
        )
        await migrate(settings)
        await self.redis.flushdb()
        # A backlog that outlasts the start, the warm-up and the window, with room to spare.
        backlog = math.ceil(self.estimate * 1.5 * (args.warmup + args.duration + 3.0))
        for chunk in range(0, backlog, 1000):
            pipe = self.redis.pipeline(transaction=False)
            for stream, fields in self.entries(min(1000, backlog - chunk)):
                pipe.xadd(stream, fields)
            await pipe.execute()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
        env.update(
            REDIS_URL=self.srv.redis_url,
            DATABASE_URL=self.srv.database_url,
            AGENTRT_DB_SCHEMA=schema,
            AGENTRT_STATE_DIR=str(self.work_dir / "state"),
            PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p),
        )
        agentrt_bin = Path(sys.executable).parent / "agentrt"
        command = [str(agentrt_bin)] if agentrt_bin.exists() else [sys.executable, "-m", "runtime"]
        log_path = self.work_dir / f"agentrt-worker-{repeat}.log"
        with _log_file(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                *command, "worker", "--app", "bench_peers_app",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=HERE, env=env,
            )  # fmt: skip
        count_sql = f'SELECT count(*) FROM "{schema}".inbox'
        try:
            deadline = time.monotonic() + 60
            while "SIGTERM drains" not in log_path.read_text(errors="replace"):
                if proc.returncode is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"agentrt worker did not start; its output:\n{tail}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(args.warmup)
            c0, t0, x0, cpu0, b0 = await self.admin.fetchval(count_sql), time.monotonic(), \
                await self.xid(), proc_cpu(proc.pid), machine_busy()  # fmt: skip
            await asyncio.sleep(args.duration)
            c1, t1, x1, cpu1, b1 = await self.admin.fetchval(count_sql), time.monotonic(), \
                await self.xid(), proc_cpu(proc.pid), machine_busy()  # fmt: skip
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await reap(proc, 60)
        done = c1 - c0
        result.rate = done / (t1 - t0)
        result.cores = (cpu1 - cpu0) / (t1 - t0)
        result.busy = (b1 - b0) / (t1 - t0)
        result.xids_per_wf = (x1 - x0 - 1) / done if done else math.nan
        if c1 >= backlog:
            result.problems.append(f"the backlog of {backlog} ran out during the window")
        self.estimate = max(self.estimate, result.rate)
        result.problems.extend(await self.agentrt_sanity(schema))
        completed = int(await self.admin.fetchval(count_sql))
        result.rows_per_wf = await self.rows_per_workflow(schema, completed)
        if proc.returncode not in (0, None):
            result.problems.append(f"the worker exited with code {proc.returncode}")
        await self.redis.flushdb()
        return result

    async def agentrt_sanity(self, schema: str) -> list[str]:
        """Every completed workflow's run holds 3 step records and 1 result; nothing failed."""
        row = await self.admin.fetchrow(
            f"""
            WITH runs AS (
                SELECT run_id,
                       count(*) FILTER (WHERE event_type = 'step.recorded') AS steps,
                       count(*) FILTER (WHERE event_type = 'bench_peers.done') AS results,
                       count(*) FILTER (WHERE event_type = 'activation.completed') AS completions
                FROM "{schema}".events GROUP BY run_id
            )
            SELECT count(*) FILTER (WHERE completions = 1) AS completed,
                   count(*) FILTER (WHERE completions = 1 AND (steps <> 3 OR results <> 1))
                       AS wrong,
                   count(*) FILTER (WHERE completions > 1) AS doubled
            FROM runs
            """
        )
        inbox = await self.admin.fetchval(
            f"SELECT count(*) FROM \"{schema}\".inbox WHERE outcome <> 'completed'"
        )
        problems = []
        if not row["completed"]:
            problems.append("no workflow completed")
        if row["wrong"]:
            problems.append(
                f"{row['wrong']} of {row['completed']} completed workflows do not hold "
                "3 step records and 1 result in the log"
            )
        if row["doubled"]:
            problems.append(f"{row['doubled']} workflows completed more than once")
        if inbox:
            problems.append(f"{inbox} activations did not complete (dead-lettered or other)")
        return problems

    # -- the peers --------------------------------------------------------------------

    async def peer(self, system: str, repeat: int) -> Result:
        args = self.args
        result = Result(system, repeat)
        if missing := missing_packages(system):
            result.skipped = (
                f"{', '.join(missing)} not installed: pip install '.[peers]' "
                f"(or .venv/bin/python -m pip install -e '.[peers]')"
            )
            return result
        schema = self.new_schema(system)
        await self.admin.execute(f'CREATE SCHEMA "{schema}"')
        spec = PeerSpec(system, self.srv.database_url, schema, args.warmup, args.duration)
        log_path = self.work_dir / f"{system}-{repeat}.log"
        with _log_file(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, SCRIPT, "--_peer", json.dumps(dataclasses.asdict(spec)),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=REPO,
            )  # fmt: skip
        assert proc.stdout is not None
        marks: dict[str, tuple[float, int, float, float]] = {}
        said: dict[str, str] = {}
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(proc.stdout.readline(), 120)
                except TimeoutError:
                    raw = b""
                if not raw:
                    break
                line = raw.decode().strip()
                word, _, rest = line.partition(" ")
                if word in ("start", "end"):
                    marks[word] = (
                        time.monotonic(),
                        await self.xid(),
                        proc_cpu(proc.pid),
                        machine_busy(),
                    )
                elif word in ("window", "result", "ready"):
                    said[word] = rest
        finally:
            # Its output ended: it is exiting. A signal now would reap it behind asyncio's
            # back (Popen.send_signal polls first), so only one that hangs gets one.
            await reap(proc, 60)
        if "result" not in said or "window" not in said or len(marks) < 2:
            tail = log_path.read_text(errors="replace")[-3000:]
            result.problems.append(f"{system} did not finish (exit {proc.returncode})")
            self.err.print(f"[red]{system} failed[/]; its output:\n{escape(tail)}")
            return result
        (t0, x0, cpu0, b0), (t1, x1, cpu1, b1) = marks["start"], marks["end"]
        in_window = int(said["window"])
        result.rate = in_window / args.duration
        result.cores = (cpu1 - cpu0) / (t1 - t0)
        result.busy = (b1 - b0) / (t1 - t0)
        result.xids_per_wf = (x1 - x0 - 1) / in_window if in_window else math.nan
        completed = int(json.loads(said["result"])["completed"])
        result.rows_per_wf = await self.rows_per_workflow(schema, completed)
        result.problems.extend(await self.peer_sanity(system, schema, completed))
        return result

    async def peer_sanity(self, system: str, schema: str, completed: int) -> list[str]:
        """The peer's own records: as many finished workflows as it reported, 3 steps each."""
        if system == "dbos":
            done = await self.admin.fetchval(
                f"SELECT count(*) FROM \"{schema}\".workflow_status WHERE status = 'SUCCESS'"
            )
            steps = await self.admin.fetchval(f'SELECT count(*) FROM "{schema}".operation_outputs')
        else:
            done = await self.admin.fetchval(
                f'SELECT count(DISTINCT thread_id) FROM "{schema}".checkpoints'
            )
            steps = await self.admin.fetchval(
                f'SELECT count(*) FROM "{schema}".checkpoint_writes '
                "WHERE channel IN ('one', 'two', 'three')"
            )
        problems = []
        if done != completed:
            problems.append(f"{done} workflows recorded, {completed} reported completed")
        if steps != 3 * completed:
            problems.append(f"{steps} step records for {completed} workflows (expected 3 each)")
        return problems


def _log_file(path: Path) -> BinaryIO:
    """A child's output file (the child keeps its own descriptor once started)."""
    return open(path, "wb")


# -- figures and output ----------------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    postgres: str
    redis: str
    versions: dict[str, str]
    warmup: float
    duration: float
    repeat: int
    seconds: float = 0.0


def figures_of(results: list[Result]) -> dict[str, Figure]:
    figures = {s: Figure(f"{LABELS[s]} workflows/s", "wf/s") for s in SYSTEMS}
    figures["langgraph"].name = 'LangGraph workflows/s (durability="sync")'
    for r in results:
        if not r.skipped:
            figures[r.system].runs.append(r.rate)
    return figures


def ratio_row(results: list[Result], figures: dict[str, Figure]) -> dict[str, Any]:
    """agentrt / best peer: the median over repeats of each repeat's ratio."""
    ratios, notes = [], []
    for r in sorted({r.repeat for r in results}):
        mine = {x.system: x for x in results if x.repeat == r}
        ours = mine.get("agentrt")
        peers = [x.rate for s, x in mine.items() if s != "agentrt" and not x.skipped
                 and not math.isnan(x.rate) and x.rate > 0]  # fmt: skip
        if ours is not None and peers and not math.isnan(ours.rate):
            ratios.append(ours.rate / max(peers))
    skipped = sorted({r.system for r in results if r.skipped})
    measured = {r.system for r in results if not r.skipped}
    if not ratios:
        if "agentrt" not in measured:
            notes.append("agentrt not measured")
        elif skipped:
            notes.append(f"no peer measured ({', '.join(LABELS[s] for s in skipped)} not installed:"
                         " pip install '.[peers]')")  # fmt: skip
        else:
            notes.append("no peer measured in the same run as agentrt")
    peer_values = [f.value for s, f in figures.items() if s != "agentrt" and f.value]
    ratio = statistics.median(ratios) if ratios else None
    row = {
        "name": "agentrt / best peer",
        "value": None if ratio is None else round(ratio, 2),
        "unit": "x",
        "ceiling": round(max(peer_values), 1) if peer_values else None,
        "ratio": None if ratio is None else round(ratio, 3),
        "target": TARGET,
    }
    if skipped and ratios:
        notes.append(f"{', '.join(LABELS[s] for s in skipped)} skipped (not installed)")
    if notes:
        row["note"] = "; ".join(notes)
    return row


def rows_of(results: list[Result]) -> list[dict[str, Any]]:
    figures = figures_of(results)
    return [*figure_rows(figures), ratio_row(results, figures)]


def row_cells(row: dict[str, Any]) -> tuple[str, str, str]:
    """value, target and mark of a row, as text."""
    if row["unit"] == "x":
        value = "—" if row["value"] is None else f"{row['value']:.2f}x"
        target = f"≥{row['target']:g}x"
        if row["value"] is None:
            return value, target, "? not measured"
        return value, target, "✓ pass" if row["value"] >= row["target"] else "✗ MISS"
    return ("—" if row["value"] is None else f"{row['value']:,.0f}"), "", ""


def versions() -> dict[str, str]:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "runtime"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    agentrt = version_of("agentrt") + (f" (runtime at {head}" if head else "")
    agentrt += (" with uncommitted changes)" if dirty else ")") if head else ""
    return {
        "agentrt": agentrt,
        **{d: version_of(d) for d in ("dbos", "langgraph", "langgraph-checkpoint-postgres")},
    }


def setup_text(info: RunInfo) -> str:
    v = info.versions
    return (
        f"agentrt {v['agentrt']}, DBOS {v['dbos']}, LangGraph {v['langgraph']} with "
        f"langgraph-checkpoint-postgres {v['langgraph-checkpoint-postgres']}; {info.postgres}; "
        f"{info.redis} (agentrt only); each system in one process, {IN_FLIGHT} workflows in "
        f"flight; {info.warmup:g}s warm-up + {info.duration:g}s measured per system, "
        f"median of {info.repeat} run(s)"
    )


def durable_text(results: list[Result], *, described: bool = True) -> list[str]:
    lines = []
    for s in SYSTEMS:
        mine = [r for r in results if r.system == s and not r.skipped]
        tables: dict[str, list[float]] = {}
        for r in mine:
            for t, v in r.rows_per_wf.items():
                tables.setdefault(t, []).append(v)
        rows = ", ".join(
            f"{t} {statistics.median(v):.1f}" for t, v in sorted(tables.items())
            if statistics.median(v) >= 0.05
        )  # fmt: skip
        xids = [r.xids_per_wf for r in mine if not math.isnan(r.xids_per_wf)]
        cores = [r.cores for r in mine if not math.isnan(r.cores)]
        measured = []
        if xids:
            measured.append(f"{statistics.median(xids):.1f} write transactions")
        if rows:
            measured.append(f"rows left: {rows}")
        if cores:
            measured.append(f"its process used {statistics.median(cores):.2f} cores")
        if described:
            lines.append(
                f"- **{LABELS[s]}**: {DURABLE[s]}."
                + (f" Measured per workflow: {'; '.join(measured)}." if measured else "")
            )
        elif measured:
            lines.append(f"- {LABELS[s]}: {'; '.join(measured)}.")
    return lines


def busy_text(results: list[Result]) -> str:
    """Per-run ratios and how busy the machine was: how noisy the figures are."""
    ratios = []
    for r in sorted({r.repeat for r in results}):
        mine = {x.system: x.rate for x in results if x.repeat == r and not x.skipped}
        peers = [v for s, v in mine.items() if s != "agentrt" and v > 0]
        if peers and mine.get("agentrt", 0) > 0:
            ratios.append(f"{mine['agentrt'] / max(peers):.2f}x")
    busy = [r.busy for r in results if not math.isnan(r.busy)]
    text = f"agentrt / best peer per run: {', '.join(ratios)}. " if len(ratios) > 1 else ""
    if busy:
        text += (
            f"The machine was busy {statistics.median(busy):.2f} cores (median; "
            f"{min(busy):.2f}..{max(busy):.2f}) of {len(os.sched_getaffinity(0))} during the "
            "measured windows, the servers and any other work included."
        )
    return text


def render(results: list[Result], info: RunInfo, out: Console) -> None:
    rows = rows_of(results)
    out.print(f"[bold]agentrt against its peers[/]  {setup_text(info)} ({info.seconds:.0f}s)")
    table = Table()
    for col in ("figure", "value", "unit", "target", "", "runs"):
        table.add_column(col, justify="left" if col in ("figure", "unit", "") else "right")
    figures = figures_of(results)
    for row in rows:
        value, target, mark = row_cells(row)
        style = "red" if "MISS" in mark else "green" if "pass" in mark else "default"
        runs = ""
        if row["unit"] == "wf/s":
            f = next(f for f in figures.values() if f.name == row["name"])
            runs = ", ".join(f"{v:,.0f}" for v in f.runs) if len(f.runs) > 1 else ""
        table.add_row(row["name"], value, row["unit"], target, f"[{style}]{mark}[/]", runs)
    out.print(table)
    detail = Table(title="per system and run")
    for col in ("run", "system", "wf/s", "cores", "machine busy", "write tx/wf", "errors"):
        detail.add_column(col, justify="left" if col == "system" else "right")
    for r in results:
        if r.skipped:
            detail.add_row(str(r.repeat + 1), LABELS[r.system], "skipped", "", "", "", "")
            continue
        detail.add_row(
            str(r.repeat + 1), LABELS[r.system], f"{r.rate:,.0f}", f"{r.cores:.2f}",
            f"{r.busy:.2f}", f"{r.xids_per_wf:.1f}", "[red]yes[/]" if r.problems else "0",
        )  # fmt: skip
    out.print(detail)
    for line in durable_text(results):
        out.print(line, markup=False)
    out.print(busy_text(results), markup=False)
    for s in sorted({r.system for r in results if r.skipped}):
        reason = next(r.skipped for r in results if r.system == s and r.skipped)
        out.print(f"[yellow]skipped {LABELS[s]}:[/] {escape(str(reason))}")
    flagged = [r for r in results if r.problems]
    if flagged:
        out.print("[bold red]errors flagged (these figures are suspect):[/]")
        for r in flagged:
            out.print(f"  [red]✗[/] run {r.repeat + 1} {LABELS[r.system]}: "
                      f"{escape('; '.join(r.problems))}")  # fmt: skip
    ratio = rows[-1]
    if ratio["value"] is None:
        out.print(
            f"[bold yellow]agentrt / best peer not measured:[/] {escape(ratio.get('note', ''))}"
        )
    elif ratio["value"] < TARGET:
        out.print(f"[bold red]target missed:[/] agentrt / best peer {ratio['value']:.2f}x, "
                  f"target ≥{TARGET:g}x")  # fmt: skip
    else:
        out.print("[bold green]target met[/]")


def readme_block(results: list[Result], info: RunInfo) -> str:
    rows = rows_of(results)
    errors = sum(bool(r.problems) for r in results)
    lines = [
        "<!-- bench_peers:start -->",
        f"Measured with `scripts/bench_peers.py` on {dt.date.today().isoformat()}: {machine()}, "
        f"shared by the system measured and the servers; {setup_text(info)}"
        + (f"; {errors} run(s) flagged (see the script's output)." if errors else "."),
        "",
        "| figure | value | unit | target | |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for row in rows:
        value, target, mark = row_cells(row)
        lines.append(f"| {row['name']} | {value} | {row['unit']} | {target} | {mark} |")
    if note := rows[-1].get("note"):
        lines.append(f"\n{note}.")
    lines += ["", busy_text(results)]
    lines += [
        "",
        "Measured per workflow (write transactions: the transaction ids PostgreSQL assigned "
        "during the window, over all its sessions, per workflow completed in it; rows: what the "
        "system left in its schema):",
        "",
        *durable_text(results, described=False),
    ]
    lines.append("<!-- bench_peers:end -->")
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------


def ours(key: bytes) -> bool:
    """Whether ``key`` is one this benchmark leaves: an ingress partition's stream, a key of
    its own agent (``{bench_peers}``), its tools' breakers, its relay; anything else belongs
    to someone else."""
    if not key.startswith(b"agentrt:"):
        return False
    if key.startswith((b"agentrt:relay:peers_", b"agentrt:breaker:step_")):
        return True  # the relay of a scratch schema, the breakers of the app's tools
    tag = key[key.find(b"{") + 1 : key.rfind(b"}")] if b"{" in key else b""
    return tag == AGENT.encode() or (tag[:1] == b"p" and tag[1:].isdigit())


async def run(args: argparse.Namespace, srv: Servers, err: Console) -> tuple[list[Result], RunInfo]:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from runtime.log.pool import connect, redact

    redis = aioredis.Redis.from_url(srv.redis_url, socket_timeout=60)
    await claim_redis_db(
        redis, args.redis_db, ours, "not a key of this benchmark (another run may be using it)"
    )
    admin = await connect(srv.database_url)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        bench = Bench(args, srv, admin, redis, Path(tmp), err)
        try:
            postgres, redis_text = await describe_servers(srv, admin, redis, err)
            info = RunInfo(
                postgres=postgres,
                redis=redis_text,
                versions=versions(),
                warmup=args.warmup,
                duration=args.duration,
                repeat=args.repeat,
            )
            for s in args.systems:
                if missing := missing_packages(s):
                    err.print(
                        f"[bold yellow]{LABELS[s]} skipped:[/] {', '.join(missing)} not "
                        "installed; install the peers with: pip install '.\\[peers]'"
                    )
            err.print(
                f"[dim]PostgreSQL {redact(srv.database_url)}, Redis {redact(srv.redis_url)}[/]"
            )
            started = time.perf_counter()
            for r in range(args.repeat):
                chosen = [s for s in SYSTEMS if s in args.systems]
                order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
                for system in order:
                    err.print(f"run {r + 1}/{args.repeat} {LABELS[system]} ...", end="")
                    try:
                        if system == "agentrt":
                            got = await bench.agentrt(r)
                        else:
                            got = await bench.peer(system, r)
                    except Exception as exc:  # this system's run failed: reported, run goes on
                        got = Result(system, r, problems=[f"the run failed: {exc!r}"[:500]])
                    results.append(got)
                    if got.skipped:
                        err.print(" skipped")
                    else:
                        problems = escape("; ".join(got.problems))
                        err.print(
                            f" {got.rate:,.0f} wf/s ({got.cores:.2f} cores, "
                            f"{got.xids_per_wf:.1f} write tx/wf)"
                            + (f" [red]{problems}[/]" if problems else "")
                        )
            info.seconds = time.perf_counter() - started
            return results, info
        finally:
            with contextlib.suppress(RedisError):
                await redis.flushdb()
                if srv.redis_owned:  # ours: shrink its AOF back to nothing
                    await redis.bgrewriteaof()
            await redis.aclose()
            await drop_schemas(admin, bench.schemas, err)
            await admin.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark agentrt against DBOS and LangGraph on the same durable "
        "three-step workflow, same PostgreSQL."
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run (under a minute)")
    add("--json", action="store_true", help='last stdout line: {"figures": [...]}')
    add("--write-readme", action="store_true", help="refresh the bench_peers block of README.md")
    add("--repeat", type=int, help="runs of every system, medians reported (default 3, quick 1)")
    add("--duration", type=float, help="measured seconds per system (default 10, quick 4)")
    add("--warmup", type=float, help="warm-up seconds per system (default 3, quick 2)")
    add_server_options(parser, redis_db=11)
    add(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"the systems to measure, separated by commas (default {','.join(SYSTEMS)})",
    )
    add("--_peer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._peer:
        return args
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS):
        parser.error(f"--systems takes some of {', '.join(SYSTEMS)}, separated by commas")
    if args.repeat < 1 or args.warmup < 0 or args.duration <= 0:
        parser.error("--repeat must be >= 1, --warmup >= 0, --duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._peer:
        peer_main(PeerSpec(**json.loads(args._peer)))
        return 0
    err, out = main_consoles(args.json)
    got = run_on_servers(args, err, lambda srv: run(args, srv, err))
    if got is None:
        return 130
    results, info = got
    render(results, info, out)
    if args.write_readme:
        write_readme(README, "bench_peers", readme_block(results, info), err)
    if args.json:
        print_json_line(rows_of(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
