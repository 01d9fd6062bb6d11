"""Benchmark the webhook ingress against a bare XADD endpoint in the same server.

One run starts the ingress exactly as ``agentrt serve`` does (uvicorn with
uvloop and httptools, ``--workers`` processes, default 1) in a subprocess on a
free 127.0.0.1 port, with ``scripts/bench_ingest_app.py`` adding one route to
the real app, and measures two kinds of request side by side:

ceiling:
  ``POST /bench/xadd``: the same FastAPI app, server stack, Redis and Redis
  client; the handler reads the body and does one ``XADD`` of it.

ingest:
  ``POST /webhooks/bench``: a ``generic`` source with ``auth = "standard"``
  and ``partition_key = "/customer/id"``; the full handler runs (signature and
  timestamp check, JSON decode, partition key, the dedupe-and-XADD script,
  metrics).

Both get the same kind of request: a unique 1 KiB JSON body, signed with a
unique ``webhook-id`` (dedupe never short-circuits), built before the clock
starts. The load generator is a separate process: ``--connections``
keep-alive HTTP/1.1 connections (default 64) on uvloop, a warm-up, then
``--duration`` seconds measured. Two loops, each phase alternating ceiling
and ingest:

closed loop (throughput):
  each connection sends its next request as soon as the previous answer
  arrives. This gives requests/s at saturation, and the ingest/ceiling ratio.
  Its latencies are reported too, but they measure the queue the benchmark
  builds itself: with N connections always busy, Little's law makes the mean
  latency N / throughput, and p99 cannot be below the mean.

open loop (latency):
  the same connections send on a fixed schedule, ``--latency-rate`` requests/s
  in all (default: half the closed-loop ceiling, the same rate for both
  kinds); a request waits for a free connection if all are busy, and its
  latency runs from its *scheduled* send time, so a stall is charged to every
  request it delayed (no coordinated omission). The p99 target applies here.

Every response must be a 202 (anything else, and transport errors, flag the
run); after each phase the stream(s) must hold exactly one entry per 202.

Redis: ``REDIS_URL`` if set, otherwise the embedded server (Valkey) in
``--state-dir`` (default ``.agentrt/bench``) with its durable default (AOF,
``appendfsync always``); the output names the server and version it reports.
The benchmark works in its own database (``--redis-db``, default 14), flushed
before each phase and at the end; it refuses a database holding keys that are
not ``agentrt:*``.

Usage::

    .venv/bin/python scripts/bench_ingest.py            # full run, about three minutes
    .venv/bin/python scripts/bench_ingest.py --quick    # under a minute
    .venv/bin/python scripts/bench_ingest.py --json     # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/bench_ingest.py --write-readme

The exit code is 0 whatever the figures: this is a measurement, not a test.
Missed targets and flagged errors are listed at the end of the human output.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import gc
import http.client
import math
import multiprocessing
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import msgspec
import redis
from benchlib import (
    CLK_TCK,
    Figure,
    cells,
    figure_rows,
    machine,
    machine_busy,
    main_consoles,
    met,
    percentile,
    print_json_line,
    readme_table,
    server_version,
    with_db,
    write_readme,
)
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
APP_SCRIPT = Path(__file__).resolve().parent / "bench_ingest_app.py"
MARK_START = "<!-- bench_ingest:start -->"
MARK_END = "<!-- bench_ingest:end -->"
#: Ingest requests/s as a share of the ceiling's (closed loop), at least.
TARGET_RATIO = 0.6
#: Ingest p99 latency in milliseconds (open loop), below.
TARGET_P99_MS = 20.0
#: The open-loop rate as a share of the closed-loop ceiling, unless --latency-rate.
LATENCY_SHARE = 0.5
SOURCE = "bench"
PARTITIONS = 8
BODY_BYTES = 1024
CEILING_PATH = "/bench/xadd"
CEILING_STREAM = "agentrt:bench:{p0}"
INGEST_PATH = f"/webhooks/{SOURCE}"
PATHS = {"ceiling": CEILING_PATH, "ingest": INGEST_PATH}
#: Requests/s the load generator builds for before any phase has been measured.
FIRST_ESTIMATE = 6000.0
#: Cores of other work (median over the measured windows) that make a run noisy.
NOISY_CORES = 0.15
#: Seconds an open-loop phase waits for its last answers after its schedule ends.
DRAIN_SECONDS = 30.0

Kind = Literal["ceiling", "ingest"]
Loop = Literal["closed", "open"]
_WORDS = ("invoice", "shipment", "refund", "priority", "escalate", "review", "contract", "renewal")


def little_note(connections: int, rps: float | None) -> str:
    """Why closed-loop latency says little about the server (one or two sentences)."""
    example = f" ({connections / rps * 1000:.1f} ms at {rps:,.0f} req/s)" if rps else ""
    return (
        f"Closed-loop latency is set by Little's law: the {connections} connections always have "
        f"a request outstanding, so mean latency = {connections} / throughput{example} and p99 "
        "lies above that mean; it measures the queue the load generator builds at saturation. "
        "The p99 target is judged in the open loop instead: a fixed request rate, latency "
        "counted from each request's scheduled send time."
    )


# -- requests ---------------------------------------------------------------------------


class Payloads:
    """Unique signed requests with ~1 KiB JSON bodies."""

    def __init__(self, key: bytes, port: int, path: str, tag: str) -> None:
        from webhooks.auth import sign

        self._sign, self._key, self._path, self._tag = sign, key, path, tag
        self._host = f"127.0.0.1:{port}"
        self._rng = random.Random(tag)
        self._filler = " ".join(self._rng.choice(_WORDS) for _ in range(400))
        self._n = 0

    def request(self) -> bytes:
        rng = self._rng
        self._n += 1
        uniq = f"{self._tag}_{self._n}"
        now = int(time.time())
        customer = rng.randrange(10_000)
        payload: dict[str, Any] = {
            "id": f"evt_{uniq}",
            "type": rng.choice(("invoice.paid", "order.shipped", "ticket.opened")),
            "created": now,
            "customer": {"id": f"cus_{customer:05d}", "email": f"c{customer}@example.com"},
            "data": {
                "currency": "eur",
                "amount_due": rng.randint(1000, 999_999),
                "lines": [
                    {"sku": f"SKU-{rng.randrange(100_000):05d}", "quantity": rng.randint(1, 5)}
                    for _ in range(3)
                ],
            },
            "note": "",
        }
        short = BODY_BYTES - len(msgspec.json.encode(payload))
        start = rng.randrange(len(self._filler) - max(short, 0))
        payload["note"] = self._filler[start : start + max(short, 0)]
        body = msgspec.json.encode(payload)
        msg_id = f"msg_{uniq}"
        head = (
            f"POST {self._path} HTTP/1.1\r\nhost: {self._host}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"webhook-id: {msg_id}\r\nwebhook-timestamp: {now}\r\n"
            f"webhook-signature: {self._sign(self._key, msg_id, now, body)}\r\n\r\n"
        )
        return head.encode() + body


# -- the load generator (a child process) -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    index: int
    kind: Kind
    #: Requests/s on a fixed schedule (open loop), or None (closed loop).
    rate: float | None
    prebuilt: int
    connections: int
    warmup: float
    duration: float


@dataclasses.dataclass
class LoaderResult:
    #: Status code -> count, for the measured requests.
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    #: Latencies in seconds of the measured requests (array('d') bytes).
    latencies: bytes = b""
    #: All 202s, warm-up included (for the stream check).
    accepted: int = 0
    #: 202s that said ``"duplicate":true`` (dedupe short-circuited).
    duplicates: int = 0
    transport_errors: int = 0
    first_error: str = ""
    #: Measured requests still unanswered when the phase gave up.
    unanswered: int = 0
    #: Requests signed during the run because the prebuilt pool ran out.
    built_inline: int = 0
    cpu_seconds: float = 0.0


class Load:
    """One phase of load from this process, closed or open loop."""

    def __init__(self, port: int, spec: PhaseSpec, pool: list[bytes], payloads: Payloads) -> None:
        self.port, self.spec, self.pool, self.payloads = port, spec, pool, payloads
        self.next = 0
        self.pending = 0
        self.result = LoaderResult()
        self.latencies = array.array("d")
        self.statuses: collections.Counter[int] = collections.Counter()

    def take(self, i: int) -> bytes:
        if i < len(self.pool):
            return self.pool[i]
        self.result.built_inline += 1
        return self.payloads.request()

    def error(self, exc: BaseException) -> None:
        self.result.transport_errors += 1
        self.result.first_error = self.result.first_error or f"{type(exc).__name__}: {exc}"

    async def connection(self, delay: float, go: float, start: float, end: float) -> None:
        now, rate, result = time.monotonic, self.spec.rate, self.result
        await asyncio.sleep(delay)
        while now() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as exc:
                self.error(exc)
                await asyncio.sleep(0.05)
                continue
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    i, self.next = self.next, self.next + 1
                    if rate is None:  # closed loop: right away
                        sent = now()
                        if sent >= end:
                            return
                    else:  # open loop: at its slot, late if no connection was free
                        sent = go + i / rate
                        if sent >= end:
                            return
                        if sent > now():
                            await asyncio.sleep(sent - now())
                    measured = rate is not None and sent >= start
                    self.pending += measured
                    writer.write(self.take(i))
                    head = (await reader.readuntil(b"\r\n\r\n")).lower()
                    at = head.index(b"content-length:") + 15
                    body = await reader.readexactly(int(head[at : head.index(b"\r\n", at)]))
                    done = now()
                    self.pending -= measured
                    status = int(head[9:12])
                    if status == 202:
                        result.accepted += 1
                        result.duplicates += b'"duplicate":true' in body
                    if measured or (rate is None and start <= done < end):
                        self.latencies.append(done - sent)
                        self.statuses[status] += 1
                    if b"connection: close" in head:
                        break
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                self.error(exc)
            finally:
                writer.close()

    async def run(self, go: float) -> LoaderResult:
        spec = self.spec
        start = go + spec.warmup
        end = start + spec.duration
        await asyncio.sleep(max(0.0, go - time.monotonic()))

        async def cpu_window() -> None:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            cpu0 = time.process_time()
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            self.result.cpu_seconds = time.process_time() - cpu0

        # Connections open spread over the start of the warm-up, not in one burst
        # (with several uvicorn workers, one would otherwise accept them all).
        spread = min(0.5, spec.warmup / 2) / spec.connections
        tasks = [self.connection(i * spread, go, start, end) for i in range(spec.connections)]
        try:
            await asyncio.wait_for(
                asyncio.gather(cpu_window(), *tasks), end + DRAIN_SECONDS - time.monotonic()
            )
        except TimeoutError as exc:
            self.error(exc)
            self.result.unanswered = self.pending
        self.result.statuses = dict(self.statuses)
        self.result.latencies = self.latencies.tobytes()
        return self.result


def loader_main(conn: Connection, key: bytes, port: int, tag: str) -> None:
    """The load-generator process: per phase, build requests, wait for go, load."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    with contextlib.suppress(EOFError):
        while (spec := conn.recv()) is not None:
            payloads = Payloads(key, port, PATHS[spec.kind], f"{tag}_{spec.index}")
            pool = [payloads.request() for _ in range(spec.prebuilt)]
            gc.collect()
            gc.freeze()
            conn.send("ready")
            go = conn.recv()
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(Load(port, spec, pool, payloads).run(go))
            del pool
            gc.unfreeze()
            gc.collect()
            conn.send(result)


class Loader:
    """The load-generator process and its pipe, from the parent's side."""

    def __init__(self, key: bytes, port: int, tag: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=loader_main, args=(child, key, port, tag), name="bench-loader", daemon=True
        )
        self.proc.start()
        child.close()

    def recv(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.pipe.poll(0.2):
            if not self.proc.is_alive():
                raise RuntimeError(f"the load generator died (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the load generator did not answer in {timeout:.0f}s")
        return self.pipe.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(None)
        self.proc.join(timeout=3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=3)
        self.pipe.close()


# -- Redis ------------------------------------------------------------------------------


@dataclasses.dataclass
class RedisTarget:
    url: str
    mode: str
    #: The server's name and version as it reports them, e.g. "Valkey 9.0.0".
    version: str
    durability: str
    client: redis.Redis
    #: True when the benchmark owns the whole server (embedded): it may rewrite the AOF.
    owned: bool


def durability(client: redis.Redis) -> str:
    try:
        conf = client.config_get("append*")
    except redis.RedisError:
        return "durability unknown (CONFIG GET refused)"
    if conf.get("appendonly") != "yes":
        return "AOF off (not durable)"
    return f"AOF, appendfsync {conf.get('appendfsync', '?')}"


@contextlib.contextmanager
def redis_target(args: argparse.Namespace, err: Console) -> Iterator[RedisTarget]:
    """REDIS_URL (its database ``--redis-db``) if set, else the embedded durable Redis."""
    from runtime.ops.embedded import EmbeddedServices

    url, mode, stop = os.environ.get("REDIS_URL"), "REDIS_URL", None
    owned = not url
    if not url:
        services = EmbeddedServices(args.state_dir)
        was_running = services.redis.state().running
        url = services.up(redis=True, postgres=False)["REDIS_URL"]
        mode = f"embedded ({args.state_dir})"
        stop = None if was_running else services.redis.stop
        err.print(f"[dim]embedded Redis {'already running' if was_running else 'started'}[/]")
    client = redis.Redis.from_url(with_db(url, args.redis_db), socket_timeout=30)
    target: RedisTarget | None = None
    try:
        deadline = time.monotonic() + 120
        while int(client.info("persistence").get("loading", 0)):  # a fresh start loads its AOF
            if time.monotonic() > deadline:
                raise RuntimeError("Redis was still loading its data after 120s")
            time.sleep(0.1)
        for key in client.scan_iter(count=100):
            if not key.startswith(b"agentrt:"):
                raise SystemExit(
                    f"Redis database {args.redis_db} holds {key!r}, not an agentrt key: refusing "
                    "to flush it; pick an empty database with --redis-db"
                )
        version = server_version(client.info("server"))
        target = RedisTarget(
            with_db(url, args.redis_db), mode, version, durability(client), client, owned
        )
        yield target
    finally:
        if target is not None:
            with contextlib.suppress(redis.RedisError):
                reset_redis(target)
        client.close()
        if stop is not None:
            stop()


def reset_redis(target: RedisTarget) -> None:
    """Empty the bench database; on a server we own, also shrink the AOF back to nothing.

    Every phase then starts from the same state: empty streams, and an AOF
    whose automatic rewrite falls at the same point of each phase.
    """
    target.client.flushdb()
    if not target.owned:
        return
    with contextlib.suppress(redis.ResponseError):  # one already running
        target.client.bgrewriteaof()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = target.client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.05)


def redis_cpu(client: redis.Redis) -> float:
    """Redis's CPU seconds so far, its AOF-rewrite children included."""
    cpu = client.info("cpu")
    return sum(
        float(cpu.get(f"used_cpu_{k}", 0)) for k in ("sys", "user", "sys_children", "user_children")
    )


def stream_entries(client: redis.Redis, kind: Kind) -> int:
    if kind == "ceiling":
        return int(client.xlen(CEILING_STREAM))
    return sum(int(client.xlen(f"agentrt:in:{{p{p}}}")) for p in range(PARTITIONS))


# -- the server -------------------------------------------------------------------------


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the live processes of process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[2]) == pgid:  # pgrp (field 5); utime 14, stime 15
                    total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@contextlib.contextmanager
def ingress_server(
    redis_url: str, workers: int, secret: str, err: Console
) -> Iterator[tuple[int, int]]:
    """The ingress (plus the ceiling route) in a uvicorn subprocess; yields (pid, port)."""
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        sources, log = Path(tmp) / "sources.toml", Path(tmp) / "server.log"
        sources.write_text(
            f"[ingress]\npartitions = {PARTITIONS}\nmax_backlog = 10000000\n\n"
            f'[sources.{SOURCE}]\nformat = "generic"\nauth = "standard"\n'
            f'secrets = ["{secret}"]\npartition_key = "/customer/id"\n'
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update(
            REDIS_URL=redis_url,
            AGENTRT_WEBHOOKS_CONFIG=str(sources),
            AGENTRT_LOG_LEVEL="warning",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        )
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(APP_SCRIPT), "--port", str(port), "--workers", str(workers)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: workers stop with it
            )
        try:
            deadline = time.monotonic() + 60
            while not healthy(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the ingress server did not come up:\n{tail}")
                time.sleep(0.1)
            err.print(f"[dim]ingress server pid {proc.pid} on 127.0.0.1:{port}[/]")
            yield proc.pid, port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                err.print("[yellow]warning:[/] the ingress server did not stop; killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # any worker left in the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def probe(port: int, key: bytes, kind: Kind) -> None:
    """One request, the same bytes the loader sends: does the route answer 202?"""
    request = Payloads(key, port, PATHS[kind], f"probe_{secrets.token_hex(4)}").request()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 202"):
        raise RuntimeError(f"probe POST {PATHS[kind]} answered: {answer[:500]!r}")


# -- measurements -----------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    loop: Loop
    kind: Kind
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: Cores busy during the window: the server, Redis, the load generator, all else.
    server_cpu: float
    redis_cpu: float
    loader_cpu: float
    other_cpu: float
    built_inline: int
    problems: list[str]


def run_phase(spec: PhaseSpec, loader: Loader, server_pid: int, target: RedisTarget) -> Phase:
    reset_redis(target)
    loader.pipe.send(spec)
    loader.recv(300)  # "ready": the requests are built
    go = time.monotonic() + 0.2
    loader.pipe.send(go)
    start, end = go + spec.warmup, go + spec.warmup + spec.duration
    time.sleep(max(0.0, start - time.monotonic()))
    cpu0 = (group_cpu(server_pid), redis_cpu(target.client), machine_busy())
    time.sleep(max(0.0, end - time.monotonic()))
    cpu1 = (group_cpu(server_pid), redis_cpu(target.client), machine_busy())
    r: LoaderResult = loader.recv(DRAIN_SECONDS + 60)
    server, redis_, busy = (b - a for a, b in zip(cpu0, cpu1, strict=True))

    latencies = array.array("d")
    latencies.frombytes(r.latencies)
    ordered = sorted(latencies)
    problems = [f"HTTP {s}: {n}" for s, n in sorted(r.statuses.items()) if s != 202]
    if r.transport_errors:
        problems.append(f"transport errors: {r.transport_errors} ({r.first_error})")
    if r.unanswered:
        problems.append(f"{r.unanswered} measured request(s) unanswered after the drain")
    if r.duplicates:
        problems.append(f'{r.duplicates} answer(s) said "duplicate": true')
    entries = stream_entries(target.client, spec.kind)
    if entries != r.accepted:
        problems.append(f"{entries} stream entries for {r.accepted} accepted requests")
    return Phase(
        loop="closed" if spec.rate is None else "open",
        kind=spec.kind,
        rps=len(ordered) / spec.duration,
        p50_ms=percentile(ordered, 50),
        p99_ms=percentile(ordered, 99),
        max_ms=percentile(ordered, 100),
        server_cpu=server / spec.duration,
        redis_cpu=redis_ / spec.duration,
        loader_cpu=r.cpu_seconds / spec.duration,
        other_cpu=max(0.0, busy - server - redis_ - r.cpu_seconds) / spec.duration,
        built_inline=r.built_inline,
        problems=problems,
    )


# -- figures ----------------------------------------------------------------------------


def new_figures() -> dict[str, Figure]:
    f = Figure
    return {
        "closed_ceiling_rps": f("ceiling req/s, closed loop (bare XADD endpoint)", "req/s"),
        "closed_ingest_rps": f(
            "ingest req/s, closed loop", "req/s", "closed_ceiling_rps", TARGET_RATIO
        ),
        "closed_ceiling_p50": f("ceiling p50, closed loop (saturation)", "ms"),
        "closed_ceiling_p99": f("ceiling p99, closed loop (saturation)", "ms"),
        "closed_ingest_p50": f("ingest p50, closed loop (saturation)", "ms", "closed_ceiling_p50"),
        "closed_ingest_p99": f("ingest p99, closed loop (saturation)", "ms", "closed_ceiling_p99"),
        "open_rate": f("open-loop rate, both kinds", "req/s", "closed_ceiling_rps"),
        "open_ceiling_p50": f("ceiling p50, open loop", "ms"),
        "open_ceiling_p99": f("ceiling p99, open loop", "ms"),
        "open_ingest_p50": f("ingest p50, open loop", "ms", "open_ceiling_p50"),
        "open_ingest_p99": f(
            "ingest p99, open loop (target: below)", "ms", "open_ceiling_p99", TARGET_P99_MS
        ),
    }


def record(figures: dict[str, Figure], p: Phase) -> None:
    if p.loop == "closed":
        figures[f"closed_{p.kind}_rps"].runs.append(p.rps)
    figures[f"{p.loop}_{p.kind}_p50"].runs.append(p.p50_ms)
    figures[f"{p.loop}_{p.kind}_p99"].runs.append(p.p99_ms)


# -- output -----------------------------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    redis: str
    workers: int
    connections: int
    warmup: float
    duration: float
    repeat: int
    rate: float = 0.0
    rate_given: bool = False
    seconds: float = 0.0


def rate_text(info: RunInfo) -> str:
    how = "set with --latency-rate" if info.rate_given else f"{LATENCY_SHARE:.0%} of the ceiling"
    return f"{info.rate:,.0f} req/s ({how})"


def render(figures: dict[str, Figure], phases: list[Phase], info: RunInfo, out: Console) -> None:
    rows = figure_rows(figures)
    out.print(
        f"[bold]agentrt webhook ingress benchmark[/]  {info.redis}; uvicorn + uvloop + "
        f"httptools, {info.workers} worker(s); {info.connections} keep-alive connections from "
        f"a load-generator process; {info.warmup:g}s warm-up + {info.duration:g}s measured per "
        f"phase, median of {info.repeat} run(s) ({info.seconds:.0f}s in all); open loop at "
        f"{rate_text(info)}"
    )
    table = Table()
    for col in ("figure", "value", "unit", "ceiling", "ratio", "target", "", "runs"):
        table.add_column(col, justify="left" if col in ("figure", "unit", "") else "right")
    for row, f in zip(rows, figures.values(), strict=True):
        value, ceiling, ratio, target, mark = cells(row)
        style = "red" if "MISS" in mark else "green" if "pass" in mark else "default"
        digits = 0 if f.unit == "req/s" else 2
        runs = ", ".join(f"{v:,.{digits}f}" for v in f.runs) if len(f.runs) > 1 else ""
        table.add_row(
            row["name"], value, row["unit"], ceiling, ratio, target, f"[{style}]{mark}[/]", runs
        )
    out.print(table)
    phase_table = Table(title="phases (CPU: cores busy during the measured window)")
    for col in ("loop", "kind", "req/s", "p50 ms", "p99 ms", "max ms", "server CPU", "µs/req",
                "redis CPU", "loader CPU", "other CPU", "errors"):  # fmt: skip
        phase_table.add_column(col, justify="left" if col in ("loop", "kind") else "right")
    for p in phases:
        per_req = p.server_cpu / p.rps * 1e6 if p.rps else math.nan
        phase_table.add_row(
            p.loop,
            p.kind,
            f"{p.rps:,.0f}",
            f"{p.p50_ms:.2f}",
            f"{p.p99_ms:.2f}",
            f"{p.max_ms:.1f}",
            f"{p.server_cpu:.2f}",
            f"{per_req:.0f}",
            f"{p.redis_cpu:.2f}",
            f"{p.loader_cpu:.2f}",
            f"{p.other_cpu:.2f}",
            "[red]yes[/]" if p.problems else "0",
        )
    out.print(phase_table)
    note = little_note(info.connections, figures["closed_ingest_rps"].value)
    out.print(f"[dim]{note}[/]")
    closed = [p for p in phases if p.loop == "closed"]
    pairs = [i.rps / c.rps for c, i in zip(closed[::2], closed[1::2], strict=False) if c.rps]
    if len(pairs) > 1:
        out.print(
            f"[dim]ingest/ceiling per closed-loop pair: {', '.join(f'{r:.0%}' for r in pairs)}[/]"
        )
    other = statistics.median(p.other_cpu for p in phases) if phases else 0.0
    if other > NOISY_CORES:
        out.print(
            f"[yellow]note:[/] other work used a median {other:.2f} cores during the measured "
            "windows (other processes, the kernel): on a small machine these figures are noisy"
        )
    inline = sum(p.built_inline for p in phases)
    if inline:
        out.print(f"[yellow]note:[/] {inline} request(s) were signed during measurement")
    flagged = [p for p in phases if p.problems]
    if flagged:
        out.print("[bold red]errors flagged (these figures are suspect):[/]")
        for p in flagged:
            out.print(f"  [red]✗[/] {p.loop}-loop {p.kind}: {'; '.join(p.problems)}")
    missed = [row for row in rows if row["target"] is not None and not met(row)]
    for row in missed:
        value, ceiling, ratio, target, _ = cells(row)
        against = f"{ratio} of {ceiling}" if row["unit"] == "req/s" else f"{value} ms"
        out.print(f"[bold red]target missed:[/] {row['name']}: {against}, target {target}")
    if not missed:
        out.print("[bold green]all targets met[/]")


def readme_block(figures: dict[str, Figure], phases: list[Phase], info: RunInfo) -> str:
    errors = sum(bool(p.problems) for p in phases)
    lines = [
        MARK_START,
        f"Measured with `scripts/bench_ingest.py` on {dt.date.today().isoformat()}: "
        f"{machine()}, shared by the server, Redis and the load generator; {info.redis}; "
        f"uvicorn + uvloop + httptools, {info.workers} worker(s); {info.connections} keep-alive "
        f"connections, {info.duration:g}s per phase, median of {info.repeat} run(s); open loop "
        f"at {rate_text(info)}. Requests are unique, signed {BODY_BYTES}-byte JSON bodies; the "
        "ceiling is a bare endpoint in the same app that does one `XADD` of the body"
        + (f"; errors flagged in {errors} phase(s)." if errors else "; every response was a 202."),
        "",
        *readme_table(figures),
        "",
        little_note(info.connections, figures["closed_ingest_rps"].value),
    ]
    other = statistics.median(p.other_cpu for p in phases) if phases else 0.0
    if other > NOISY_CORES:
        lines[-1] += (
            f" Other work used a median {other:.2f} cores during the measured windows "
            f"(worst {max(p.other_cpu for p in phases):.2f}): these figures are noisy."
        )
    lines.append(MARK_END)
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------


def run(args: argparse.Namespace, err: Console) -> tuple[dict[str, Figure], list[Phase], RunInfo]:
    figures, phases = new_figures(), []
    key = secrets.token_bytes(32)
    secret = "whsec_" + base64.b64encode(key).decode()
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(redis_target(args, err))
        if "always" not in target.durability:
            err.print(f"[bold yellow]warning:[/] Redis runs with {target.durability}")
        server_pid, port = stack.enter_context(
            ingress_server(target.url, args.workers, secret, err)
        )
        probe(port, key, "ceiling")
        probe(port, key, "ingest")
        loader = Loader(key, port, secrets.token_hex(4))
        stack.callback(loader.close)
        info = RunInfo(
            f"{target.version} ({target.mode.split(' ')[0]}, {target.durability})",
            args.workers,
            args.connections,
            args.warmup,
            args.duration,
            args.repeat,
        )
        started, estimate = time.perf_counter(), FIRST_ESTIMATE
        seconds = args.warmup + args.duration

        def phase(kind: Kind, rate: float | None) -> None:
            nonlocal estimate
            spec = PhaseSpec(
                index=len(phases),
                kind=kind,
                rate=rate,
                prebuilt=math.ceil((rate or estimate * 1.3) * seconds) + args.connections,
                connections=args.connections,
                warmup=args.warmup,
                duration=args.duration,
            )
            err.print(f"  {'closed' if rate is None else 'open'}-loop {kind} ...", end="")
            p = run_phase(spec, loader, server_pid, target)
            phases.append(p)
            record(figures, p)
            if rate is None:
                estimate = p.rps if len(phases) == 1 else max(estimate, p.rps)
            err.print(
                f" {p.rps:,.0f} req/s, p50 {p.p50_ms:.2f} ms, p99 {p.p99_ms:.2f} ms (cores: "
                f"server {p.server_cpu:.2f}, redis {p.redis_cpu:.2f}, loader "
                f"{p.loader_cpu:.2f}, other {p.other_cpu:.2f})"
                + (f" [red]{'; '.join(p.problems)}[/]" if p.problems else "")
            )

        for r in range(args.repeat):
            err.print(f"[bold]closed loop, run {r + 1}/{args.repeat}[/]")
            phase("ceiling", None)
            phase("ingest", None)
        ceiling = figures["closed_ceiling_rps"].value or FIRST_ESTIMATE
        info.rate = args.latency_rate or LATENCY_SHARE * ceiling
        info.rate_given = args.latency_rate is not None
        figures["open_rate"].runs.append(info.rate)
        for r in range(args.repeat):
            err.print(f"[bold]open loop at {info.rate:,.0f} req/s, run {r + 1}/{args.repeat}[/]")
            phase("ceiling", info.rate)
            phase("ingest", info.rate)
        info.seconds = time.perf_counter() - started
    return figures, phases, info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the webhook ingress against a bare XADD endpoint, same server."
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run (under a minute)")
    add("--json", action="store_true", help='last stdout line: {"figures": [...]}')
    add("--write-readme", action="store_true", help="refresh the bench_ingest block of README.md")
    add("--connections", type=int, default=64, help="keep-alive connections (default 64)")
    add("--duration", type=float, help="measured seconds per phase (default 10, quick 4)")
    add("--warmup", type=float, help="warm-up seconds per phase (default 2, quick 1)")
    add("--repeat", type=int, help="runs of each phase, medians reported (default 3, quick 1)")
    add(
        "--latency-rate",
        type=float,
        help=f"open-loop requests/s (default {LATENCY_SHARE:.0%}% of the closed-loop ceiling)",
    )
    add("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    add("--redis-db", type=int, default=14, help="the database the benchmark flushes (14)")
    add(
        "--state-dir",
        type=Path,
        default=Path(".agentrt/bench"),
        help="embedded Redis state when REDIS_URL is unset (default .agentrt/bench)",
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if min(args.repeat, args.connections, args.workers) < 1 or args.warmup < 0:
        parser.error("--repeat, --connections and --workers must be >= 1, --warmup >= 0")
    if args.latency_rate is not None and args.latency_rate <= 0:
        parser.error("--latency-rate must be > 0")
    if args.duration <= 0 or args.warmup + args.duration > 240:
        parser.error("--warmup + --duration must stay under 240s (signatures expire after 5 min)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err, out = main_consoles(args.json, width=160)
    try:
        figures, phases, info = run(args, err)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted; the server and load generator are stopped[/]")
        return 130
    render(figures, phases, info, out)
    if args.write_readme:
        write_readme(README, "bench_ingest", readme_block(figures, phases, info), err)
    if args.json:
        print_json_line(figure_rows(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
