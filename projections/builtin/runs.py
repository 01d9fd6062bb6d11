"""The ``runs`` read model: one row per run, its trigger, status, agents, usage and counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

import asyncpg
import msgspec

from projections.builtin._common import FINAL_ERRORS
from projections.engine import Projection, Tables
from runtime.agents.agent import Agent
from runtime.agents.filters import Filters, accepts
from runtime.events.builtin import (
    APPROVAL_DEADLINE,
    BOOKKEEPING,
    ActivationCompleted,
    ActivationDeadLettered,
    ApprovalDecided,
    ApprovalRequested,
    DeadLetterRedriven,
    RunBudgetExceeded,
    RunForked,
    StepRecorded,
    TimerCancelled,
    TimerFired,
    TimerScheduled,
    addressed_to,
)
from runtime.events.model import RecordedEvent


class _Open(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a run still waits for: the fold's bookkeeping, kept in the row (``open``)."""

    #: ``agent/event id`` of deliveries not completed yet (only with the app's agents).
    pending: list[str] = []
    #: Completions seen before the event they complete (a dead letter of a trigger
    #: the log never got, or an order the fold did not expect): matched later.
    early: list[str] = []
    #: Approval ids requested and not decided.
    approvals: list[str] = []
    #: Timer ids scheduled and not fired.
    timers: list[str] = []
    #: ``agent/trigger id`` -> [error_type, "open" | "redriven"] of dead letters
    #: not since completed.
    dead: dict[str, list[str]] = {}
    #: An activation.completed was seen; one had an outcome other than completed
    #: or budget_exceeded; a budget stopped a model call.
    completed: bool = False
    bad_outcome: bool = False
    budget: bool = False


_open_decoder = msgspec.json.Decoder(_Open)
_encode = msgspec.json.Encoder().encode
_usage_decoder = msgspec.json.Decoder(dict[str, dict[str, Any]])


@dataclasses.dataclass(slots=True)
class _Run:
    run_id: UUID
    source: str | None = None
    trigger_type: str | None = None
    has_root: bool = False
    agents: set[str] = dataclasses.field(default_factory=set)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    error_type: str | None = None
    usage: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    llm_calls: int = 0
    tool_calls: int = 0
    retries: int = 0
    activations: int = 0
    events: int = 0
    parent_run_id: UUID | None = None
    fork_step: int | None = None
    open: _Open = dataclasses.field(default_factory=_Open)
    last_tx: int = 0
    last_position: int = 0
    updated_at: datetime | None = None

    def status(self, knows_subscribers: bool) -> str:
        o = self.open
        if o.budget:
            return "budget_exceeded"
        unresolved = [v[0] for v in o.dead.values() if v[1] == "open"]
        if o.bad_outcome or any(t in FINAL_ERRORS for t in unresolved):
            return "failed"
        if unresolved:
            return "dead_lettered"
        if o.approvals:
            return "waiting_for_approval"
        redriven = any(v[1] == "redriven" for v in o.dead.values())
        if redriven or o.timers:
            return "running"
        if knows_subscribers:
            return "running" if o.pending or not (self.has_root or o.completed) else "completed"
        return "completed" if o.completed else "running"


_COLUMNS = (
    "run_id, source, trigger_type, has_root, status, agents, started_at, finished_at, "
    "duration_ms, error, error_type, usage, input_tokens, output_tokens, cost_usd, llm_calls, "
    "tool_calls, retries, activations, events, parent_run_id, fork_step, open, last_tx, "
    "last_position, updated_at"
)
_UNNEST = (
    "$1::uuid[], $2::text[], $3::text[], $4::bool[], $5::text[], $6::text[], "
    "$7::timestamptz[], $8::timestamptz[], $9::float8[], $10::text[], $11::text[], "
    "$12::jsonb[], $13::bigint[], $14::bigint[], $15::float8[], $16::int[], $17::int[], "
    "$18::int[], $19::int[], $20::int[], $21::uuid[], $22::int[], $23::jsonb[], "
    "$24::bigint[], $25::bigint[], $26::timestamptz[]"
)

#: The unnested columns as rows (agents travel as one comma-joined string per run:
#: unnest would flatten an array of arrays).
_SELECT = ", ".join(f"string_to_array(c{i}, ',')" if i == 6 else f"c{i}" for i in range(1, 27))
_ALIASES = ", ".join(f"c{i}" for i in range(1, 27))


def _ingress(e: RecordedEvent) -> bool:
    return e.producer is not None and e.producer.startswith("ingress:")


class RunsProjection(Projection):
    """One row per run (table ``runs``).

    ``status``, first that applies:

    * ``budget_exceeded``: a ``run.budget_exceeded`` was recorded (a model call
      would have taken the run past its budget and was not made).
    * ``failed``: an activation ended with an outcome other than completed (or
      budget_exceeded), or a dead letter not since completed has a final step
      failure as its error (StepFailed, OutputInvalid, RetriesExhausted).
    * ``dead_lettered``: an ``activation.dead_lettered`` not since redriven and
      completed (an agent gave up on one of the run's events for another reason).
    * ``waiting_for_approval``: an ``approval.requested`` has no ``approval.decided``.
    * ``running``: a redriven dead letter has not completed, a timer has not fired,
      or, with the app's agents (``agents=``), an event of the run has a subscriber
      that has not completed it (the relay's routing: ingress events go to the
      agents reading the ingress, others to their subscribers, ``timer.fired`` to
      its agent, and an agent with filters only the events that pass them); without
      the agents, until the run's first ``activation.completed``.
    * ``completed`` otherwise.

    ``source`` is the root event's ``source`` attribute if its body has one, else
    its producer; ``started_at`` the root's ``recorded_at`` (the first event seen
    while the root is not in the log yet: a run's first steps precede it);
    ``finished_at`` the end of the last activation (completed or dead-lettered);
    ``error`` the last dead letter's. The row keeps what the fold still waits for
    in ``open`` (jsonb), so a batch folds from the table's state, never from memory.
    """

    name: ClassVar[str] = "runs"
    version: ClassVar[int] = 2
    types: ClassVar[frozenset[str] | None] = None
    tables: ClassVar[dict[str, str]] = {
        "runs": (
            "(run_id uuid PRIMARY KEY, source text, trigger_type text, has_root boolean NOT NULL,"
            " status text NOT NULL, agents text[] NOT NULL, started_at timestamptz NOT NULL,"
            " finished_at timestamptz, duration_ms double precision, error text, error_type text,"
            " usage jsonb NOT NULL, input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,"
            " cost_usd double precision NOT NULL, llm_calls integer NOT NULL,"
            " tool_calls integer NOT NULL, retries integer NOT NULL, activations integer NOT NULL,"
            " events integer NOT NULL, parent_run_id uuid, fork_step integer,"
            " open jsonb NOT NULL, last_tx bigint NOT NULL, last_position bigint NOT NULL,"
            " updated_at timestamptz NOT NULL)"
        )
    }
    indexes: ClassVar[tuple[str, ...]] = (
        "CREATE INDEX ON {runs} (started_at DESC, run_id DESC)",
        "CREATE INDEX ON {runs} (status, started_at DESC, run_id DESC)",
        "CREATE INDEX ON {runs} (source, started_at DESC, run_id DESC)",
        "CREATE INDEX ON {runs} USING gin (agents)",
        "CREATE INDEX ON {runs} (parent_run_id) WHERE parent_run_id IS NOT NULL",
    )

    def __init__(self, agents: Sequence[Agent] = ()) -> None:
        self.knows_subscribers = bool(agents)
        #: event type -> agents it goes to (ingress events: those reading the ingress).
        self._routes: dict[str, list[str]] = {}
        self._ingress_routes: dict[str, list[str]] = {}
        #: agent -> its event filters (agents with any): events it filters out never
        #: reach it, so the run does not wait for them.
        self._filters: dict[str, Filters] = {a.name: f for a in agents if (f := a.filters())}
        for agent in agents:
            for t in sorted(agent.subscribed_types()):
                self._routes.setdefault(t, []).append(agent.name)
                if agent.reads_ingress:
                    self._ingress_routes.setdefault(t, []).append(agent.name)

    def _targets(self, e: RecordedEvent) -> list[str]:
        if _ingress(e):
            targets = self._ingress_routes.get(e.event_type, [])
        else:
            targets = self._routes.get(e.event_type, [])
            to = addressed_to(e.body)
            if to is not None:  # as the relay routes it: to that one agent only
                return [a for a in targets if a == to]
        if self._filters:
            f = self._filters
            return [a for a in targets if a not in f or accepts(f[a], e.event_type, e.body)]
        return targets

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        ids = list({e.run_id for e in events if e.run_id is not None})
        if not ids:
            return
        runs = {
            r[0]: _load(r)
            for r in await conn.fetch(
                f"SELECT {_COLUMNS} FROM {tables['runs']} WHERE run_id = ANY($1::uuid[])", ids
            )
        }
        for e in events:
            run_id = e.run_id
            if run_id is None:
                continue
            run = runs.get(run_id)
            if run is None:
                run = runs[run_id] = _Run(run_id)
            self._fold(run, e)
        rows = [_row(r, self.knows_subscribers) for r in runs.values()]
        columns = [list(c) for c in zip(*rows, strict=True)]
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ")[1:])
        await conn.execute(
            f"INSERT INTO {tables['runs']} ({_COLUMNS}) SELECT {_SELECT} "
            f"FROM unnest({_UNNEST}) AS u({_ALIASES}) "
            f"ON CONFLICT (run_id) DO UPDATE SET {updates}",
            *columns,
        )

    def _fold(self, run: _Run, e: RecordedEvent) -> None:
        run.events += 1
        run.last_tx, run.last_position, run.updated_at = e.tx, e.position, e.recorded_at
        o = run.open
        if e.event_id == run.run_id and not run.has_root:
            run.has_root = True
            run.trigger_type = e.event_type
            source = getattr(e.body, "source", None)
            run.source = source if isinstance(source, str) else e.producer
            run.started_at = e.recorded_at
        elif run.started_at is None or (not run.has_root and e.recorded_at < run.started_at):
            run.started_at = e.recorded_at
        b = e.body
        t = e.event_type
        if t not in BOOKKEEPING and self.knows_subscribers:
            for agent in self._targets(e):
                _expect(o, f"{agent}/{e.event_id}")
        if type(b) is StepRecorded:
            run.agents.add(b.agent)
            if b.kind == "llm":
                run.llm_calls += 1
            elif b.kind == "tool":
                run.tool_calls += 1
            run.retries += len(b.attempts)
            u = b.usage
            if u is not None:
                m = run.usage.get(u.model)
                if m is None:
                    m = run.usage[u.model] = {
                        "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "calls": 0,
                    }  # fmt: skip
                m["input_tokens"] += u.input_tokens
                m["output_tokens"] += u.output_tokens
                m["cost_usd"] += u.cost_usd
                m["calls"] += 1
                run.input_tokens += u.input_tokens
                run.output_tokens += u.output_tokens
                run.cost_usd += u.cost_usd
        elif type(b) is ActivationCompleted:
            run.agents.add(b.agent)
            run.activations += 1
            run.finished_at = e.recorded_at
            o.completed = True
            if b.outcome not in ("completed", "budget_exceeded"):
                o.bad_outcome = True
            key = f"{b.agent}/{b.trigger_id}"
            o.dead.pop(key, None)
            _done(o, key)
        elif type(b) is ActivationDeadLettered:
            run.agents.add(b.agent)
            run.finished_at = e.recorded_at
            run.error = b.error
            run.error_type = b.error_type
            key = f"{b.agent}/{b.trigger_id}"
            o.dead[key] = [b.error_type, "open"]
            _done(o, key)
        elif type(b) is DeadLetterRedriven:
            entry = o.dead.get(f"{b.agent}/{b.trigger_id}")
            if entry is not None:
                entry[1] = "redriven"
        elif type(b) is RunBudgetExceeded:
            run.agents.add(b.agent)
            o.budget = True
        elif type(b) is ApprovalRequested:
            o.approvals.append(str(b.approval_id))
        elif type(b) is ApprovalDecided:
            approval = str(b.approval_id)
            if approval in o.approvals:
                o.approvals.remove(approval)
        elif type(b) is TimerScheduled and b.name != APPROVAL_DEADLINE:
            # (An approval's deadline is part of the approval, which the run waits for.)
            o.timers.append(str(b.timer_id))
        elif type(b) is TimerFired or type(b) is TimerCancelled:
            timer = str(b.timer_id)
            if timer in o.timers:
                o.timers.remove(timer)
        elif type(b) is RunForked:
            run.parent_run_id = b.parent_run_id
            run.fork_step = b.at_step


def _expect(o: _Open, key: str) -> None:
    if key in o.early:
        o.early.remove(key)
    elif key not in o.pending:
        o.pending.append(key)


def _done(o: _Open, key: str) -> None:
    if key in o.pending:
        o.pending.remove(key)
    elif key not in o.early:
        o.early.append(key)


def _load(r: asyncpg.Record) -> _Run:
    return _Run(
        run_id=r[0], source=r[1], trigger_type=r[2], has_root=r[3], agents=set(r[5]),
        started_at=r[6], finished_at=r[7], error=r[9], error_type=r[10],
        usage=_usage_decoder.decode(r[11]), input_tokens=r[12], output_tokens=r[13],
        cost_usd=r[14], llm_calls=r[15], tool_calls=r[16], retries=r[17], activations=r[18],
        events=r[19], parent_run_id=r[20], fork_step=r[21], open=_open_decoder.decode(r[22]),
        last_tx=r[23], last_position=r[24], updated_at=r[25],
    )  # fmt: skip


def _row(run: _Run, knows_subscribers: bool) -> tuple[Any, ...]:
    started = run.started_at
    finished = run.finished_at
    duration = (
        (finished - started).total_seconds() * 1000
        if finished is not None and started is not None
        else None
    )
    return (
        run.run_id, run.source, run.trigger_type, run.has_root,
        run.status(knows_subscribers), ",".join(sorted(run.agents)), started, finished,
        duration, run.error, run.error_type, _encode(run.usage).decode(), run.input_tokens,
        run.output_tokens, run.cost_usd, run.llm_calls, run.tool_calls, run.retries,
        run.activations, run.events, run.parent_run_id, run.fork_step,
        _encode(run.open).decode(), run.last_tx, run.last_position, run.updated_at,
    )  # fmt: skip
