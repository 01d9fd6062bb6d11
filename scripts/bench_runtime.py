"""Benchmark the agent runtime (ingress stream -> worker -> log) against the same work by hand.

One run measures, side by side on the same Redis and PostgreSQL, with 1 and
2 worker processes (``--processes``):

runtime:
  ``runtime.worker.Worker`` running one agent without an LLM (``Echo``): it
  reads the ingress streams ``agentrt:in:{p0..p7}`` in its consumer group,
  and each activation emits one event. The worker commits the activation in
  one transaction (the trigger event, the emitted event,
  ``activation.completed``, the inbox row), then XACKs; whatever else it does
  per activation (the inbox look-up, steps, the hash chain, NOTIFY) is what
  the comparison prices. Options are the
  ``agentrt worker`` defaults: concurrency 16, batch 32, the runtime pool
  (10 connections), and no relay (``--no-relay``).

steps:
  the same worker and options running an agent (``ThreeSteps``) whose handler
  makes three durable tool steps per activation (``await ctx.tool(...)`` of
  three trivial ``@tool`` functions that return a small dict at once: each
  goes through the worker's circuit breaker and is recorded in the log before
  the handler goes on), then emits one event as ``Echo`` does. Its
  activations/s are compared with the no-step runtime's in the same run: what
  three durable steps cost.

ceiling (the same work by hand):
  the same number of processes, each an XREADGROUP loop over the same streams
  with the same batch, the same concurrency and the same pool size, doing per
  entry one statement (one transaction, one round trip) that INSERTs the
  three equivalent rows and, in a CTE, the inbox row, then XACK (batched per
  wake-up into one pipelined round trip, as the runtime does). Raw asyncpg
  on plain copies of the ``events`` and ``inbox`` tables (``LIKE ...
  INCLUDING ALL``: same columns, defaults and indexes; no triggers, so no
  NOTIFY, no hash chain, no registry, no inbox look-up before the handler).

Two phases per kind and process count, in the same worker processes:

latency (open loop):
  a producer XADDs one entry at a time at a fixed ``--rate`` (default 500
  events/s); each event's latency runs from just before its XADD is sent to
  just after its activation's commit returned in the worker (both read from
  the same wall clock; the worker notes the time between the commit and the
  XACK). p50 and p99 over the measured seconds (after a warm-up). The
  "per-activation overhead" is runtime p50 minus ceiling p50 at that rate.

throughput (backlog):
  a backlog of entries is XADDed (pipelined) and the workers drain it;
  activations/s counts the commits inside a window after a warm-up.

Then, once per run, a soak: the steps kind in one fresh worker process while
the producer XADDs at ``--rate`` for ``--soak-minutes`` (default 5, quick 0.25);
the worker's resident memory (VmRSS) is read after 1 minute (or a third of a
shorter soak) and at the end, and their ratio tells whether it holds steady.

Servers: ``REDIS_URL`` / ``DATABASE_URL`` if set (DATABASE_URL a superuser or
schema-owner URL), otherwise the embedded servers in ``--state-dir`` (default
``.agentrt/bench``) with their durable defaults (Redis AOF ``appendfsync
always``, PostgreSQL fsync on). Redis database ``--redis-db`` (default 13)
is flushed before each block and at the end; PostgreSQL work goes into fresh
``bench_<random>`` schemas dropped at the end.

Usage::

    .venv/bin/python scripts/bench_runtime.py            # full run, about twelve minutes
    .venv/bin/python scripts/bench_runtime.py --quick    # under a minute: 1 process, a 15 s soak
    .venv/bin/python scripts/bench_runtime.py --soak-minutes 0   # no soak
    .venv/bin/python scripts/bench_runtime.py --json     # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/bench_runtime.py --repeat 3 --write-readme
    .venv/bin/python scripts/bench_runtime.py --quick --profile /tmp/prof  # cProfile the workers

The exit code is 0 whatever the figures: this is a measurement, not a test.
Missed targets and flagged errors are listed at the end of the human output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import itertools
import json
import math
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repository's packages first
    sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from benchlib import (  # noqa: E402 - scripts/ is the script's own directory
    Figure,
    Servers,
    add_server_options,
    cells,
    claim_redis_db,
    describe_servers,
    drop_schemas,
    figure_rows,
    machine,
    machine_busy,
    main_consoles,
    met,
    percentile,
    print_json_line,
    proc_cpu,
    quiet_logging,
    readme_table,
    reap,
    rss_mib,
    run_on_servers,
    write_readme,
)
from redis.exceptions import ResponseError  # noqa: E402

from runtime import ToolContext, tool  # noqa: E402
from runtime.agents.agent import Agent  # noqa: E402
from runtime.agents.context import Context  # noqa: E402
from runtime.events.builtin import ActivationCompleted  # noqa: E402
from runtime.events.model import Event, encode_body, event_type_of, new_event_id  # noqa: E402
from runtime.streams.keys import agent_stream, ingress_stream  # noqa: E402

README = REPO / "README.md"
SCRIPT = str(Path(__file__).resolve())
MARK_START = "<!-- bench_runtime:start -->"
MARK_END = "<!-- bench_runtime:end -->"
#: Runtime activations/s as a share of the ceiling's, at least.
TARGET_RATIO = 0.6
#: Runtime p50 minus ceiling p50 at the latency rate, in milliseconds, below.
TARGET_OVERHEAD_MS = 5.0
#: Steps activations/s as a share of the no-step runtime's, at least: three durable steps
#: cost at most a quarter of an activation.
TARGET_STEPS_RATIO = 0.75
#: The soaked worker's RSS at the end over its RSS at the first reading, at most.
TARGET_RSS_GROWTH = 1.10
#: Seconds of load before the soak's first RSS reading (or a third of a shorter soak).
SOAK_FIRST = 60.0
#: Seconds between the soak's RSS samples and commit dumps (which empty the recorder).
SOAK_SAMPLE = 5.0
#: Seconds the soak waits for its last commits (a worker slower than the rate is flagged,
#: not waited for: its memory is what the soak measures).
SOAK_DRAIN = 10.0
AGENT = "bench"
PARTITIONS = 8
#: ``agentrt worker`` defaults.
CONCURRENCY = 16
BATCH = 32
POOL_SIZE = 10
#: Activations/s per process assumed before any throughput phase was measured.
FIRST_ESTIMATE = {"ceiling": 3000.0, "runtime": 3000.0, "steps": 2000.0}
#: Seconds a latency phase waits for its last commits after its schedule ends.
DRAIN_SECONDS = 30.0
#: Cores of other work (median over the measured windows) that make a run noisy.
NOISY_CORES = 0.15

Kind = Literal["ceiling", "runtime", "steps"]
KINDS: tuple[Kind, ...] = ("ceiling", "runtime", "steps")


# -- the workload: events and the agent (imported by the worker processes too) --------


class BenchReceived(Event, tag="bench_runtime.received"):
    """The ingress event (about 350 bytes of JSON)."""

    seq: int
    customer: str
    subject: str
    amount: int
    labels: list[str]
    note: str


class BenchHandled(Event, tag="bench_runtime.handled"):
    """What the agent emits for each event."""

    seq: int
    customer: str
    verdict: str


class Echo(Agent):
    """No LLM, no tools: one emitted event per activation."""

    name = AGENT
    subscribes = (BenchReceived,)

    async def handle(self, event: BenchReceived, ctx: Context) -> None:
        ctx.emit(BenchHandled(seq=event.seq, customer=event.customer, verdict=_verdict(event)))


def _verdict(event: BenchReceived) -> str:
    return "review" if event.amount > 50_000 else "accept"


@tool
async def bench_lookup(ctx: ToolContext, customer: str) -> dict[str, str]:
    """Look up a customer (a stand-in that answers at once)."""
    return {"customer": customer, "tier": "gold" if customer < "cus_05000" else "silver"}


@tool
async def bench_score(ctx: ToolContext, amount: int) -> dict[str, int]:
    """Score an amount (a stand-in that answers at once)."""
    return {"amount": amount, "score": amount % 100}


@tool
async def bench_route(ctx: ToolContext, tier: str, score: int, amount: int) -> dict[str, str]:
    """Route a case to a queue (a stand-in that answers at once)."""
    return {"queue": f"{tier}-{score // 25}", "verdict": "review" if amount > 50_000 else "accept"}


class ThreeSteps(Agent):
    """No LLM: three durable tool steps, then one emitted event per activation."""

    name = AGENT
    subscribes = (BenchReceived,)
    tools = (bench_lookup, bench_score, bench_route)

    async def handle(self, event: BenchReceived, ctx: Context) -> None:
        customer = await ctx.tool(bench_lookup, customer=event.customer)
        score = await ctx.tool(bench_score, amount=event.amount)
        route = await ctx.tool(
            bench_route, tier=customer["tier"], score=score["score"], amount=event.amount
        )
        ctx.emit(BenchHandled(seq=event.seq, customer=event.customer, verdict=route["verdict"]))


# fmt: off
_WORDS = (
    "invoice", "shipment", "customer", "refund", "priority", "escalate", "review", "contract",
    "renewal", "support", "billing", "account", "urgent", "follow", "update", "request",
)
# fmt: on


class Workload:
    """Ingress entries as the webhook ingress writes them (see tests/runtime_fixtures.py)."""

    def __init__(self, tag: str) -> None:
        self._rng = random.Random(tag)
        self._seq = 0
        self._filler = " ".join(self._rng.choice(_WORDS) for _ in range(200))

    def entry(self) -> tuple[str, str, dict[str, Any]]:
        """(stream, event id, fields) of the next event; partitions round-robin."""
        rng = self._rng
        self._seq += 1
        body = BenchReceived(
            seq=self._seq,
            customer=f"cus_{rng.randrange(10_000):05d}",
            subject=" ".join(rng.choice(_WORDS) for _ in range(6)),
            amount=rng.randint(100, 99_999),
            labels=[rng.choice(_WORDS) for _ in range(rng.randint(2, 5))],
            note=self._filler[: rng.randint(150, 220)],
        )
        event_id = str(uuid.uuid4())
        encoded = encode_body(body)
        fields = {
            "event_id": event_id,
            "type": event_type_of(body),
            "schema_version": "1",
            "source": "bench",
            "delivery": f"msg_{self._seq}",
            "received_at": datetime.now(UTC).isoformat(),
            "content_type": "application/json",
            "body": encoded,
            "raw": b'{"payload": ' + encoded + b"}",
        }
        return ingress_stream(self._seq % PARTITIONS), event_id, fields


# -- the worker processes --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    kind: Kind
    index: int
    redis_url: str
    #: The migration (owner) URL; the runtime derives its pool's URL from it.
    database_url: str
    #: The URL the ceiling's pool uses: the one the runtime's pool ends up with.
    pool_url: str
    schema: str
    raw_schema: str
    notify: bool
    dump_dir: str
    profile: str | None = None


class Recorder:
    """(event id, wall-clock time just after the COMMIT returned) per activation."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.records: list[tuple[uuid.UUID, float]] = []
        self.dumps = 0

    def dump(self) -> None:
        records, self.records = self.records, []
        self.dumps += 1
        path = Path(self.spec.dump_dir) / f"{self.spec.kind}-{self.spec.index}-{self.dumps}.json"
        path.write_bytes(msgspec.json.encode([(str(e), t) for e, t in records]))
        print(f"dumped {path} {len(records)}", flush=True)


async def _keep_session(conn: asyncpg.Connection) -> None:
    return None


class Ceiling:
    """The same work by hand: XREADGROUP, one INSERT transaction per entry, XACK."""

    def __init__(
        self, redis: aioredis.Redis, pool: asyncpg.Pool, raw_schema: str, recorder: Recorder
    ) -> None:
        self.redis, self.pool, self.recorder = redis, pool, recorder
        self.consumer = f"ceiling-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        streams = [ingress_stream(p) for p in range(PARTITIONS)] + [agent_stream(AGENT)]
        self.streams: dict[Any, Any] = dict.fromkeys(streams, ">")
        self.capacity = asyncio.Semaphore(CONCURRENCY)
        self.tasks: set[asyncio.Task[None]] = set()
        q = f'"{raw_schema}"'
        rows = ", ".join(
            "(" + ", ".join(f"${i + 13 * r}" for i in range(1, 14)) + ")" for r in range(3)
        )
        # One statement: one transaction and one round trip (as the runtime's commit).
        self.sql_commit = (
            f"WITH marked AS (INSERT INTO {q}.inbox "
            "(consumer, event_id, activation_id, outcome, run_id) "
            "VALUES ($40, $41, $42, $43, $44)) "
            f"INSERT INTO {q}.events (event_id, stream_id, stream_version, event_type, "
            "schema_version, run_id, causation_id, producer, recorded_at, trace, data, "
            f"prev_hash, hash) VALUES {rows}"
        )
        self.decode = msgspec.json.Decoder(BenchReceived).decode
        self.encode = msgspec.json.Encoder().encode
        self.type = str(BenchReceived.__struct_config__.tag).encode()
        self.hash = bytes(32)

    async def setup(self) -> None:
        for stream in self.streams:
            with contextlib.suppress(ResponseError):
                await self.redis.xgroup_create(stream, AGENT, id="0", mkstream=True)

    def ack(self, stream: bytes, entry_id: bytes) -> None:
        # Acknowledgements batched per wake-up, as the runtime does them: a
        # hand-written loop that knows the trick should get it too.
        self.acks.setdefault(stream, []).append(entry_id)
        self.ack_wake.set()

    async def flush_acks(self) -> None:
        self.ack_wake.clear()
        batch, self.acks = self.acks, {}
        if batch:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, ids in batch.items():
                    pipe.xack(stream, AGENT, *ids)
                await pipe.execute()

    async def ack_loop(self) -> None:
        while not self.closing:
            await self.ack_wake.wait()
            await self.flush_acks()

    async def run(self, stop: asyncio.Event) -> None:
        await self.setup()
        self.acks: dict[bytes, list[bytes]] = {}
        self.ack_wake = asyncio.Event()
        self.closing = False
        acker = asyncio.create_task(self.ack_loop())
        try:
            await self._run(stop)
        finally:
            # Stopped by a flag, not cancelled: a cancellation that lands inside redis-py's
            # pipeline can be swallowed there, and the loop then waited forever (the
            # process was killed 30s later, after every ceiling block).
            self.closing = True
            self.ack_wake.set()
            await asyncio.gather(acker, return_exceptions=True)
            await self.flush_acks()

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.capacity.acquire()
            self.capacity.release()
            reply = await self.redis.xreadgroup(
                AGENT, self.consumer, self.streams, count=BATCH, block=1000
            )
            for stream, entries in reply or []:
                for entry_id, fields in entries:
                    await self.capacity.acquire()
                    task = asyncio.create_task(self.handle(stream, entry_id, fields))
                    self.tasks.add(task)
                    task.add_done_callback(self._done)
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.capacity.release()
        if not task.cancelled() and task.exception() is not None:
            print(f"ceiling: {task.exception()!r}", file=sys.stderr)

    async def handle(self, stream: bytes, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        if fields[b"type"] != self.type:
            self.ack(stream, entry_id)
            return
        started = time.perf_counter()
        event_id = uuid.UUID(fields[b"event_id"].decode())
        body = fields[b"body"]
        event = self.decode(body)
        received = datetime.fromisoformat(fields[b"received_at"].decode())
        handled = BenchHandled(seq=event.seq, customer=event.customer, verdict=_verdict(event))
        emitted_id, completed_id, activation_id = new_event_id(), new_event_id(), new_event_id()
        completed = ActivationCompleted(
            agent=AGENT,
            activation_id=activation_id,
            trigger_id=event_id,
            trigger_type=self.type.decode(),
            steps=0,
            emitted=[emitted_id],
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        now = datetime.now(UTC)
        run, h = f"run-{event_id}", self.hash
        await self.pool.execute(
            self.sql_commit,
            event_id, run, 1, "bench_runtime.received", 1, event_id, None,
            "ingress:bench", received, None, body.decode(), h, h,
            emitted_id, run, 2, "bench_runtime.handled", 1, event_id, event_id,
            AGENT, now, None, self.encode(handled).decode(), h, h,
            completed_id, run, 3, "activation.completed", 1, event_id, event_id,
            AGENT, now, None, self.encode(completed).decode(), h, h,
            AGENT, event_id, activation_id, "completed", event_id,
        )  # fmt: skip
        self.recorder.records.append((event_id, time.time()))
        self.ack(stream, entry_id)


async def worker_main(spec: WorkerSpec) -> None:
    """One worker process: set up, say "ready", work until SIGTERM; SIGUSR1 dumps records."""
    from runtime.log.pool import create_pool, open_runtime_pool
    from runtime.log.store import EventLog
    from runtime.settings import Settings
    from runtime.streams.keys import connect_redis
    from runtime.worker.options import WorkerOptions
    from runtime.worker.worker import Worker

    recorder = Recorder(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, recorder.dump)
    redis = await connect_redis(spec.redis_url)
    runner: Any
    if spec.kind in ("runtime", "steps"):
        settings = Settings.from_env(db_schema=spec.schema, log_notify=spec.notify).with_urls(
            redis_url=spec.redis_url, database_url=spec.database_url
        )
        pool = await open_runtime_pool(settings)
        lg = EventLog(pool, schema=spec.schema)

        class TimedWorker(Worker):
            async def commit(self, agent: str, d: Any, *args: Any) -> bool:
                committed = await super().commit(agent, d, *args)
                if committed:
                    recorder.records.append((d.event_id, time.time()))
                return committed

        runner = TimedWorker(
            [Echo() if spec.kind == "runtime" else ThreeSteps()],
            redis=redis,
            log=lg,
            llm=None,
            options=WorkerOptions(concurrency=CONCURRENCY, batch=BATCH, partitions=PARTITIONS),
        )
    else:
        pool = await create_pool(spec.pool_url, max_size=POOL_SIZE, reset=_keep_session)
        runner = Ceiling(redis, pool, spec.raw_schema, recorder)
    await runner.setup()
    print(f"ready {os.getpid()}", flush=True)
    try:
        await runner.run(stop)
    finally:
        await pool.close()
        await redis.aclose()
    print("stopped", flush=True)


def run_worker(spec: WorkerSpec) -> None:
    quiet_logging()
    if spec.profile is None:
        asyncio.run(worker_main(spec))
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(worker_main(spec))
    finally:
        profiler.disable()
        profiler.dump_stats(f"{spec.profile}/{spec.kind}-{spec.index}-{os.getpid()}.prof")


# -- measuring -------------------------------------------------------------------------


def procs_cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds so far of each live process in ``pids``."""
    cpus = {pid: proc_cpu(pid) for pid in pids}
    return {pid: cpu for pid, cpu in cpus.items() if not math.isnan(cpu)}


async def redis_cpu(client: aioredis.Redis) -> float:
    cpu = await client.info("cpu")
    return sum(
        float(cpu.get(f"used_cpu_{k}", 0)) for k in ("sys", "user", "sys_children", "user_children")
    )


@dataclasses.dataclass
class CpuSnapshot:
    workers: dict[int, float]
    postgres: dict[int, float]
    redis: float
    me: float
    busy: float


@dataclasses.dataclass
class Cpu:
    """Cores busy during a window."""

    workers: float = math.nan
    postgres: float = math.nan
    redis: float = math.nan
    producer: float = math.nan
    other: float = math.nan


class Meter:
    """CPU use of the workers, PostgreSQL (if local), Redis, this process and the rest."""

    def __init__(self, admin: asyncpg.Connection, redis: aioredis.Redis) -> None:
        self.admin, self.redis = admin, redis

    async def snapshot(self, worker_pids: Sequence[int]) -> CpuSnapshot:
        pg_pids = [int(r[0]) for r in await self.admin.fetch("SELECT pid FROM pg_stat_activity")]
        return CpuSnapshot(
            procs_cpu(worker_pids),
            procs_cpu(pg_pids),
            await redis_cpu(self.redis),
            time.process_time(),
            machine_busy(),
        )

    @staticmethod
    def between(a: CpuSnapshot, b: CpuSnapshot, seconds: float) -> Cpu:
        def delta(x: dict[int, float], y: dict[int, float]) -> float:
            return sum(v - x.get(pid, 0.0) for pid, v in y.items())

        workers = delta(a.workers, b.workers)
        postgres = delta(a.postgres, b.postgres) if b.postgres else math.nan
        redis, me, busy = b.redis - a.redis, b.me - a.me, b.busy - a.busy
        known = workers + (0.0 if math.isnan(postgres) else postgres) + redis + me
        return Cpu(
            workers / seconds,
            postgres / seconds,
            redis / seconds,
            me / seconds,
            max(0.0, busy - known) / seconds,
        )


class WorkerProcs:
    """The worker processes of one block, from the parent's side."""

    def __init__(self, specs: list[WorkerSpec], log_dir: Path) -> None:
        self.specs = specs
        self.log_dir = log_dir
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        for spec in self.specs:
            log = _open_log(self.log_dir / f"{spec.kind}-{spec.index}.log")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, SCRIPT, "--_worker",
                json.dumps(dataclasses.asdict(spec)),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=REPO, env=env,
            )  # fmt: skip
            log.close()
            self.procs.append(proc)
        for proc, spec in zip(self.procs, self.specs, strict=True):
            line = await self._line(proc, spec, 60)
            if not line.startswith("ready"):
                raise RuntimeError(f"{spec.kind} worker {spec.index} said {line!r}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def _line(self, proc: asyncio.subprocess.Process, spec: WorkerSpec, wait: float) -> str:
        assert proc.stdout is not None
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), wait)
        except TimeoutError:
            raw = b""
        if not raw:
            tail = (self.log_dir / f"{spec.kind}-{spec.index}.log").read_text(errors="replace")
            raise RuntimeError(
                f"{spec.kind} worker {spec.index} (pid {proc.pid}) gave no answer; "
                f"its log:\n{tail[-3000:]}"
            )
        return raw.decode().strip()

    async def dump(self) -> list[tuple[str, float]]:
        """Every worker's (event id, commit time) since the previous dump."""
        out: list[tuple[str, float]] = []
        for proc in self.procs:
            proc.send_signal(signal.SIGUSR1)
        for proc, spec in zip(self.procs, self.specs, strict=True):
            line = await self._line(proc, spec, 30)
            if not line.startswith("dumped "):
                raise RuntimeError(f"{spec.kind} worker {spec.index} said {line!r}")
            out.extend(_take_dump(Path(line.split()[1])))
        return out

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            await reap(proc, 30)


def _open_log(path: Path) -> Any:
    return open(path, "ab")


def _take_dump(path: Path) -> list[tuple[str, float]]:
    records = [(str(e), float(t)) for e, t in msgspec.json.decode(path.read_bytes())]
    path.unlink()
    return records


@dataclasses.dataclass
class Phase:
    loop: Literal["latency", "throughput", "soak"]
    kind: Kind
    procs: int
    repeat: int
    #: Activations/s: committed in the window / its length.
    rate: float
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    samples: int = 0
    cpu: Cpu = dataclasses.field(default_factory=Cpu)
    problems: list[str] = dataclasses.field(default_factory=list)
    #: The soak's (seconds of load, worker RSS in MiB) samples.
    rss: list[tuple[float, float]] = dataclasses.field(default_factory=list)


class Bench:
    """Runs the blocks of one benchmark run against one Redis database and two schemas."""

    def __init__(
        self,
        args: argparse.Namespace,
        srv: Servers,
        redis: aioredis.Redis,
        meter: Meter,
        base_spec: dict[str, Any],
        work_dir: Path,
        err: Console,
    ) -> None:
        self.args, self.srv, self.redis, self.meter = args, srv, redis, meter
        self.base_spec, self.work_dir, self.err = base_spec, work_dir, err
        self.workload = Workload(secrets.token_hex(4))
        #: Best activations/s seen per (kind, processes): sizes the next backlog.
        self.estimates: dict[tuple[Kind, int], float] = {}

    async def reset_redis(self) -> None:
        """Empty the bench database; on a server we own, shrink the AOF back too."""
        await self.redis.flushdb()
        if not self.srv.redis_owned:
            return
        with contextlib.suppress(ResponseError):  # one already running
            await self.redis.bgrewriteaof()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = await self.redis.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            await asyncio.sleep(0.05)

    async def block(self, kind: Kind, procs: int, repeat: int) -> list[Phase]:
        """Start ``procs`` workers of ``kind``; a latency phase, then a throughput phase."""
        args = self.args
        await self.reset_redis()
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await self.meter.admin.execute("CHECKPOINT")
        latency_events = [
            self.workload.entry()
            for _ in range(math.ceil(args.rate * (args.warmup + args.duration)))
        ]
        # The backlog must outlast the preload, the warm-up and the window: sized on the
        # best rate seen (or a first guess), with room to spare.
        estimate = max(self.estimates.get((kind, procs), 0.0), FIRST_ESTIMATE[kind] * procs)
        backlog = [
            self.workload.entry()
            for _ in range(math.ceil(estimate * 1.6 * (args.warmup + args.duration + 2.0)))
        ]
        gc.collect()
        gc.freeze()
        specs = [WorkerSpec(kind=kind, index=i, **self.base_spec) for i in range(procs)]
        workers = WorkerProcs(specs, self.work_dir)
        try:
            await workers.start()
            latency = await self.latency_phase(workers, kind, procs, repeat, latency_events)
            throughput = await self.throughput_phase(workers, kind, procs, repeat, backlog)
        finally:
            await workers.stop()
            del latency_events, backlog
            gc.unfreeze()
            gc.collect()
        return [latency, throughput]

    async def latency_phase(
        self,
        workers: WorkerProcs,
        kind: Kind,
        procs: int,
        repeat: int,
        events: list[tuple[str, str, dict[str, Any]]],
    ) -> Phase:
        args = self.args
        rate = args.rate
        go = time.time() + 0.2
        start, end = go + args.warmup, go + args.warmup + args.duration
        sent: dict[str, float] = {}
        last_ids: dict[str, bytes] = {}
        late = 0.0
        cpu0: CpuSnapshot | None = None
        for i, (stream, event_id, fields) in enumerate(events):
            at = go + i / rate
            if cpu0 is None and at >= start:
                cpu0 = await self.meter.snapshot(workers.pids)
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.time()
            late = max(late, t - at)
            last_ids[stream] = await self.redis.xadd(stream, fields)
            if at >= start:
                sent[event_id] = t
        await asyncio.sleep(max(0.0, end - time.time()))
        cpu1 = await self.meter.snapshot(workers.pids)
        assert cpu0 is not None
        problems = []
        if not await self.drained(last_ids, DRAIN_SECONDS):
            problems.append(f"not all events committed {DRAIN_SECONDS:.0f}s after the last XADD")
        committed = dict(await workers.dump())
        latencies = sorted(committed[e] - t for e, t in sent.items() if e in committed)
        missing = len(sent) - len(latencies)
        if missing:
            problems.append(f"{missing} of {len(sent)} measured events not committed")
        if late > 0.1:
            problems.append(f"the producer fell {late * 1000:.0f} ms behind its schedule")
        return Phase(
            "latency", kind, procs, repeat,
            rate=len(latencies) / args.duration,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            max_ms=percentile(latencies, 100),
            samples=len(latencies),
            cpu=Meter.between(cpu0, cpu1, args.duration),
            problems=problems,
        )  # fmt: skip

    async def drained(self, last_ids: dict[str, bytes], seconds: float) -> bool:
        """Every stream delivered up to its last entry, and nothing pending (all acked)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            done = True
            for stream, last in last_ids.items():
                groups = await self.redis.xinfo_groups(stream)
                g = next((g for g in groups if g["name"] in (AGENT, AGENT.encode())), None)
                if g is None or g["last-delivered-id"] != last or int(g["pending"]):
                    done = False
                    break
            if done:
                return True
            await asyncio.sleep(0.02)
        return False

    async def backlog_left(self) -> int:
        """Entries not yet delivered to the group, over the ingress streams (an upper bound
        of 1 per stream when ids are compared)."""
        left = 0
        for p in range(PARTITIONS):
            stream = ingress_stream(p)
            info = await self.redis.xinfo_stream(stream)
            groups = await self.redis.xinfo_groups(stream)
            g = next((g for g in groups if g["name"] in (AGENT, AGENT.encode())), None)
            if g is None or g["last-delivered-id"] != info["last-generated-id"]:
                left += 1
        return left

    async def throughput_phase(
        self,
        workers: WorkerProcs,
        kind: Kind,
        procs: int,
        repeat: int,
        backlog: list[tuple[str, str, dict[str, Any]]],
    ) -> Phase:
        args = self.args
        chunk = 500
        for i in range(0, len(backlog), chunk):
            pipe = self.redis.pipeline(transaction=False)
            for stream, _, fields in backlog[i : i + chunk]:
                pipe.xadd(stream, fields)
            await pipe.execute()
        start = time.time() + args.warmup
        end = start + args.duration
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu0 = await self.meter.snapshot(workers.pids)
        await asyncio.sleep(max(0.0, end - time.time()))
        cpu1 = await self.meter.snapshot(workers.pids)
        left = await self.backlog_left()
        commits = sorted(t for _, t in await workers.dump())
        inside = [t for t in commits if start <= t < end]
        problems = []
        window = args.duration
        if not left:
            # The backlog ran out: count up to the last commit, size the next one larger.
            last = max(inside, default=start)
            window = max(last - start, 1e-3)
            problems.append(
                f"the backlog of {len(backlog)} ran out {end - last:.1f}s before the window's end"
            )
        rate = len(inside) / window
        key = (kind, procs)
        self.estimates[key] = max(self.estimates.get(key, 0.0), rate * (1.0 if left else 2.0))
        return Phase(
            "throughput", kind, procs, repeat, rate=rate, samples=len(inside),
            cpu=Meter.between(cpu0, cpu1, args.duration), problems=problems,
        )  # fmt: skip

    async def soak(self, first: float, last: float) -> Phase:
        """The steps kind in one fresh worker while the producer XADDs at ``--rate`` for
        ``last`` seconds: its RSS sampled along the way (at ``first`` and ``last`` among
        others), the latency of the events sent after ``first``."""
        await self.reset_redis()
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await self.meter.admin.execute("CHECKPOINT")
        workers = WorkerProcs([WorkerSpec(kind="steps", index=0, **self.base_spec)], self.work_dir)
        try:
            await workers.start()
            pid = workers.pids[0]
            rss: list[tuple[float, float]] = [(0.0, rss_mib(pid))]
            go = time.time() + 0.2
            sent: dict[str, float] = {}
            last_ids: dict[str, bytes] = {}
            late = [0.0]
            producer = asyncio.create_task(self._produce(go, first, last, sent, last_ids, late))
            cpu0 = await self.meter.snapshot(workers.pids)
            latencies: list[float] = []
            inside = [0]  # commits between the first and the last reading

            def match(commits: list[tuple[str, float]]) -> None:
                for event_id, t in commits:
                    if (t0 := sent.pop(event_id, None)) is not None:
                        latencies.append(t - t0)
                    if go + first <= t < go + last:
                        inside[0] += 1

            marks = sorted({*(k * SOAK_SAMPLE for k in range(1, int(last // SOAK_SAMPLE) + 1)),
                            first, last})  # fmt: skip
            try:
                for mark in marks:
                    await asyncio.sleep(max(0.0, go + mark - time.time()))
                    rss.append((mark, rss_mib(pid)))
                    match(await workers.dump())  # empties the worker's recorder
                await producer
            finally:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
            cpu1 = await self.meter.snapshot(workers.pids)
            behind = len(sent)  # sent after the first reading, not committed at the last
            problems = []
            if not await self.drained(last_ids, SOAK_DRAIN):
                problems.append(
                    f"{behind} events sent after {_span(first)} were not committed at "
                    f"{_span(last)} (the worker fell behind the rate), and some not "
                    f"{SOAK_DRAIN:.0f}s after the last XADD"
                )
            match(await workers.dump())
            if late[0] > 0.1:
                problems.append(f"the producer fell {late[0] * 1000:.0f} ms behind its schedule")
        finally:
            await workers.stop()
        latencies.sort()
        return Phase(
            "soak", "steps", 1, 0,
            rate=inside[0] / (last - first) if last > first else math.nan,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            max_ms=percentile(latencies, 100),
            samples=len(latencies),
            cpu=Meter.between(cpu0, cpu1, last),
            problems=problems,
            rss=rss,
        )  # fmt: skip

    async def _produce(
        self,
        go: float,
        first: float,
        last: float,
        sent: dict[str, float],
        last_ids: dict[str, bytes],
        late: list[float],
    ) -> None:
        """XADD one entry at a time at ``--rate`` from ``go`` for ``last`` seconds; the send
        time of those after ``first`` into ``sent``. Entries are made as they go (five
        minutes of them held at once would weigh on this process)."""
        rate = self.args.rate
        for i in itertools.count():
            at = go + i / rate
            if at >= go + last:
                return
            stream, event_id, fields = self.workload.entry()
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.time()
            late[0] = max(late[0], t - at)
            last_ids[stream] = await self.redis.xadd(stream, fields)
            if at >= go + first:
                sent[event_id] = t


# -- figures ---------------------------------------------------------------------------


def _procs(n: int) -> str:
    return f"{n} process{'es' if n > 1 else ''}"


def new_figures(
    processes: Sequence[int], rate: float, soak: tuple[float, float] | None = None
) -> dict[str, Figure]:
    f = Figure
    out: dict[str, Figure] = {}
    for n in processes:
        out[f"tp_ceiling_{n}"] = f(f"ceiling activations/s, {_procs(n)} (by hand)", "act/s")
        out[f"tp_runtime_{n}"] = f(
            f"runtime activations/s, {_procs(n)}", "act/s", f"tp_ceiling_{n}", TARGET_RATIO
        )
    for n in processes:
        at = f"at {rate:g}/s, {_procs(n)}"
        out[f"p50_ceiling_{n}"] = f(f"ceiling p50 XADD→commit {at}", "ms")
        out[f"p99_ceiling_{n}"] = f(f"ceiling p99 XADD→commit {at}", "ms")
        out[f"p50_runtime_{n}"] = f(f"runtime p50 XADD→commit {at}", "ms", f"p50_ceiling_{n}")
        out[f"p99_runtime_{n}"] = f(f"runtime p99 XADD→commit {at}", "ms", f"p99_ceiling_{n}")
        out[f"overhead_{n}"] = f(
            f"overhead p50 (runtime − ceiling) {at}", "ms", None, TARGET_OVERHEAD_MS
        )
    for n in processes:
        out[f"tp_steps_{n}"] = f(
            f"steps activations/s (3 tool steps each), {_procs(n)}", "act/s",
            f"tp_runtime_{n}", TARGET_STEPS_RATIO,
        )  # fmt: skip
    n = processes[0]
    at = f"at {rate:g}/s, {_procs(n)}"
    out[f"p50_steps_{n}"] = f(f"steps p50 XADD→commit {at}", "ms", f"p50_runtime_{n}")
    out[f"p99_steps_{n}"] = f(f"steps p99 XADD→commit {at}", "ms", f"p99_runtime_{n}")
    if soak is not None:
        first, last = soak
        load = f"of load at {rate:g}/s"
        out["rss_first"] = f(f"steps worker RSS after {_span(first)} {load}", "MiB")
        out["rss_last"] = f(f"steps worker RSS after {_span(last)} {load}", "MiB")
        out["rss_growth"] = f(
            f"steps worker RSS after {_span(last)} / after {_span(first)}", "×", None,
            TARGET_RSS_GROWTH,
        )  # fmt: skip
    return out


def _span(seconds: float) -> str:
    """``1 min``, ``5 min``, ``10 s``, ``1.5 min``: how long, as a figure's name says it."""
    if seconds >= 60 and seconds % 30 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:.0f} s" if seconds == round(seconds) else f"{seconds:.1f} s"


def soak_marks(minutes: float) -> tuple[float, float] | None:
    """Seconds of load at the soak's first and last RSS readings (None: no soak)."""
    if minutes <= 0:
        return None
    last = minutes * 60
    return min(SOAK_FIRST, last / 3), last


def record(figures: dict[str, Figure], phases: list[Phase], repeat: int) -> None:
    """Add one repeat's phases; the overhead is taken within the repeat."""
    mine = [p for p in phases if p.repeat == repeat]
    for p in mine:
        if p.loop == "throughput":
            figures[f"tp_{p.kind}_{p.procs}"].runs.append(p.rate)
        elif p.loop == "latency" and f"p50_{p.kind}_{p.procs}" in figures:
            figures[f"p50_{p.kind}_{p.procs}"].runs.append(p.p50_ms)
            figures[f"p99_{p.kind}_{p.procs}"].runs.append(p.p99_ms)
    for p in mine:
        if p.loop == "latency" and p.kind == "runtime":
            ceiling = next(
                (c for c in mine if c.loop == "latency" and c.kind == "ceiling"
                 and c.procs == p.procs), None,
            )  # fmt: skip
            if ceiling is not None:
                figures[f"overhead_{p.procs}"].runs.append(p.p50_ms - ceiling.p50_ms)


def record_soak(figures: dict[str, Figure], soak: Phase, marks: tuple[float, float]) -> None:
    """The soak's RSS at its first and last readings, and their ratio."""
    at = dict(soak.rss)
    first, last = at.get(marks[0], math.nan), at.get(marks[1], math.nan)
    figures["rss_first"].runs.append(first)
    figures["rss_last"].runs.append(last)
    figures["rss_growth"].runs.append(last / first)


# -- output ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    redis: str
    postgres: str
    notify: bool
    pool_role: str
    rate: float
    warmup: float
    duration: float
    repeat: int
    processes: list[int]
    body_bytes: int
    #: Seconds of load at the soak's first and last RSS readings (None: no soak).
    soak: tuple[float, float] | None = None
    code: str = ""
    seconds: float = 0.0


def setup_text(info: RunInfo) -> str:
    return (
        f"{info.redis}; {info.postgres}, NOTIFY {'on' if info.notify else 'off'}; "
        f"{PARTITIONS} ingress partitions, {info.body_bytes}-byte event bodies; "
        f"per process concurrency {CONCURRENCY}, batch {BATCH}, pool {POOL_SIZE} "
        f"(role {info.pool_role}); {info.code}; {info.warmup:g}s warm-up + {info.duration:g}s "
        "measured per "
        f"phase, median of {info.repeat} run(s)"
    )


def render(figures: dict[str, Figure], phases: list[Phase], info: RunInfo, out: Console) -> None:
    rows = figure_rows(figures)
    out.print(
        f"[bold]agentrt runtime benchmark[/]  {setup_text(info)} ({info.seconds:.0f}s in all)"
    )
    table = Table()
    for col in ("figure", "value", "unit", "ceiling", "ratio", "target", "", "runs"):
        table.add_column(col, justify="left" if col in ("figure", "unit", "") else "right")
    for row, f in zip(rows, figures.values(), strict=True):
        value, ceiling, ratio, target, mark = cells(row)
        style = "red" if "MISS" in mark else "green" if "pass" in mark else "default"
        digits = 0 if f.unit == "act/s" else 2
        runs = ", ".join(f"{v:,.{digits}f}" for v in f.runs) if len(f.runs) > 1 else ""
        table.add_row(
            row["name"], value, row["unit"], ceiling, ratio, target, f"[{style}]{mark}[/]", runs
        )
    out.print(table)
    phase_table = Table(title="phases (CPU: cores busy during the measured window)")
    for col in ("run", "phase", "kind", "procs", "act/s", "p50 ms", "p99 ms", "max ms",
                "workers", "wk µs/act", "postgres", "pg µs/act", "redis", "producer", "other",
                "errors"):  # fmt: skip
        phase_table.add_column(col, justify="left" if col in ("phase", "kind") else "right")
    for p in phases:
        c = p.cpu

        def per(cores: float, p: Phase = p) -> str:
            return "—" if math.isnan(cores) or not p.rate else f"{cores / p.rate * 1e6:,.0f}"

        def ms(v: float) -> str:
            return "" if math.isnan(v) else f"{v:.2f}"

        def cores(v: float) -> str:
            return "—" if math.isnan(v) else f"{v:.2f}"

        phase_table.add_row(
            str(p.repeat + 1), p.loop, p.kind, str(p.procs), f"{p.rate:,.0f}",
            ms(p.p50_ms), ms(p.p99_ms), ms(p.max_ms),
            cores(c.workers), per(c.workers), cores(c.postgres), per(c.postgres),
            cores(c.redis), cores(c.producer), cores(c.other),
            "[red]yes[/]" if p.problems else "0",
        )  # fmt: skip
    out.print(phase_table)
    out.print(f"[dim]{definitions(info)}[/]")
    if cost := cpu_cost(phases):
        out.print(f"[dim]{cost}[/]")
    for n in info.processes:
        for top, base in (("runtime", "ceiling"), ("steps", "runtime")):
            ratios = [
                r.rate / c.rate
                for c in phases
                for r in phases
                if c.loop == r.loop == "throughput" and c.kind == base and r.kind == top
                and c.procs == r.procs == n and c.repeat == r.repeat and c.rate
            ]  # fmt: skip
            if len(ratios) > 1:
                out.print(
                    f"[dim]{top}/{base} per run, {_procs(n)}: "
                    f"{', '.join(f'{r:.0%}' for r in ratios)}[/]"
                )
    for p in phases:
        if p.loop == "soak":
            out.print(f"[dim]{soak_text(p)}[/]")
    other = statistics.median(p.cpu.other for p in phases) if phases else 0.0
    if other > NOISY_CORES:
        out.print(
            f"[yellow]note:[/] other work used a median {other:.2f} cores during the measured "
            "windows (other processes, the kernel): on a small machine these figures are noisy"
        )
    flagged = [p for p in phases if p.problems]
    if flagged:
        out.print("[bold red]errors flagged (these figures are suspect):[/]")
        for p in flagged:
            out.print(
                f"  [red]✗[/] run {p.repeat + 1} {p.loop} {p.kind} {_procs(p.procs)}: "
                f"{'; '.join(p.problems)}"
            )
    missed = [row for row in rows if row["target"] is not None and not met(row)]
    for row in missed:
        value, ceiling, ratio, target, _ = cells(row)
        against = f"{ratio} of {ceiling}" if row["unit"] == "act/s" else f"{value} {row['unit']}"
        out.print(f"[bold red]target missed:[/] {row['name']}: {against}, target {target}")
    if not missed:
        out.print("[bold green]all targets met[/]")


def definitions(info: RunInfo) -> str:
    text = (
        f"Latency runs from just before a producer's XADD (one entry at a time, {info.rate:g} "
        "events/s, open loop) to just after the worker's commit of that activation returned, "
        "before its XACK; overhead = runtime p50 − ceiling p50 within each run. "
        "Activations/s count the commits in the measured window while the workers drain a "
        "pipelined backlog. The ceiling is the same work by hand in the same number of "
        "processes: XREADGROUP (same streams, batch, concurrency and pool size), then per "
        "entry one statement (one transaction, one round trip) inserting the 3 event rows "
        "into a plain copy of `events` (no triggers, no hash chain) and the inbox row into "
        "a copy of `inbox`, then XACK (both batch their XACKs into one pipelined round "
        "trip per wake-up). "
        "The steps kind is the same worker with the same options running an agent whose "
        "handler makes three durable tool steps (`await ctx.tool(...)` of three trivial "
        "`@tool` functions returning a small dict; each through the worker's circuit "
        "breaker and recorded in the log before the handler goes on), then emits one event; "
        "its ceiling column is the no-step runtime's figure from the same run, and its "
        f"target, {TARGET_STEPS_RATIO:.0%} of it, says three durable steps cost at most a "
        "quarter of an activation."
    )
    if info.soak is not None:
        first, last = info.soak
        text += (
            f" Soak (once per run, after the other phases): the steps kind in one fresh "
            f"worker process while the producer XADDs at {info.rate:g} events/s for "
            f"{_span(last)}; the worker's RSS (VmRSS of /proc/<pid>/status) after "
            f"{_span(first)} and after {_span(last)} of load, and their ratio (target "
            f"≤{TARGET_RSS_GROWTH:g}×: the memory holds steady)."
        )
    return text


def soak_text(p: Phase) -> str:
    """The soak in one line: some ten of its RSS samples, what it committed and how fast."""
    every = max(SOAK_SAMPLE, round(p.rss[-1][0] / 10 / SOAK_SAMPLE) * SOAK_SAMPLE)
    shown = [(t, mib) for t, mib in p.rss if t % every == 0 or (t, mib) == p.rss[-1]]
    samples = ", ".join(f"{_span(t)} {mib:.1f}" for t, mib in shown)
    return (
        f"soak (steps, 1 process, {p.rate:,.0f} act/s between the first and last reading, "
        f"p50 {p.p50_ms:.2f} ms, p99 {p.p99_ms:.2f} ms, max {p.max_ms:.0f} ms; worker "
        f"{p.cpu.workers:.2f} cores) worker RSS MiB by seconds of load: {samples}"
    )


def cpu_cost(phases: list[Phase]) -> str:
    """CPU per activation in the throughput phases (medians) of each kind."""
    parts = []
    for kind in KINDS:
        tp = [p for p in phases if p.loop == "throughput" and p.kind == kind and p.rate]
        workers = [p.cpu.workers / p.rate * 1e6 for p in tp if not math.isnan(p.cpu.workers)]
        postgres = [p.cpu.postgres / p.rate * 1e6 for p in tp if not math.isnan(p.cpu.postgres)]
        if not workers:
            return ""
        pg = f" + PostgreSQL {statistics.median(postgres):,.0f} µs" if postgres else ""
        parts.append(f"{kind} workers {statistics.median(workers):,.0f} µs{pg}")
    return f"CPU per activation while draining a backlog (median): {'; '.join(parts)}."


def code_version() -> str:
    """The commit measured, and whether runtime/ differed from it (others edit it too)."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "code version unknown"
    dirty = git("status", "--porcelain", "--", "runtime")
    return f"runtime at {head}" + (" with uncommitted changes" if dirty else "")


def code_digest() -> str:
    """A digest of the runtime modules a worker loads, to notice an edit during the run."""
    import hashlib

    import runtime.worker.worker  # noqa: F401 (loads what a worker process loads)

    digest = hashlib.sha256()
    files = {
        str(m.__file__)
        for name, m in list(sys.modules.items())
        if (name == "runtime" or name.startswith("runtime.")) and getattr(m, "__file__", None)
    }
    for path in sorted(files):
        with contextlib.suppress(OSError):
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def readme_block(figures: dict[str, Figure], phases: list[Phase], info: RunInfo) -> str:
    errors = sum(bool(p.problems) for p in phases)
    lines = [
        MARK_START,
        f"Measured with `scripts/bench_runtime.py` on {dt.date.today().isoformat()}: "
        f"{machine()}, shared by the workers, the producer and both servers; "
        f"{setup_text(info)}"
        + (f"; {errors} phase(s) flagged (see the script's output)." if errors else "."),
        "",
        *readme_table(figures),
        "",
        definitions(info),
    ]
    if cost := cpu_cost(phases):
        lines[-1] += " " + cost
    for p in phases:
        if p.loop == "soak":
            text = soak_text(p)
            lines[-1] += f" {text[:1].upper()}{text[1:]}."
    other = statistics.median(p.cpu.other for p in phases) if phases else 0.0
    if other > NOISY_CORES:
        lines[-1] += (
            f" Other work used a median {other:.2f} cores during the measured windows "
            f"(worst {max(p.cpu.other for p in phases):.2f}): these figures are noisy."
        )
    lines.append(MARK_END)
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------


async def prepare_schemas(
    admin: asyncpg.Connection, settings: Any, schema: str, raw_schema: str
) -> tuple[str, str]:
    """Migrate the log's schema, copy its tables for the ceiling; (pool URL, its role)."""
    from runtime.log.migrations import migrate
    from runtime.log.pool import open_runtime_pool, runtime_url

    await migrate(settings)
    await admin.execute(f'CREATE SCHEMA "{raw_schema}"')
    for table in ("events", "inbox"):
        await admin.execute(
            f'CREATE TABLE "{raw_schema}".{table} (LIKE "{schema}".{table} INCLUDING ALL)'
        )
    # The ceiling connects as whoever the runtime's pool connects as.
    pool = await open_runtime_pool(settings, min_size=1, max_size=1)
    try:
        role = str(await pool.fetchval("SELECT current_user"))
    finally:
        await pool.close()
    if role == settings.app_role:
        await admin.execute(f'GRANT USAGE ON SCHEMA "{raw_schema}" TO "{role}"')
        await admin.execute(
            f'GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA "{raw_schema}" TO "{role}"'
        )
        return runtime_url(settings), role
    return settings.require_database_url(), role


async def run(
    args: argparse.Namespace, srv: Servers, err: Console
) -> tuple[dict[str, Figure], list[Phase], RunInfo]:
    from runtime.log.pool import connect, redact
    from runtime.settings import Settings

    tag = secrets.token_hex(4)
    schema, raw_schema = f"bench_{tag}", f"bench_{tag}_raw"
    settings = Settings.from_env(db_schema=schema).with_urls(
        redis_url=srv.redis_url, database_url=srv.database_url
    )
    redis = aioredis.Redis.from_url(srv.redis_url, socket_timeout=60)
    await claim_redis_db(
        redis, args.redis_db, lambda key: key.startswith(b"agentrt:"), "not an agentrt key"
    )
    admin = await connect(settings.require_database_url())
    marks = soak_marks(args.soak_minutes)
    figures = new_figures(args.processes, args.rate, marks)
    phases: list[Phase] = []
    try:
        postgres, redis_text = await describe_servers(srv, admin, redis, err)
        err.print(f"[dim]migrating scratch schema {schema} ({redact(srv.database_url)})[/]")
        pool_url, role = await prepare_schemas(admin, settings, schema, raw_schema)
        sample = Workload("sample")
        info = RunInfo(
            redis=redis_text,
            postgres=postgres,
            notify=settings.log_notify,
            pool_role=role,
            rate=args.rate,
            warmup=args.warmup,
            duration=args.duration,
            repeat=args.repeat,
            processes=list(args.processes),
            body_bytes=round(statistics.fmean(len(sample.entry()[2]["body"]) for _ in range(200))),
            soak=marks,
        )
        info.code, digest = code_version(), code_digest()
        with tempfile.TemporaryDirectory(prefix="bench_runtime_") as tmp:
            base_spec = {
                "redis_url": srv.redis_url,
                "database_url": srv.database_url,
                "pool_url": pool_url,
                "schema": schema,
                "raw_schema": raw_schema,
                "notify": settings.log_notify,
                "dump_dir": tmp,
                "profile": str(args.profile) if args.profile else None,
            }
            bench = Bench(args, srv, redis, Meter(admin, redis), base_spec, Path(tmp), err)
            started = time.perf_counter()
            for r in range(args.repeat):
                err.print(f"[bold]run {r + 1}/{args.repeat}[/]")
                for i, n in enumerate(args.processes):
                    order = KINDS if (r + i) % 2 == 0 else KINDS[::-1]
                    for kind in order:
                        err.print(f"  {kind}, {_procs(n)} ...", end="")
                        got = await bench.block(kind, n, r)
                        phases.extend(got)
                        lat, tp = got
                        err.print(
                            f" {tp.rate:,.0f} act/s; at {args.rate:g}/s p50 {lat.p50_ms:.2f} ms, "
                            f"p99 {lat.p99_ms:.2f} ms (workers {tp.cpu.workers:.2f} cores, "
                            f"postgres {tp.cpu.postgres:.2f}, other {tp.cpu.other:.2f})"
                            + (
                                f" [red]{'; '.join(lat.problems + tp.problems)}[/]"
                                if lat.problems or tp.problems
                                else ""
                            )
                        )
                record(figures, phases, r)
            if marks is not None:
                first, last = marks
                err.print(f"  soak: steps, 1 process, {_span(last)} at {args.rate:g}/s ...", end="")
                soak = await bench.soak(first, last)
                phases.append(soak)
                record_soak(figures, soak, marks)
                err.print(
                    f" RSS {figures['rss_first'].runs[-1]:.1f} MiB after {_span(first)}, "
                    f"{figures['rss_last'].runs[-1]:.1f} MiB after {_span(last)}; "
                    f"p99 {soak.p99_ms:.2f} ms"
                    + (f" [red]{'; '.join(soak.problems)}[/]" if soak.problems else "")
                )
            info.seconds = time.perf_counter() - started
            if code_digest() != digest:
                info.code += " (its worker code changed during the run: figures mix versions)"
                err.print(f"[bold yellow]warning:[/] the code changed during the run: {info.code}")
        return figures, phases, info
    finally:
        with contextlib.suppress(Exception):
            await redis.flushdb()
        await redis.aclose()
        await drop_schemas(admin, (raw_schema, settings.read_schema, schema), err)
        await admin.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark agentrt workers against the same work by hand, same servers."
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run (under a minute)")
    add("--json", action="store_true", help='last stdout line: {"figures": [...]}')
    add("--write-readme", action="store_true", help="refresh the bench_runtime block of README.md")
    add("--readme", type=Path, default=README, help="the file --write-readme writes (README.md)")
    add("--repeat", type=int, help="runs of every phase, medians reported (default 3, quick 1)")
    add("--rate", type=float, default=500.0, help="events/s of the latency phases (500)")
    add("--duration", type=float, help="measured seconds per phase (default 6, quick 2.5)")
    add("--warmup", type=float, help="warm-up seconds per phase (default 2, quick 1)")
    add("--processes", help="worker process counts to measure (default 1,2; quick 1)")
    add(
        "--soak-minutes",
        type=float,
        help="minutes of load at --rate on one steps worker, RSS read after 1 minute (or a "
        "third of a shorter soak) and at the end; 0: no soak (default 5, quick 0.25)",
    )
    add_server_options(parser, redis_db=13)
    add("--profile", type=Path, help="cProfile every worker process into this directory")
    add("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return args
    args.duration = args.duration or (2.5 if args.quick else 6.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.soak_minutes is None:
        args.soak_minutes = 0.25 if args.quick else 5.0
    if args.processes is None:
        # Under a minute: the 2-process blocks are left to the full run.
        args.processes = "1" if args.quick else "1,2"
    try:
        args.processes = sorted({int(n) for n in args.processes.split(",")})
    except ValueError:
        parser.error("--processes takes counts separated by commas, e.g. 1,2")
    if min(args.repeat, *args.processes) < 1 or args.warmup < 0 or args.duration <= 0:
        parser.error("--repeat and --processes must be >= 1, --warmup >= 0, --duration > 0")
    if args.soak_minutes < 0:
        parser.error("--soak-minutes must be >= 0")
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        run_worker(WorkerSpec(**json.loads(args._worker)))
        return 0
    err, out = main_consoles(args.json)
    got = run_on_servers(args, err, lambda srv: run(args, srv, err))
    if got is None:
        return 130
    figures, phases, info = got
    render(figures, phases, info, out)
    if args.write_readme:
        write_readme(args.readme, "bench_runtime", readme_block(figures, phases, info), err)
    if args.json:
        print_json_line(figure_rows(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
