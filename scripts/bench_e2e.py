"""End to end: ``agentrt up`` with the sample application under a steady load of webhooks.

One run starts ``agentrt up --port P --workers N`` (``--app``: the sample
application, ``webhooks.demo.agents``, unless given) as a subprocess, as a
user runs it: its own state directory (where it writes ``webhooks.toml`` with
fresh secrets, the API token and the children's logs), a scratch schema
(``AGENTRT_DB_SCHEMA=e2e_<random>``, its read models in ``<schema>_read``),
the offline model (``ANTHROPIC_API_KEY`` is removed from the child's
environment: the model answers at once, so the figures are the runtime's,
not a provider's). The posts are the demo's (``webhooks.demo.traffic``): the
seven support emails through Postmark, Mailgun, SendGrid and raw MIME, and the
three order changes through Debezium and Supabase, signed with the secrets of
that ``webhooks.toml``, a fresh message id on every post (nothing is
deduplicated away). An email run is the triage agent's activation (one to
three durable model steps, an emitted ``support.triaged``); an order change
the anomaly agent's (none, or a tool step and a model step).

The load: for each rate of a ladder (``--rates``, default 5, 10, 20, 40, ...
doubling, until one fails; ``--quick`` 10, 40, 160), ``--duration`` seconds
(default 60, quick 8) of posts on a Poisson schedule (``--schedule even``:
evenly spaced), seeded, built and signed before the clock starts and sent on
time by ``httpx.AsyncClient`` (16 clients of 8 connections): each post is a task of
its own, so a slow answer delays nothing behind it (an open loop). After a
failing rate, ``--refine`` more rates between the last that passed and the
first that failed (their geometric mean; default 1, quick 0).

The latency of a post runs from its *scheduled* send time (a post the
generator sent late is charged its lateness: no coordinated omission) to the
moment the read side shows its run in a terminal state: the ``runs`` read
model (``<schema>_read.runs``, what ``agentrt runs`` and the API show) has its
row with a status other than ``running``. The run id is the event id of the
202's body. Polling rather than ``finished_at``: ``finished_at`` is the
worker's clock at the run's last activation, the write side; it leaves out
the projector (its poll interval, its batches), and a run is not done for a
user until a reader can see it done. So the script polls the read model every
50 ms for the runs it still waits for; a run's time is that of the poll that
first returned it terminal (a late bias of at most one poll interval plus
the query). ``finished_at`` minus the send time, the write side's latency,
is reported beside it. Both clocks are this machine's wall clock.

A rate is *sustained* when, for the whole duration:

- every post got a 202 (not a duplicate) and the p99 of POST -> terminal is
  under 1 s (``--bound-ms``);
- the system keeps up: every run is terminal within ``--grace`` seconds
  (default 5) of the last post, and the backlog (posts sent and not yet seen
  terminal, sampled every second) is not growing: its mean over the last
  fifth of the window is not above both twice its mean over the second fifth
  and rate x 1 s (the most a p99 under 1 s allows, by Little's law);
- nothing is lost or duplicated, checked against the log: every accepted
  event id has exactly one trigger event (``SELECT ... FROM <schema>.events
  WHERE event_id = ANY(...)``), exactly one inbox row per agent that reads
  its type from the ingress and no other (``<schema>.inbox``), and no
  activation of the run committed twice (``activation.completed`` /
  ``activation.dead_lettered`` per agent and trigger); every run ended
  ``completed`` (or waits for an approval). At the end, every event the
  ingress produced in the schema must be one a 202 answered (no run started
  by a duplicate).

A rate stops early when its p99 is already certain to exceed the bound (more
than 1% of its posts have waited longer): it failed, and the overload it
builds would only slow the machine for the next phase.

Baseline, in the same run: the ingress alone. Before ``agentrt up`` starts,
``agentrt serve`` (the same command and config ``up`` runs as its ingress) on
the same Redis takes the same kind of posts, pre-built and signed the same
way, from the same generator in a closed loop with 64 posts in flight and no
agent reading the streams; its accepted webhooks/s is the ceiling of the
headline (the whole system cannot take webhooks faster than its front door
accepts them from this generator), so the ratio says what share of the
ingress's rate survives the whole pipeline. The generator (httpx, one
process) is slower than bench_ingest's load generator, so this ceiling is
lower than that script's. The fixed target is the 1-second p99 bound of each
rate; no target is set on the ratio (the issue names none, and a made-up
share would be a hard-coded result).

Servers: ``REDIS_URL`` / ``DATABASE_URL`` if set (DATABASE_URL a superuser
or database-owner URL), otherwise the embedded servers in ``--state-dir``
(default ``.agentrt/bench``). Redis database ``--redis-db`` (default 12) is
flushed before, after the baseline and at the end; the scratch schemas are
dropped at the end.

Usage::

    .venv/bin/python scripts/bench_e2e.py            # the full ladder, 60 s per rate (~10 min)
    .venv/bin/python scripts/bench_e2e.py --quick    # under a minute
    .venv/bin/python scripts/bench_e2e.py --json     # last stdout line: {"figures": [...]}
    .venv/bin/python scripts/bench_e2e.py --write-readme

The exit code is 0 whatever the figures: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import datetime as dt
import importlib.metadata
import math
import os
import platform
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

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
    readme_table,
    reap,
    run_on_servers,
    write_readme,
)

README = REPO / "README.md"
#: The rates tried, in webhooks/s, until one fails.
RATES = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
QUICK_RATES = (10.0, 40.0, 160.0)
#: p99 of POST -> terminal below which a rate can be sustained (ms).
BOUND_MS = 1000.0
#: Seconds between polls of the runs read model.
POLL_SECONDS = 0.05
#: Runs asked about per poll at most (the oldest first: runs end roughly in order).
POLL_CAP = 5000
#: Connections per httpx client, and clients of the rate phases (an open loop: enough
#: connections that no post waits for one). Several small clients rather than one large
#: one: httpx's pool slows down with many connections in one client (here, one client of
#: 64 connections posted 80 webhooks/s where 8 clients of 8 posted 277/s).
PER_CLIENT = 8
CLIENTS = 16
#: Posts in flight in the baseline's closed loop (on BASELINE_IN_FLIGHT / PER_CLIENT clients).
BASELINE_IN_FLIGHT = 64
#: Posts the baseline builds per second of its phase (more than it can send here).
BASELINE_BUILD_RATE = 2500
#: Cores busy before the run above which the machine counts as busy.
BUSY_CORES = 0.3
#: A run with one of these statuses ended as it should.
GOOD_STATUSES = frozenset({"completed", "waiting_for_approval"})
#: Event types whose commit records an activation of (agent, trigger).
ACTIVATION_TYPES = ("activation.completed", "activation.dead_lettered")
#: Signed posts must reach the ingress within its timestamp tolerance (5 minutes).
MAX_DURATION = 240.0


# -- pure parts ------------------------------------------------------------------------


def schedule(rate: float, duration: float, kind: str, rng: random.Random) -> list[float]:
    """Send times (seconds from the start, ascending, below ``duration``) of ``rate``
    posts/s: evenly spaced (``even``, the first at 0) or a Poisson process (``poisson``,
    exponential gaps drawn from ``rng``)."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate} and {duration}")
    if kind == "even":
        return [i / rate for i in range(math.ceil(rate * duration - 1e-9))]
    if kind != "poisson":
        raise ValueError(f"schedule must be 'even' or 'poisson', got {kind!r}")
    times = []
    t = rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def certain_miss(over: int, planned: int, q: float = 99.0) -> bool:
    """Whether ``over`` of ``planned`` latencies above the bound already put the
    nearest-rank ``q``-th percentile above it, whatever the others turn out to be."""
    return planned > 0 and over > planned - math.ceil(q / 100 * planned)


def refine(passed: float | None, failed: float) -> float | None:
    """The rate to try between the highest that passed and the lowest that failed: their
    geometric mean to two significant digits; None when nothing passed or the two are
    within 25% (a finer answer is not worth a run)."""
    if passed is None or failed <= passed * 1.25:
        return None
    mid = math.sqrt(passed * failed)
    digits = 1 - math.floor(math.log10(mid))
    rounded = round(mid, digits)
    return rounded if passed < rounded < failed else None


def growing(samples: Sequence[tuple[float, int]], rate: float, bound_s: float) -> bool:
    """Whether the backlog ``samples`` (seconds, posts not yet terminal) grew over the
    window: the mean of the last fifth above twice the second fifth's and above
    ``rate * bound_s`` (more than a latency under the bound allows, by Little's law)."""
    if len(samples) < 5:
        return False
    fifth = len(samples) // 5
    early = statistics.fmean(n for _, n in samples[fifth : 2 * fifth])
    late = statistics.fmean(n for _, n in samples[-fifth:])
    return late > 2 * early and late > rate * bound_s


@dataclasses.dataclass
class LogFacts:
    """What the log holds for a set of accepted event ids."""

    #: event id -> (event type, rows with that event id).
    triggers: dict[UUID, tuple[str, int]] = dataclasses.field(default_factory=dict)
    #: event id -> consumer -> inbox rows.
    inbox: dict[UUID, dict[str, int]] = dataclasses.field(default_factory=dict)
    #: (run id, agent, trigger event id) -> activations committed (completed or
    #: dead-lettered); the trigger may be any event of the run.
    activations: dict[tuple[UUID, str, UUID], int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Verdict:
    """Lost and duplicated work among accepted webhooks, as the log shows it."""

    #: Accepted ids with no trigger event in the log.
    lost: int = 0
    #: (event, agent that should handle it) with no inbox row.
    unhandled: int = 0
    #: Trigger events, inbox rows or activations present more than once.
    duplicated: int = 0
    #: Inbox rows of an agent that does not read the event's type from the ingress.
    unexpected: int = 0
    #: The first few cases, for the report.
    examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.unhandled or self.duplicated or self.unexpected)

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)

    def text(self) -> str:
        parts = [f"{n} {what}" for n, what in (
            (self.lost, "lost (no trigger event)"), (self.unhandled, "not handled (no inbox row)"),
            (self.duplicated, "duplicated"), (self.unexpected, "handled by an unexpected agent"),
        ) if n]  # fmt: skip
        return "; ".join(parts) + (f" (e.g. {'; '.join(self.examples)})" if self.examples else "")


def judge(
    accepted: Iterable[UUID], facts: LogFacts, routes: Mapping[str, Sequence[str]]
) -> Verdict:
    """Check ``facts`` for the ``accepted`` ids: each has one trigger event, one inbox row per
    agent in ``routes[its type]`` (the agents reading that type from the ingress) and no
    other, and no (agent, trigger) of its run activated twice."""
    v = Verdict()
    accepted = set(accepted)
    for event_id in accepted:
        trigger = facts.triggers.get(event_id)
        if trigger is None:
            v.lost += 1
            v.note(f"{event_id} not in the log")
            continue
        event_type, rows = trigger
        if rows > 1:
            v.duplicated += 1
            v.note(f"{event_id} in the log {rows} times")
        expected = set(routes.get(event_type, ()))
        handled = facts.inbox.get(event_id, {})
        for agent in sorted(expected):
            n = handled.get(agent, 0)
            if n == 0:
                v.unhandled += 1
                v.note(f"{agent} has no inbox row for {event_id}")
            elif n > 1:
                v.duplicated += 1
                v.note(f"{agent} has {n} inbox rows for {event_id}")
        for agent in sorted(set(handled) - expected):
            v.unexpected += 1
            v.note(f"{agent} handled {event_id} ({event_type})")
    for (run_id, agent, trigger_id), n in sorted(facts.activations.items(), key=str):
        if n > 1 and run_id in accepted:
            v.duplicated += 1
            v.note(f"{agent} activated {n} times for {trigger_id}")
    return v


def ingress_routes(agents: Sequence[Any]) -> dict[str, list[str]]:
    """Event type -> the agents that read it from the ingress (each must handle it once)."""
    routes: dict[str, list[str]] = {}
    for agent in agents:
        if agent.reads_ingress:
            for t in sorted(agent.subscribed_types()):
                routes.setdefault(t, []).append(agent.name)
    return routes


# -- the log -----------------------------------------------------------------------------


def _chunks(ids: Sequence[UUID], size: int = 5000) -> Iterable[list[UUID]]:
    for i in range(0, len(ids), size):
        yield list(ids[i : i + size])


async def log_facts(conn: Any, schema: str, ids: Sequence[UUID]) -> LogFacts:
    """What the log in ``schema`` holds for event ids ``ids`` (their runs' ids too: the
    ingress's event id is its run's id), on asyncpg connection ``conn``."""
    facts = LogFacts()
    for chunk in _chunks(ids):
        for r in await conn.fetch(
            f'SELECT event_id, min(event_type), count(*) FROM "{schema}".events '
            "WHERE event_id = ANY($1::uuid[]) GROUP BY event_id",
            chunk,
        ):
            facts.triggers[r[0]] = (r[1], r[2])
        for r in await conn.fetch(
            f'SELECT event_id, consumer, count(*) FROM "{schema}".inbox '
            "WHERE event_id = ANY($1::uuid[]) GROUP BY event_id, consumer",
            chunk,
        ):
            facts.inbox.setdefault(r[0], {})[r[1]] = r[2]
        for r in await conn.fetch(
            f"SELECT run_id, data->>'agent', (data->>'trigger_id')::uuid, count(*) "
            f'FROM "{schema}".events WHERE run_id = ANY($1::uuid[]) '
            "AND event_type = ANY($2::text[]) GROUP BY 1, 2, 3",
            chunk,
            list(ACTIVATION_TYPES),
        ):
            facts.activations[(r[0], r[1], r[2])] = r[3]
    return facts


async def phantom_triggers(conn: Any, schema: str, accepted: Sequence[UUID]) -> int:
    """Events the ingress produced in ``schema`` that no 202 answered (a run started by a
    duplicate delivery, or by a post that was not ours). Refuses to answer when none of
    the ``accepted`` is among them: the ingress's events would then carry another
    ``producer`` than this check looks for, and it would see nothing."""
    row = await conn.fetchrow(
        "SELECT count(*), count(*) FILTER (WHERE event_id = ANY($2::uuid[])) "
        f'FROM "{schema}".events WHERE producer LIKE $1',
        "ingress:%",
        list(accepted),
    )
    if accepted and not row[1]:
        raise RuntimeError("no accepted webhook's event has producer 'ingress:*' in the log: "
                           "the check for runs started twice cannot see them")  # fmt: skip
    return int(row[0] - row[1])


# -- processes ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def clients(url: str, n: int) -> Any:
    """``n`` httpx clients of PER_CLIENT connections each, to ``url`` (see PER_CLIENT)."""
    import httpx

    limits = httpx.Limits(max_connections=PER_CLIENT, max_keepalive_connections=PER_CLIENT)
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60,
                                                              limits=limits))
            for _ in range(n)
        ]  # fmt: skip


def _die_with_parent() -> Callable[[], None] | None:
    """``preexec_fn``: SIGTERM to the child when this script dies (Linux), so a killed
    benchmark leaves no ``agentrt up`` behind (whose own children follow it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (from /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclasses.dataclass
class CpuMark:
    agentrt: float
    postgres: float
    redis: float
    me: float
    busy: float
    at: float


@dataclasses.dataclass
class Cores:
    """Cores busy during a window: agentrt's processes, PostgreSQL's (when local), Redis,
    the load generator (this script), everything else."""

    agentrt: float = math.nan
    postgres: float = math.nan
    redis: float = math.nan
    generator: float = math.nan
    other: float = math.nan
    busy: float = math.nan


# -- one rate --------------------------------------------------------------------------


@dataclasses.dataclass
class RateResult:
    rate: float
    repeat: int
    planned: int
    duration: float
    sent: int = 0
    accepted: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: POST (scheduled) -> seen terminal in the read model, seconds.
    read: list[float] = dataclasses.field(default_factory=list)
    #: POST (scheduled) -> the run's finished_at (the write side), seconds.
    write: list[float] = dataclasses.field(default_factory=list)
    statuses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: Seconds into the window when the rate was stopped (p99 over the bound was certain).
    stopped_at: float | None = None
    #: Runs not terminal ``grace`` seconds after the last post; after the drain.
    late: int = 0
    never: int = 0
    backlog: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    grew: bool = False
    #: The generator's worst lateness against its schedule, seconds.
    max_lag: float = 0.0
    verdict: Verdict = dataclasses.field(default_factory=Verdict)
    cores: Cores = dataclasses.field(default_factory=Cores)
    ids: list[UUID] = dataclasses.field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(sorted(self.read), 50)

    @property
    def p99(self) -> float:
        return percentile(sorted(self.read), 99)

    def problems(self, grace: float) -> list[str]:
        out = []
        if self.errors:
            out.append("not 202: " + ", ".join(f"{k} x{v}" for k, v in self.errors.items()))
        if self.stopped_at is not None:
            out.append(f"stopped after {self.stopped_at:.0f}s: more than 1% of the posts "
                       f"had waited over {BOUND_MS:g} ms")  # fmt: skip
        elif not (self.p99 < BOUND_MS):
            out.append(f"p99 {self.p99:,.0f} ms")
        if self.late:
            out.append(f"{self.late} runs not terminal {grace:g}s after the last post")
        if self.never:
            out.append(f"{self.never} runs never seen terminal")
        if self.grew:
            out.append("the backlog grew")
        bad = {s: n for s, n in self.statuses.items() if s not in GOOD_STATUSES}
        if bad:
            out.append("runs ended " + ", ".join(f"{s} x{n}" for s, n in bad.items()))
        if not self.verdict.clean:
            out.append(self.verdict.text())
        return out


class Tracker:
    """Posts accepted and not yet seen terminal, and the latencies of those that were."""

    def __init__(self, result: RateResult) -> None:
        self.result = result
        #: event id -> scheduled send time (wall clock), in acceptance order.
        self.pending: dict[UUID, float] = {}
        #: post number -> scheduled send time of posts not yet answered.
        self.sending: dict[int, float] = {}
        self.over = 0

    def accepted(self, event_id: UUID, sent: float) -> None:
        self.pending[event_id] = sent
        self.result.ids.append(event_id)
        self.result.accepted += 1

    def finished(self, event_id: UUID, status: str, finished: dt.datetime | None,
                 seen: float) -> None:  # fmt: skip
        sent = self.pending.pop(event_id, None)
        if sent is None:
            return
        r = self.result
        r.read.append(seen - sent)
        if seen - sent > BOUND_MS / 1000:
            self.over += 1
        if finished is not None:
            r.write.append(finished.timestamp() - sent)
        r.statuses[status] += 1

    def waiting(self) -> int:
        return len(self.pending) + len(self.sending)

    def over_bound(self, now: float) -> int:
        """Latencies over the bound: seen, or certain (still waiting past it)."""
        limit = now - BOUND_MS / 1000
        waiting = sum(1 for s in self.pending.values() if s < limit)
        waiting += sum(1 for s in self.sending.values() if s < limit)
        return self.over + waiting


# -- the benchmark ---------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, srv: Servers, admin: Any, redis: Any,
                 state: Path, err: Console) -> None:  # fmt: skip
        from webhooks.config import load
        from webhooks.demo.traffic import sample_config

        self.args, self.srv, self.admin, self.redis, self.state, self.err = (
            args, srv, admin, redis, state, err)  # fmt: skip
        self.schema = f"e2e_{secrets.token_hex(4)}"
        self.read_schema = f"{self.schema}_read"
        self.config = sample_config(state / "webhooks.toml")
        self.ingress_config, self.sources = load(self.config)
        self.rng = random.Random(args.seed)
        self.up: asyncio.subprocess.Process | None = None
        self.port = 0
        self.poll_conn: Any = None
        self.all_accepted: list[UUID] = []
        #: Event type -> the agents that must handle it (set by :meth:`run`).
        self.routes: dict[str, list[str]] = {}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
        env.update(
            REDIS_URL=self.srv.redis_url,
            DATABASE_URL=self.srv.database_url,
            AGENTRT_STATE_DIR=str(self.state),
            AGENTRT_DB_SCHEMA=self.schema,
            AGENTRT_WEBHOOKS_CONFIG=str(self.config),
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        )
        return env

    def posts(self, n: int) -> list[Any]:
        """``n`` signed posts, each with fresh message ids."""
        from webhooks.demo.traffic import sample_posts

        out: list[Any] = []
        while len(out) < n:
            out += sample_posts(self.sources)
        return out[:n]

    async def spawn(self, argv: list[str], log: Path) -> asyncio.subprocess.Process:
        with open(log, "ab") as out:  # noqa: ASYNC230 - a local file, once per child
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "runtime", *argv, cwd=REPO, env=self.env(),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
            )  # fmt: skip

    async def cpu_mark(self) -> CpuMark:
        from redis.exceptions import RedisError

        pids = descendants(self.up.pid) if self.up is not None else []
        pg = [int(r[0]) for r in await self.admin.fetch("SELECT pid FROM pg_stat_activity")]
        redis = math.nan
        with contextlib.suppress(RedisError):
            info = await self.redis.info("cpu")
            redis = sum(float(info.get(f"used_cpu_{k}", 0))
                        for k in ("sys", "user", "sys_children", "user_children"))  # fmt: skip

        def total(ps: Sequence[int]) -> float:
            return sum(c for c in (proc_cpu(p) for p in ps) if not math.isnan(c))

        return CpuMark(total(pids), total(pg), redis, time.process_time(), machine_busy(),
                       time.monotonic())  # fmt: skip

    @staticmethod
    def cores(a: CpuMark, b: CpuMark) -> Cores:
        s = max(b.at - a.at, 1e-9)
        agentrt, pg, redis, me = (b.agentrt - a.agentrt, b.postgres - a.postgres,
                                  b.redis - a.redis, b.me - a.me)  # fmt: skip
        busy = b.busy - a.busy
        known = agentrt + max(pg, 0.0) + (0.0 if math.isnan(redis) else redis) + me
        return Cores(agentrt / s, pg / s, redis / s, me / s, max(0.0, busy - known) / s, busy / s)

    # -- the baseline: the ingress alone ---------------------------------------------

    async def baseline(self, repeat: int) -> float:
        """Accepted webhooks/s of ``agentrt serve`` alone (closed loop, no agents)."""
        import httpx

        from runtime.streams.keys import ingress_stream

        port = free_port()
        proc = await self.spawn(
            ["serve", "--host", "127.0.0.1", "--port", str(port), "--config", str(self.config)],
            self.state / f"baseline-{repeat}.log",
        )
        url = f"http://127.0.0.1:{port}"
        seconds = self.args.baseline
        warmup = 1.0
        posts = self.posts(int(BASELINE_BUILD_RATE * (seconds + warmup)))
        accepted = counted = 0
        other: collections.Counter[str] = collections.Counter()
        try:
            await self.wait_http(f"{url}/readyz", proc, self.state / f"baseline-{repeat}.log")
            async with clients(url, BASELINE_IN_FLIGHT // PER_CLIENT) as pool:
                it = iter(posts)
                start = time.monotonic() + warmup
                end = start + seconds
                last = start

                async def loop(client: httpx.AsyncClient) -> None:
                    nonlocal accepted, other, counted, last
                    for p in it:
                        if time.monotonic() >= end:
                            return
                        try:
                            r = await client.post(f"/webhooks/{p.source}", content=p.body,
                                                  headers=p.headers)  # fmt: skip
                        except httpx.HTTPError as exc:
                            other[type(exc).__name__] += 1
                            continue
                        if r.status_code != 202 or r.json().get("duplicate"):
                            other[f"HTTP {r.status_code}"] += 1
                            continue
                        now = time.monotonic()
                        accepted += 1
                        if start <= now < end:
                            counted += 1
                            last = now

                await asyncio.gather(*(loop(c) for c in pool for _ in range(PER_CLIENT)))
            window = max(min(time.monotonic(), end) - start, 1e-9)
            if last < end - 0.5:  # ran out of pre-built posts: count up to the last
                self.err.print("[yellow]warning:[/] the baseline ran out of pre-built posts; "
                               "its rate is over the time they lasted")  # fmt: skip
                window = max(last - start, 1e-9)
        finally:
            proc.send_signal(signal.SIGTERM)
            await reap(proc, 15)
        entries = 0
        for i in range(self.ingress_config.ingress.partitions):
            entries += int(await self.redis.xlen(ingress_stream(i)))
        await self.redis.flushdb()
        if other or entries != accepted:
            self.err.print(f"[red]baseline: posts not accepted: {dict(other)}; the streams "
                           f"hold {entries} entries for {accepted} accepted[/]")  # fmt: skip
            return math.nan
        return counted / window

    async def wait_http(self, url: str, proc: asyncio.subprocess.Process, log: Path,
                        within: float = 120.0) -> None:  # fmt: skip
        import httpx

        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if proc.returncode is not None:
                    raise RuntimeError(f"{url}: the process exited ({proc.returncode}):\n"
                                       f"{log_tail(log)}")  # fmt: skip
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).is_success:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{url} not ready after {within:g}s:\n{log_tail(log)}")

    # -- agentrt up ------------------------------------------------------------------

    async def start_up(self) -> None:
        from runtime.cli.up import free_base_port

        self.port = free_base_port("127.0.0.1")
        argv = ["up", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.args.workers)]  # fmt: skip
        if self.args.app:
            argv += ["--app", self.args.app]
        log = self.state / "up.log"
        started = time.monotonic()
        self.up = await self.spawn(argv, log)
        deadline = started + 180
        while "agentrt is up" not in log.read_text(errors="replace"):
            if self.up.returncode is not None:
                raise RuntimeError(f"agentrt up exited ({self.up.returncode}):\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agentrt up not up after 180s:\n{log_tail(log)}")
            await asyncio.sleep(0.2)
        if "not ready after" in log.read_text(errors="replace"):
            raise RuntimeError(f"a service of agentrt up did not get ready:\n{log_tail(log)}")
        self.err.print(f"[dim]agentrt up ready in {time.monotonic() - started:.1f}s "
                       f"(logs in {self.state}/logs)[/]")  # fmt: skip

    async def stop_up(self) -> None:
        if self.up is None or self.up.returncode is not None:
            return
        self.up.send_signal(signal.SIGINT)
        await reap(self.up, 40)

    async def warm_up(self) -> None:
        """One round of the sample posts, every run terminal (the workers, relay and
        projector are all working) before the clock starts."""
        result = await self.rate_phase(rate=0.0, repeat=-1)
        if result.errors or result.never or not result.verdict.clean:
            raise RuntimeError("the warm-up's runs did not all reach a terminal state: "
                               + "; ".join(result.problems(self.args.grace)))  # fmt: skip

    # -- a rate ----------------------------------------------------------------------

    async def rate_phase(self, rate: float, repeat: int) -> RateResult:
        """Post at ``rate``/s for the duration (rate 0: one round of the sample posts at
        once, the warm-up), follow every accepted run to its terminal state."""
        args = self.args
        if rate > 0:
            offsets = schedule(rate, args.duration, args.schedule, self.rng)
            duration = args.duration
        else:
            offsets = [0.0] * 10
            duration = 0.0
        posts = self.posts(len(offsets))
        result = RateResult(rate, repeat, len(offsets), duration)
        tracker = Tracker(result)
        stop_polling = asyncio.Event()
        async with clients(f"http://127.0.0.1:{self.port}", CLIENTS) as pool:
            poller = asyncio.create_task(self.poll(tracker, result, stop_polling))
            tasks: set[asyncio.Task[None]] = set()
            mark0 = await self.cpu_mark()
            t0, wall0 = time.monotonic(), time.time()
            sampler = asyncio.create_task(self.sample(tracker, result, t0))
            for i, (offset, post) in enumerate(zip(offsets, posts, strict=True)):
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if result.stopped_at is not None:
                    break
                result.max_lag = max(result.max_lag, time.monotonic() - t0 - offset)
                result.sent += 1
                client = pool[i % len(pool)]
                task = asyncio.create_task(self.post(client, post, i, wall0 + offset, tracker))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if duration and result.stopped_at is None:
                await asyncio.sleep(max(0.0, t0 + duration - time.monotonic()))
            last_post = time.monotonic()
            sampler.cancel()
            mark1 = await self.cpu_mark()
            result.cores = self.cores(mark0, mark1)
            if tasks:
                await asyncio.wait(tasks, timeout=120)
            await self.wait_until(lambda: not tracker.waiting(), last_post + args.grace)
            result.late = tracker.waiting()
            await self.wait_until(lambda: not tracker.waiting(), last_post + args.drain)
            result.never = tracker.waiting()
            stop_polling.set()
            await poller
        result.grew = growing(result.backlog, rate, BOUND_MS / 1000) if rate else False
        result.verdict = judge(result.ids, await log_facts(self.admin, self.schema, result.ids),
                               self.routes)  # fmt: skip
        self.all_accepted += result.ids
        return result

    @staticmethod
    async def wait_until(done: Callable[[], bool], deadline: float) -> None:
        # Polled, not an Event: what ``done`` reads changes in the poller, once per poll.
        while not done() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_SECONDS)

    async def post(self, client: Any, p: Any, i: int, sent: float, tracker: Tracker) -> None:
        import httpx

        tracker.sending[i] = sent
        try:
            r = await client.post(f"/webhooks/{p.source}", content=p.body, headers=p.headers)
        except httpx.HTTPError as exc:
            tracker.result.errors[type(exc).__name__] += 1
            return
        finally:
            del tracker.sending[i]
        if r.status_code != 202:
            tracker.result.errors[f"HTTP {r.status_code}"] += 1
            return
        answer = r.json()
        if answer.get("duplicate"):
            tracker.result.errors["202 duplicate"] += 1
            return
        tracker.accepted(UUID(answer["event_id"]), sent)

    async def poll(self, tracker: Tracker, result: RateResult, stop: asyncio.Event) -> None:
        """Every POLL_SECONDS: which waiting runs does the read model show terminal? Stops
        the rate when its p99 is certain to miss the bound."""
        import asyncpg

        sql = (f'SELECT run_id, status, finished_at FROM "{self.read_schema}".runs '
               "WHERE run_id = ANY($1::uuid[]) AND status <> 'running'")  # fmt: skip
        t0 = time.monotonic()
        while True:
            ids = list(tracker.pending)[:POLL_CAP]
            if ids:
                seen = time.time()
                try:
                    rows = await self.poll_conn.fetch(sql, ids)
                except asyncpg.UndefinedTableError:  # the projector has not made it yet
                    rows = []
                for run_id, status, finished in rows:
                    tracker.finished(run_id, status, finished, seen)
            if (result.rate and result.stopped_at is None
                    and certain_miss(tracker.over_bound(time.time()), result.planned)):  # fmt: skip
                result.stopped_at = time.monotonic() - t0
            if stop.is_set():
                return
            await asyncio.sleep(POLL_SECONDS)

    @staticmethod
    async def sample(tracker: Tracker, result: RateResult, t0: float) -> None:
        while True:
            await asyncio.sleep(1.0)
            result.backlog.append((time.monotonic() - t0, tracker.waiting()))

    # -- the ladder ------------------------------------------------------------------

    async def ladder(self, repeat: int) -> list[RateResult]:
        results: list[RateResult] = []
        passed: float | None = None
        failed: float | None = None
        todo = list(self.args.rates)
        refines = self.args.refine
        while todo:
            rate = todo.pop(0)
            self.err.print(f"run {repeat + 1}/{self.args.repeat}: {rate:g} webhooks/s for "
                           f"{self.args.duration:g}s ...", end="")  # fmt: skip
            r = await self.rate_phase(rate, repeat)
            results.append(r)
            problems = r.problems(self.args.grace)
            self.err.print(
                f" p50 {r.p50:,.0f} ms, p99 {r.p99:,.0f} ms, {r.accepted:,} accepted, "
                f"agentrt {r.cores.agentrt:.2f} cores"
                + (f" [red]✗ {escape('; '.join(problems))}[/]" if problems else " [green]✓[/]")
            )
            if r.never:
                self.err.print("[yellow]runs were still not terminal after the drain; "
                               "stopping the ladder[/]")  # fmt: skip
                break
            if problems:
                failed = rate if failed is None else min(failed, rate)
                todo = []
            else:
                passed = rate if passed is None else max(passed, rate)
            if not todo and failed is not None and refines > 0:
                nxt = refine(passed, failed)
                if nxt is not None:
                    todo, refines = [nxt], refines - 1
        return results

    async def run(self) -> tuple[list[float], list[RateResult], int]:
        import asyncpg

        from runtime.agents.loading import load_app
        from webhooks.up import default_app

        self.routes = ingress_routes(load_app(self.args.app or default_app))
        baselines = []
        for r in range(self.args.repeat):
            self.err.print(f"baseline {r + 1}/{self.args.repeat}: agentrt serve alone, "
                           f"{self.args.baseline:g}s closed loop ...", end="")  # fmt: skip
            baselines.append(await self.baseline(r))
            self.err.print(f" {baselines[-1]:,.0f} webhooks/s")
        await self.start_up()
        self.poll_conn = await asyncpg.connect(self.srv.database_url)
        try:
            await self.warm_up()
            results: list[RateResult] = []
            for r in range(self.args.repeat):
                results += await self.ladder(r)
            phantoms = await phantom_triggers(self.admin, self.schema, self.all_accepted)
            return baselines, results, phantoms
        finally:
            await self.poll_conn.close()
            await self.stop_up()


# -- figures and reports ---------------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    postgres: str
    redis: str
    versions: dict[str, str]
    idle_busy: float
    seconds: float = 0.0


def highest(results: Sequence[RateResult], repeat: int, grace: float) -> float:
    """The highest rate of run ``repeat`` that was sustained (0 when none was)."""
    ok = [r.rate for r in results if r.repeat == repeat and not r.problems(grace)]
    return max(ok, default=0.0)


def figures_of(baselines: Sequence[float], results: Sequence[RateResult], repeats: int,
               grace: float, phantoms: int) -> dict[str, Figure]:  # fmt: skip
    figures = {
        "ingress": Figure(
            "ingress alone: accepted webhooks/s (closed loop, 64 in flight, no agents)",
            "webhooks/s",
            runs=list(baselines),
        ),
    }
    for rate in sorted({r.rate for r in results}):
        mine = [r for r in results if r.rate == rate]
        figures[f"p50 {rate:g}"] = Figure(f"p50 POST→terminal at {rate:g}/s", "ms",
                                          runs=[r.p50 for r in mine])  # fmt: skip
        figures[f"p99 {rate:g}"] = Figure(f"p99 POST→terminal at {rate:g}/s", "ms",
                                          target=BOUND_MS, runs=[r.p99 for r in mine])  # fmt: skip
    # A run started by a duplicate spoils every rate: nothing counts as sustained then.
    best = [0.0 if phantoms else highest(results, i, grace) for i in range(repeats)]
    figures["sustained"] = Figure("highest sustained rate", "webhooks/s", ceiling_key="ingress",
                                  runs=best)  # fmt: skip
    return figures


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()  # fmt: skip

    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "runtime", "webhooks", "projections")
    code = f"{head}{' with uncommitted changes' if dirty else ''}" if head else "unknown"
    return {
        "agentrt": f"{version_of('agentrt')} (code at {code})",
        "python": platform.python_version(),
        "httpx": version_of("httpx"),
        "uvicorn": version_of("uvicorn"),
    }


def setup_text(args: argparse.Namespace, info: RunInfo) -> str:
    v = info.versions
    app = args.app or "the sample application (webhooks.demo.agents)"
    return (
        f"agentrt {v['agentrt']}, Python {v['python']}; {info.postgres}; {info.redis}; "
        f"`agentrt up --workers {args.workers}` with {app} and the offline model; "
        f"{args.schedule} arrivals for {args.duration:g}s per rate (seeded), httpx {v['httpx']} "
        f"from one process; a run sustained: every post a 202, p99 POST→terminal < "
        f"{BOUND_MS:g} ms, every run terminal within {args.grace:g}s of the last post, the "
        f"backlog not growing, nothing lost or duplicated in the log; "
        f"baseline {args.baseline:g}s; {args.repeat} run(s), medians"
    )


def _num(v: float, digits: int = 0) -> str:
    return "—" if math.isnan(v) else f"{v:,.{digits}f}"


def detail_rows(results: Sequence[RateResult], grace: float) -> list[list[str]]:
    rows = []
    for r in results:
        problems = r.problems(grace)
        c = r.cores
        rows.append([
            str(r.repeat + 1), f"{r.rate:g}", f"{r.accepted:,}", _num(r.p50), _num(r.p99),
            _num(max(r.read, default=math.nan) * 1000),
            _num(percentile(sorted(r.write), 50)), _num(percentile(sorted(r.write), 99)),
            _num(c.agentrt, 2), _num(c.postgres, 2), _num(c.redis, 2), _num(c.generator, 2),
            _num(c.other, 2), "✓" if not problems else "✗ " + "; ".join(problems),
        ])  # fmt: skip
    return rows


DETAIL_COLUMNS = ("run", "rate/s", "accepted", "p50 ms", "p99 ms", "max ms", "write p50",
                  "write p99", "agentrt", "postgres", "redis", "generator", "other",
                  "sustained")  # fmt: skip


def notes(results: Sequence[RateResult], info: RunInfo, args: argparse.Namespace,
          phantoms: int) -> list[str]:  # fmt: skip
    out = []
    if phantoms:
        out.append(f"{phantoms} ingress event(s) in the log that no 202 answered: a run "
                   "started twice; no rate counts as sustained")  # fmt: skip
    if info.idle_busy > BUSY_CORES:
        out.append(f"the machine was busy {info.idle_busy:.2f} cores before the run started "
                   "(other work): the figures are noisy")  # fmt: skip
    other = [r.cores.other for r in results if not math.isnan(r.cores.other)]
    if other and statistics.median(other) > BUSY_CORES:
        out.append(f"other work used a median {statistics.median(other):.2f} cores during the "
                   "rates: the figures are noisy")  # fmt: skip
    lags = [r.max_lag for r in results]
    if lags and max(lags) > 0.1:
        out.append(f"the generator fell up to {max(lags) * 1000:,.0f} ms behind its schedule "
                   "(charged to the latencies)")  # fmt: skip
    for repeat in range(args.repeat):
        mine = [r for r in results if r.repeat == repeat]
        if mine and not any(r.problems(args.grace) for r in mine):
            out.append(f"run {repeat + 1}: no rate failed; the limit is above "
                       f"{max(r.rate for r in mine):g}/s (add rates with --rates)")  # fmt: skip
    return out


def json_rows(figures: dict[str, Figure], results: Sequence[RateResult], info: RunInfo,
              args: argparse.Namespace, phantoms: int) -> list[dict[str, Any]]:  # fmt: skip
    """The ``--json`` rows; the headline's ``note`` says why each failed rate failed."""
    rows = figure_rows(figures)
    failed = [f"run {r.repeat + 1} at {r.rate:g}/s: {'; '.join(r.problems(args.grace))}"
              for r in results if r.problems(args.grace)]  # fmt: skip
    note = "; ".join([*failed, *notes(results, info, args, phantoms)])
    if note:
        rows[-1]["note"] = note
    return rows


def render(
    baselines: Sequence[float], results: Sequence[RateResult], phantoms: int, info: RunInfo,
    args: argparse.Namespace, out: Console,
) -> list[dict[str, Any]]:  # fmt: skip
    figures = figures_of(baselines, results, args.repeat, args.grace, phantoms)
    rows = json_rows(figures, results, info, args, phantoms)
    out.print(f"[bold]agentrt up end to end[/]  {escape(setup_text(args, info))} "
              f"({info.seconds:.0f}s)")  # fmt: skip
    table = Table()
    for col in ("figure", "value", "unit", "ceiling", "ratio", "target", "", "runs"):
        table.add_column(col, justify="left" if col in ("figure", "unit", "") else "right")
    for row, f in zip(rows, figures.values(), strict=True):
        value, ceiling, ratio, target, mark = cells(row)
        style = "red" if "MISS" in mark else "green" if "pass" in mark else "default"
        runs = ", ".join(f"{v:,.0f}" for v in f.runs) if len(f.runs) > 1 else ""
        table.add_row(row["name"], value, row["unit"], ceiling, ratio, target,
                      f"[{style}]{mark}[/]", runs)  # fmt: skip
    out.print(table)
    detail = Table(title="per rate (ms: POST→terminal in the read model; write: POST→"
                   "finished_at; cores busy during the window)")  # fmt: skip
    for col in DETAIL_COLUMNS:
        detail.add_column(col, justify="left" if col == "sustained" else "right")
    for cells_ in detail_rows(results, args.grace):
        detail.add_row(*(escape(c) for c in cells_))
    out.print(detail)
    for line in notes(results, info, args, phantoms):
        out.print(f"[yellow]note:[/] {escape(line)}")
    return rows


def readme_block(baselines: Sequence[float], results: Sequence[RateResult], phantoms: int,
                 info: RunInfo, args: argparse.Namespace) -> str:  # fmt: skip
    figures = figures_of(baselines, results, args.repeat, args.grace, phantoms)
    lines = [
        "<!-- bench_e2e:start -->",
        f"Measured with `scripts/bench_e2e.py` on {dt.date.today().isoformat()}: {machine()}, "
        f"shared by agentrt's processes, both servers and the load generator; "
        f"{setup_text(args, info)}.",
        "",
        *readme_table(figures),
        "",
        "| " + " | ".join(DETAIL_COLUMNS) + " |",
        "| " + " | ".join("---" if c == "sustained" else "---:" for c in DETAIL_COLUMNS) + " |",
        *(
            "| " + " | ".join(c.replace("|", "/") for c in row) + " |"
            for row in detail_rows(results, args.grace)
        ),
        "",
        "Latency runs from a post's scheduled send time to the first poll (every "
        f"{POLL_SECONDS * 1000:.0f} ms) of the `runs` read model that shows its run in a "
        "terminal state; *write* is to the run's `finished_at` (the worker's commit of its "
        "last activation, before the projector folds it). Cores: agentrt's processes (the "
        "supervisor and its children), PostgreSQL's backends, Redis, the generator, the rest.",
    ]
    for line in notes(results, info, args, phantoms):
        lines += ["", f"Note: {line}."]
    lines.append("<!-- bench_e2e:end -->")
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------------


def ours(key: bytes) -> bool:
    """Keys agentrt leaves (all under ``agentrt:``); anything else is someone else's."""
    return key.startswith(b"agentrt:")


async def run(args: argparse.Namespace, srv: Servers, err: Console) -> tuple[
        list[float], list[RateResult], int, RunInfo]:  # fmt: skip
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from runtime.log.pool import connect, redact

    redis = aioredis.Redis.from_url(srv.redis_url, socket_timeout=60)
    await claim_redis_db(
        redis, args.redis_db, ours, "not an agentrt key (another run may be using it)"
    )
    await redis.flushdb()
    admin = await connect(srv.database_url)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        bench = Bench(args, srv, admin, redis, Path(tmp), err)
        try:
            busy0, at0 = machine_busy(), time.monotonic()
            await asyncio.sleep(2.0)
            idle_busy = (machine_busy() - busy0) / (time.monotonic() - at0)
            if idle_busy > BUSY_CORES:
                err.print(f"[bold yellow]warning:[/] the machine is busy ({idle_busy:.2f} cores "
                          "before the run started): the figures will be noisy")  # fmt: skip
            postgres, redis_text = await describe_servers(srv, admin, redis, err)
            info = RunInfo(postgres, redis_text, versions(), idle_busy)
            err.print(f"[dim]PostgreSQL {redact(srv.database_url)}, Redis "
                      f"{redact(srv.redis_url)}, schema {bench.schema}[/]")  # fmt: skip
            started = time.perf_counter()
            baselines, results, phantoms = await bench.run()
            info.seconds = time.perf_counter() - started
            return baselines, results, phantoms, info
        finally:
            await bench.stop_up()
            with contextlib.suppress(RedisError):
                await redis.flushdb()
                if srv.redis_owned:  # ours: shrink its AOF back to nothing
                    await redis.bgrewriteaof()
            await redis.aclose()
            await drop_schemas(admin, [bench.schema, bench.read_schema], err)
            await admin.close()


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rates takes numbers separated by commas, got {text!r}"
                                         ) from None  # fmt: skip
    if not rates or any(r <= 0 for r in rates) or list(rates) != sorted(set(rates)):
        raise argparse.ArgumentTypeError("--rates must be positive and increasing")
    return rates


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="agentrt up with the sample application under a steady load of signed "
        "webhooks at increasing rates: latency to the run's terminal state, and the highest "
        "rate sustained."
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run (under a minute)")
    add("--json", action="store_true", help='last stdout line: {"figures": [...]}')
    add("--write-readme", action="store_true", help="refresh the bench_e2e block of README.md")
    add("--rates", type=_rates, help="webhooks/s to try, increasing, until one fails "
        f"(default {','.join(f'{r:g}' for r in RATES)}; quick "
        f"{','.join(f'{r:g}' for r in QUICK_RATES)})")  # fmt: skip
    add("--duration", type=float, help="seconds per rate (default 60, quick 8)")
    add("--schedule", choices=("poisson", "even"), default="poisson",
        help="arrival times: a Poisson process or evenly spaced (poisson)")  # fmt: skip
    add("--grace", type=float, default=5.0,
        help="seconds after the last post within which every run must be terminal (5)")  # fmt: skip
    add("--drain", type=float, default=120.0,
        help="seconds after the last post to wait for stragglers (120)")  # fmt: skip
    add("--refine", type=int, help="rates tried between the last pass and the first failure "
        "(default 1, quick 0)")  # fmt: skip
    add("--baseline", type=float, help="seconds of the ingress-alone baseline (default 10, "
        "quick 3)")  # fmt: skip
    add("--workers", type=int, default=1, help="agentrt up --workers (1, its default)")
    add("--app", help="agentrt up --app (default: the sample application)")
    add("--repeat", type=int, default=1, help="runs of the whole ladder, medians (1)")
    add("--seed", type=int, default=12, help="seed of the Poisson schedule (12)")
    add_server_options(parser, redis_db=12)
    args = parser.parse_args(argv)
    args.rates = args.rates or (QUICK_RATES if args.quick else RATES)
    args.duration = args.duration or (8.0 if args.quick else 60.0)
    args.refine = args.refine if args.refine is not None else (0 if args.quick else 1)
    args.baseline = args.baseline or (3.0 if args.quick else 10.0)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}]: signed posts are built "
                     "before the clock starts and must reach the ingress within its 5-minute "
                     "timestamp tolerance")  # fmt: skip
    if args.grace <= 0 or args.drain < args.grace or args.baseline <= 0:
        parser.error("--grace and --baseline must be positive, --drain at least --grace")
    if args.workers < 1 or args.repeat < 1 or args.refine < 0:
        parser.error("--workers and --repeat must be at least 1, --refine at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err, out = main_consoles(args.json)
    got = run_on_servers(args, err, lambda srv: run(args, srv, err))
    if got is None:
        return 130
    baselines, results, phantoms, info = got
    rows = render(baselines, results, phantoms, info, args, out)
    missed = [row for row in rows if row["target"] is not None and met(row) is False]
    if not missed:
        out.print("[bold green]every measured p99 under the bound[/]")
    if args.write_readme:
        write_readme(README, "bench_e2e", readme_block(baselines, results, phantoms, info, args),
                     err)  # fmt: skip
    if args.json:
        print_json_line(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
