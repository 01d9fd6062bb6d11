"""The read side's queries: what the query API and ``agentrt runs`` ask the read models.

Every query is parameterized SQL against the tables the built-in projections
maintain in ``settings.read_schema`` (see :mod:`projections.builtin`), except
:meth:`ReadModels.events`, which reads the log itself. Results are msgspec
structs (the API turns them into JSON and its OpenAPI schemas). Lists are pages
in a stable order with an opaque ``next_cursor`` (keyset pagination: a page is
one index range scan however deep it is).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar
from uuid import UUID

import asyncpg
import msgspec

from projections.errors import InvalidQuery, UnknownProjection, UnknownRun
from runtime.events.causation import causation_order
from runtime.events.model import LogPosition
from runtime.settings import Settings

T = TypeVar("T")

#: What ``usage(group_by=...)`` may group by.
USAGE_GROUPS = ("day", "agent", "model")
#: Run statuses (see :class:`projections.builtin.runs.RunsProjection`).
STATUSES = (
    "running",
    "waiting_for_approval",
    "completed",
    "failed",
    "dead_lettered",
    "budget_exceeded",
)
#: Largest page any list query returns.
MAX_LIMIT = 1000


class Page(msgspec.Struct, Generic[T], frozen=True):
    """One page of a list, newest first; pass ``next_cursor`` back for the next page
    (None: this is the last one)."""

    items: list[T]
    next_cursor: str | None = None


class ModelUsage(msgspec.Struct, frozen=True):
    """Tokens and cost of one model's calls within a run."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0


class RunRow(msgspec.Struct, frozen=True, kw_only=True):
    """A run: everything caused by one ingress event (its id is that event's id).

    ``status`` is one of running, waiting_for_approval, completed, failed,
    dead_lettered, budget_exceeded (defined in :mod:`projections.builtin.runs`).
    ``source`` is the root event's ``source`` attribute, else its producer.
    ``finished_at``/``duration_ms`` are the end of the run's last activation so far.
    ``position`` is where the projection last updated the row (``TX:POSITION``).
    """

    run_id: UUID
    source: str | None
    trigger_type: str | None
    status: str
    agents: list[str]
    started_at: datetime
    finished_at: datetime | None
    duration_ms: float | None
    error: str | None
    error_type: str | None
    usage: dict[str, ModelUsage]
    input_tokens: int
    output_tokens: int
    cost_usd: float
    llm_calls: int
    tool_calls: int
    retries: int
    activations: int
    events: int
    parent_run_id: UUID | None
    fork_step: int | None
    position: str
    updated_at: datetime
    #: State machine agent -> the run's current state in it (the ``machines`` read model).
    states: dict[str, str] = {}


class TimelineEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One event of a run, in causation order: a trigger precedes what it caused.

    ``parent`` is the event that caused this one when it belongs to the run (None
    for a root), ``depth`` its distance from its root (for a tree view). Step
    fields (``activation_id``, ``step``, ``kind``, ``name``, ``model``, tokens,
    cost) are set on ``step.recorded`` entries; ``activation_id`` and
    ``duration_ms`` on ``activation.completed`` too.
    """

    run_id: UUID
    position: int
    tx: int
    event_id: UUID
    event_type: str
    stream_id: str
    causation_id: UUID | None
    parent: UUID | None
    depth: int
    agent: str | None
    activation_id: UUID | None
    step: int | None
    kind: str | None
    name: str | None
    model: str | None
    duration_ms: float | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None
    recorded_at: datetime
    summary: str


class EventRow(msgspec.Struct, frozen=True, kw_only=True):
    """An event exactly as the log holds it: the envelope, the body as JSON, its hashes (hex)."""

    position: int
    tx: int
    event_id: UUID
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    run_id: UUID | None
    causation_id: UUID | None
    producer: str | None
    recorded_at: datetime
    trace: str | None
    body: Any
    prev_hash: str
    hash: str


class AgentStateRow(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's folded state (``Agent.evolve``) within a run, after ``event_count`` of
    its events; ``position`` (``TX:POSITION``) is the last event folded."""

    run_id: UUID
    agent: str
    state: Any
    event_count: int
    position: str
    updated_at: datetime


class MachineRow(msgspec.Struct, frozen=True, kw_only=True):
    """Where a state machine agent is within a run: its current ``state``, the
    ``previous`` one, how many ``transitions`` it took and how many were ``refused``
    (the last as ``from -> to``)."""

    run_id: UUID
    agent: str
    state: str
    previous: str | None
    transitions: int
    refused: int
    last_refused: str | None
    last_reason: str | None
    position: str
    updated_at: datetime


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """Who did what, when: one state transition, approval, model or tool call, circuit
    transition, dead letter, redrive, budget stop or activation completion.

    ``action`` is a stable name (llm.call, tool.call, event.emitted, event.received,
    approval.requested, approval.decided, timer.scheduled, timer.fired,
    circuit.transitioned, state.transitioned, state.transition_refused,
    activation.dead_lettered, dead_letter.redriven,
    run.budget_exceeded, activation.completed, run.forked); ``actor`` the agent,
    the producer, the approver or ``breaker``; ``subject`` the tool, model,
    approval subject or circuit it is about.
    """

    position: int
    tx: int
    run_id: UUID | None
    at: datetime
    actor: str
    action: str
    event_type: str
    event_id: UUID
    subject: str | None
    summary: str
    detail: Any


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens and cost of model calls; ``day``/``agent``/``model`` are None when not
    grouped by. Days are UTC."""

    day: date | None = None
    agent: str | None = None
    model: str | None = None
    calls: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float
    #: Model steps the agents' response caches answered (not in ``calls``: no model ran),
    #: and the tokens and cost of the calls they repeated.
    cached_calls: int = 0
    saved_tokens: int = 0
    saved_cost_usd: float = 0.0


class DeadLetterRow(msgspec.Struct, frozen=True, kw_only=True):
    """An activation that failed too often; ``status`` is open until redriven
    (``redriven_at``, the redrive's ``redriven_generation`` and ``forced``)."""

    position: int
    tx: int
    event_id: UUID
    agent: str
    trigger_id: UUID
    trigger_type: str
    activation_id: UUID
    run_id: UUID | None
    stream: str
    entry_id: str
    error_type: str
    error: str
    error_code: str | None
    deliveries: int
    dead_lettered_at: datetime
    generation: int
    status: str
    redriven_at: datetime | None
    redriven_generation: int | None
    forced: bool


class CircuitTransitionRow(msgspec.Struct, frozen=True, kw_only=True):
    """A tool's circuit breaker changing state (``run_id``: the run whose call tripped it)."""

    position: int
    tx: int
    event_id: UUID
    name: str
    from_state: str
    to_state: str
    failures: int
    reason: str
    at: datetime
    run_id: UUID | None


# -- cursors ------------------------------------------------------------------------


def encode_cursor(*values: Any) -> str:
    """An opaque keyset cursor: the sort key of a page's last row."""
    raw = msgspec.json.encode(
        [v.isoformat() if isinstance(v, datetime) else str(v) for v in values]
    )
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *kinds: type) -> tuple[Any, ...]:
    """The values :func:`encode_cursor` wrote, as ``kinds``; InvalidQuery if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = msgspec.json.decode(raw, type=list[str])
        if len(values) != len(kinds):
            raise ValueError("wrong length")
        return tuple(_parse(v, k) for v, k in zip(values, kinds, strict=True))
    except (ValueError, binascii.Error, msgspec.DecodeError):
        raise InvalidQuery(f"cursor {cursor[:80]!r} is not one this query returned") from None


def _parse(value: str, kind: type) -> Any:
    if kind is datetime:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("naive time")
        return parsed
    if kind is UUID:
        return UUID(value)
    if kind is int:
        return _bigint(int(value))
    return value


#: Positions and transaction ids are PostgreSQL bigints: a cursor past them is refused here,
#: not left to the server (PostgreSQL 15 wraps an xid8 past 64 bits instead of failing).
_BIGINT_MAX = 2**63 - 1


def _bigint(value: int) -> int:
    if not 0 <= value <= _BIGINT_MAX:
        raise ValueError(f"{value} is outside 0..{_BIGINT_MAX}")
    return value


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _range(since: datetime | None, until: datetime | None) -> None:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidQuery(f"{name} must carry a time zone (got {value.isoformat()})")
    if since is not None and until is not None and since > until:
        raise InvalidQuery(f"since ({since.isoformat()}) is after until ({until.isoformat()})")


class _Where:
    """A WHERE clause built from optional filters, every value a parameter."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[Any] = []

    def add(self, clause: str, *values: Any) -> None:
        """``clause`` with ``{}`` for each value's parameter ($n)."""
        marks = []
        for value in values:
            self.args.append(value)
            marks.append(f"${len(self.args)}")
        self.clauses.append(clause.format(*marks))

    def sql(self) -> str:
        return f" WHERE {' AND '.join(self.clauses)}" if self.clauses else ""

    def param(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


_RUN_COLUMNS = (
    "run_id, source, trigger_type, status, agents, started_at, finished_at, duration_ms, "
    "error, error_type, usage::text, input_tokens, output_tokens, cost_usd, llm_calls, "
    "tool_calls, retries, activations, events, parent_run_id, fork_step, last_tx, "
    "last_position, updated_at"
)
_usage_decoder = msgspec.json.Decoder(dict[str, ModelUsage])


def _run_row(r: asyncpg.Record) -> RunRow:
    return RunRow(
        run_id=r[0], source=r[1], trigger_type=r[2], status=r[3], agents=list(r[4]),
        started_at=r[5], finished_at=r[6], duration_ms=r[7], error=r[8], error_type=r[9],
        usage=_usage_decoder.decode(r[10]), input_tokens=r[11], output_tokens=r[12],
        cost_usd=r[13], llm_calls=r[14], tool_calls=r[15], retries=r[16], activations=r[17],
        events=r[18], parent_run_id=r[19], fork_step=r[20], position=f"{r[21]}:{r[22]}",
        updated_at=r[23],
    )  # fmt: skip


_TIMELINE_COLUMNS = (
    "run_id, position, tx, event_id, event_type, stream_id, causation_id, agent, "
    "activation_id, step, kind, name, model, duration_ms, input_tokens, output_tokens, "
    "cost_usd, recorded_at, summary"
)


class ReadModels:
    """The queries of the read models (and of the log, for a run's raw events)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self.settings = settings
        self.schema = settings.read_schema
        r = f'"{settings.read_schema}"'
        self._t = {
            name: f"{r}.{name}"
            for name in (
                "runs", "timeline", "audit_log", "usage_daily", "dead_letters",
                "circuit_transitions", "agent_states", "projection_checkpoints",
                "machine_states",
            )
        }  # fmt: skip
        self._log = f'"{settings.db_schema}".events'

    async def _fetch(self, table: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            rows: list[asyncpg.Record] = await self._pool.fetch(sql, *args)
        except asyncpg.UndefinedTableError:
            raise UnknownProjection(
                f"the read model {table!r} does not exist yet in schema {self.schema!r}: "
                "run `agentrt projector` (or `agentrt projections rebuild`) first"
            ) from None
        return rows

    # -- runs -----------------------------------------------------------------------

    async def runs(
        self,
        *,
        status: str | None = None,
        agent: str | None = None,
        source: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        min_cost: float | None = None,
        max_cost: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[RunRow]:
        """Runs newest first (by ``started_at``, then id), filtered by status, an agent
        involved, source, start time (``since`` inclusive, ``until`` exclusive) and cost
        in USD (both bounds inclusive)."""
        _limit(limit)
        _range(since, until)
        if status is not None and status not in STATUSES:
            raise InvalidQuery(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        w = _Where()
        if status is not None:
            w.add("status = {}", status)
        if agent is not None:
            w.add("agents @> ARRAY[{}]::text[]", agent)
        if source is not None:
            w.add("source = {}", source)
        if since is not None:
            w.add("started_at >= {}", since)
        if until is not None:
            w.add("started_at < {}", until)
        if min_cost is not None:
            w.add("cost_usd >= {}", min_cost)
        if max_cost is not None:
            w.add("cost_usd <= {}", max_cost)
        if cursor is not None:
            at, run_id = decode_cursor(cursor, datetime, UUID)
            w.add("(started_at, run_id) < ({}, {})", at, run_id)
        n = w.param(limit + 1)
        rows = await self._fetch(
            "runs",
            f"SELECT {_RUN_COLUMNS} FROM {self._t['runs']}{w.sql()} "
            f"ORDER BY started_at DESC, run_id DESC LIMIT {n}",
            *w.args,
        )
        items = await self._with_states([_run_row(r) for r in rows[:limit]])
        more = len(rows) > limit
        last = items[-1] if items else None
        return Page(items, encode_cursor(last.started_at, last.run_id) if more and last else None)

    async def run(self, run_id: UUID) -> RunRow:
        """One run; :class:`UnknownRun` says whether the log has it (not projected yet) or not."""
        rows = await self._fetch(
            "runs", f"SELECT {_RUN_COLUMNS} FROM {self._t['runs']} WHERE run_id = $1", run_id
        )
        if not rows:
            await self._unknown_run(run_id, "runs")
        [row] = await self._with_states([_run_row(rows[0])])
        return row

    async def _with_states(self, rows: list[RunRow]) -> list[RunRow]:
        """``rows`` with their state machines' states (none while the ``machines`` read
        model does not exist: a deployment that never ran a state machine)."""
        if not rows:
            return rows
        try:
            found = await self._pool.fetch(
                f"SELECT run_id, agent, state FROM {self._t['machine_states']} "
                "WHERE run_id = ANY($1::uuid[]) ORDER BY agent",
                [r.run_id for r in rows],
            )
        except asyncpg.UndefinedTableError:
            return rows
        states: dict[UUID, dict[str, str]] = {}
        for f in found:
            states.setdefault(f[0], {})[f[1]] = f[2]
        return [msgspec.structs.replace(r, states=states[r.run_id]) if r.run_id in states
                else r for r in rows]  # fmt: skip

    async def machines(self, run_id: UUID) -> list[MachineRow]:
        """The run's state machines, by agent name (empty: none moved or refused yet, or
        the ``machines`` read model was never built)."""
        try:
            rows = await self._pool.fetch(
                "SELECT run_id, agent, state, previous, transitions, refused, last_refused, "
                f"last_reason, last_tx, last_position, updated_at "
                f"FROM {self._t['machine_states']} WHERE run_id = $1 ORDER BY agent",
                run_id,
            )
        except asyncpg.UndefinedTableError:
            return []
        return [
            MachineRow(run_id=r[0], agent=r[1], state=r[2], previous=r[3], transitions=r[4],
                       refused=r[5], last_refused=r[6], last_reason=r[7],
                       position=f"{r[8]}:{r[9]}", updated_at=r[10])
            for r in rows
        ]  # fmt: skip

    async def _unknown_run(self, run_id: UUID, projection: str) -> None:
        """Raise :class:`UnknownRun`: "not projected yet" when the log has the run."""
        in_log = await self._pool.fetchval(
            f"SELECT 1 FROM {self._log} WHERE run_id = $1 LIMIT 1", run_id
        )
        if in_log is None:
            raise UnknownRun(f"no such run: {run_id}")
        at = await self._checkpoint(projection)
        raise UnknownRun(f"run {run_id} is not projected yet (projector at position {at})")

    async def _checkpoint(self, projection: str) -> str:
        try:
            row = await self._pool.fetchrow(
                f"SELECT * FROM {self._t['projection_checkpoints']} WHERE name = $1", projection
            )
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
            return "none: it has not run"
        if row is None:
            return "none: it has not run"
        keys = set(row.keys())
        if {"tx_id", "position"} <= keys:
            return str(LogPosition(int(row["tx_id"]), int(row["position"])))
        if {"tx", "position"} <= keys:
            return str(LogPosition(int(row["tx"]), int(row["position"])))
        return str(row.get("position", "?"))

    # -- one run's events -------------------------------------------------------------

    async def timeline(self, run_id: UUID) -> list[TimelineEntry]:
        """Every event of the run, depth-first by causation (a trigger before what it
        caused, siblings in log order), each with its ``depth`` and ``parent``."""
        rows = await self._fetch(
            "timeline",
            f"SELECT {_TIMELINE_COLUMNS} FROM {self._t['timeline']} WHERE run_id = $1 "
            "ORDER BY tx, position",
            run_id,
        )
        if not rows:
            await self._unknown_run(run_id, "timeline")
        out = []
        for i, depth, parent in causation_order(rows, id_at=3, cause_at=6):
            r = rows[i]
            out.append(
                TimelineEntry(
                    run_id=r[0],
                    position=r[1],
                    tx=r[2],
                    event_id=r[3],
                    event_type=r[4],
                    stream_id=r[5],
                    causation_id=r[6],
                    parent=parent,
                    depth=depth,
                    agent=r[7],
                    activation_id=r[8],
                    step=r[9],
                    kind=r[10],
                    name=r[11],
                    model=r[12],
                    duration_ms=r[13],
                    input_tokens=r[14],
                    output_tokens=r[15],
                    cost_usd=r[16],
                    recorded_at=r[17],
                    summary=r[18],
                )
            )
        return out

    async def events(
        self, run_id: UUID, *, after: str | None = None, limit: int = 1000
    ) -> Page[EventRow]:
        """The run's events straight from the log, in log order, ``limit`` at a time
        (``after``: a previous page's ``next_cursor``, ``TX:POSITION``)."""
        _limit(limit)
        start = LogPosition(0, 0)
        if after is not None:
            try:
                start = LogPosition.parse(after)
                _bigint(start.tx), _bigint(start.position)
            except ValueError as exc:
                raise InvalidQuery(str(exc)) from None
        rows = await self._pool.fetch(
            "SELECT position, tx_id::text::bigint, event_id, stream_id, stream_version, "
            "event_type, schema_version, run_id, causation_id, producer, recorded_at, trace, "
            f"data::text, prev_hash, hash FROM {self._log} WHERE run_id = $1 "
            "AND (tx_id, position) > ($2::text::xid8, $3::bigint) "
            "AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY tx_id, position LIMIT $4",
            run_id,
            str(start.tx),
            start.position,
            limit + 1,
        )
        if not rows and after is None:
            raise UnknownRun(f"no such run: {run_id}")
        items = [
            EventRow(
                position=r[0],
                tx=r[1],
                event_id=r[2],
                stream_id=r[3],
                stream_version=r[4],
                event_type=r[5],
                schema_version=r[6],
                run_id=r[7],
                causation_id=r[8],
                producer=r[9],
                recorded_at=r[10],
                trace=r[11],
                body=msgspec.json.decode(r[12]),
                prev_hash=bytes(r[13]).hex(),
                hash=bytes(r[14]).hex(),
            )
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        return Page(items, f"{items[-1].tx}:{items[-1].position}" if more and items else None)

    async def agent_states(self, run_id: UUID) -> list[AgentStateRow]:
        """The current folded state of each stateful agent within the run, by agent name."""
        rows = await self._fetch(
            "agent_states",
            "SELECT run_id, agent, state::text, event_count, last_tx, last_position, updated_at "
            f"FROM {self._t['agent_states']} WHERE run_id = $1 ORDER BY agent",
            run_id,
        )
        if not rows:
            in_runs = await self._fetch(
                "runs", f"SELECT 1 FROM {self._t['runs']} WHERE run_id = $1", run_id
            )
            if not in_runs:
                await self._unknown_run(run_id, "runs")
        return [
            AgentStateRow(
                run_id=r[0],
                agent=r[1],
                state=msgspec.json.decode(r[2]),
                event_count=r[3],
                position=f"{r[4]}:{r[5]}",
                updated_at=r[6],
            )
            for r in rows
        ]

    # -- across runs ---------------------------------------------------------------

    async def audit(
        self,
        *,
        run_id: UUID | None = None,
        agent: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        text: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[AuditEntry]:
        """Audit entries newest first (log order), filtered by run, actor (``agent``),
        action or event type (``type``), time (``since`` inclusive, ``until``
        exclusive) and words of the summary (``text``, web-search syntax: ``"a b"``,
        ``-word``, ``or``)."""
        _limit(limit)
        _range(since, until)
        w = _Where()
        if run_id is not None:
            w.add("run_id = {}", run_id)
        if agent is not None:
            w.add("actor = {}", agent)
        if type is not None:
            w.add("(action = {0} OR event_type = {0})", type)
        if since is not None:
            w.add("at >= {}", since)
        if until is not None:
            w.add("at < {}", until)
        if text is not None and text.strip():
            w.add("to_tsvector('simple', summary) @@ websearch_to_tsquery('simple', {})", text)
        if cursor is not None:
            tx, position = decode_cursor(cursor, int, int)
            w.add("(tx, position) < ({}, {})", tx, position)
        n = w.param(limit + 1)
        rows = await self._fetch(
            "audit_log",
            "SELECT position, tx, run_id, at, actor, action, event_type, event_id, subject, "
            f"summary, detail::text FROM {self._t['audit_log']}{w.sql()} "
            f"ORDER BY tx DESC, position DESC LIMIT {n}",
            *w.args,
        )
        items = [
            AuditEntry(
                position=r[0],
                tx=r[1],
                run_id=r[2],
                at=r[3],
                actor=r[4],
                action=r[5],
                event_type=r[6],
                event_id=r[7],
                subject=r[8],
                summary=r[9],
                detail=msgspec.json.decode(r[10]),
            )
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].tx, items[-1].position) if more else None)

    async def usage(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        agent: str | None = None,
        model: str | None = None,
        group_by: Sequence[str] = USAGE_GROUPS,
    ) -> list[UsageRow]:
        """Tokens and cost summed over ``group_by`` (any of day, agent, model; none: one
        total row), for days from ``since`` to ``until`` (both inclusive, UTC)."""
        groups = list(dict.fromkeys(group_by))
        bad = [g for g in groups if g not in USAGE_GROUPS]
        if bad:
            raise InvalidQuery(f"group_by takes {', '.join(USAGE_GROUPS)}; not {', '.join(bad)}")
        since_day = since.date() if isinstance(since, datetime) else since
        until_day = until.date() if isinstance(until, datetime) else until
        if since_day is not None and until_day is not None and since_day > until_day:
            raise InvalidQuery(f"since ({since_day}) is after until ({until_day})")
        w = _Where()
        if since_day is not None:
            w.add("day >= {}", since_day)
        if until_day is not None:
            w.add("day <= {}", until_day)
        if agent is not None:
            w.add("agent = {}", agent)
        if model is not None:
            w.add("model = {}", model)
        keys = [g for g in USAGE_GROUPS if g in groups]
        select = ", ".join(keys + [f"NULL AS {g}" for g in USAGE_GROUPS if g not in keys])
        tail = f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else ""
        rows = await self._fetch(
            "usage_daily",
            f"SELECT * FROM (SELECT {select}, sum(calls), sum(input_tokens), sum(output_tokens), "
            "sum(cache_creation_input_tokens), sum(cache_read_input_tokens), sum(cost_usd), "
            "sum(cached_calls), sum(saved_tokens), sum(saved_cost_usd) "
            f"FROM {self._t['usage_daily']}{w.sql()}{tail}) s",
            *w.args,
        )
        out = []
        for r in rows:
            if r[3] is None:  # no rows at all, grouped by nothing
                continue
            named = dict(zip(("day", "agent", "model"), (r["day"], r["agent"], r["model"]),
                             strict=True))  # fmt: skip
            out.append(
                UsageRow(
                    day=named["day"],
                    agent=named["agent"],
                    model=named["model"],
                    calls=int(r[3]),
                    input_tokens=int(r[4]),
                    output_tokens=int(r[5]),
                    cache_creation_input_tokens=int(r[6]),
                    cache_read_input_tokens=int(r[7]),
                    cost_usd=float(r[8] if isinstance(r[8], Decimal) else r[8] or 0),
                    cached_calls=int(r[9]),
                    saved_tokens=int(r[10]),
                    saved_cost_usd=float(r[11] or 0),
                )
            )
        return out

    async def dead_letters(
        self,
        *,
        agent: str | None = None,
        run_id: UUID | None = None,
        status: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[DeadLetterRow]:
        """Dead letters newest first, by agent, run and status (open or redriven)."""
        _limit(limit)
        if status is not None and status not in ("open", "redriven"):
            raise InvalidQuery(f"status must be open or redriven, got {status!r}")
        w = _Where()
        if agent is not None:
            w.add("agent = {}", agent)
        if run_id is not None:
            w.add("run_id = {}", run_id)
        if status is not None:
            w.add("status = {}", status)
        if cursor is not None:
            tx, position = decode_cursor(cursor, int, int)
            w.add("(tx, position) < ({}, {})", tx, position)
        n = w.param(limit + 1)
        rows = await self._fetch(
            "dead_letters",
            "SELECT position, tx, event_id, agent, trigger_id, trigger_type, activation_id, "
            "run_id, stream, entry_id, error_type, error, error_code, deliveries, "
            "dead_lettered_at, generation, status, redriven_at, redriven_generation, forced "
            f"FROM {self._t['dead_letters']}{w.sql()} ORDER BY tx DESC, position DESC LIMIT {n}",
            *w.args,
        )
        items = [DeadLetterRow(**dict(r)) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].tx, items[-1].position) if more else None)

    async def circuit_states(self) -> list[CircuitTransitionRow]:
        """Each circuit's last transition (its current state), by name; a circuit that
        never tripped has none (it is closed)."""
        rows = await self._fetch(
            "circuit_transitions",
            "SELECT DISTINCT ON (name) position, tx, event_id, name, from_state, to_state, "
            f"failures, reason, at, run_id FROM {self._t['circuit_transitions']} "
            "ORDER BY name, tx DESC, position DESC",
        )
        return [CircuitTransitionRow(**dict(r)) for r in rows]

    async def circuit_transitions(
        self,
        *,
        name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[CircuitTransitionRow]:
        """Circuit-breaker transitions newest first, by circuit (tool) name and time."""
        _limit(limit)
        _range(since, until)
        w = _Where()
        if name is not None:
            w.add("name = {}", name)
        if since is not None:
            w.add("at >= {}", since)
        if until is not None:
            w.add("at < {}", until)
        if cursor is not None:
            tx, position = decode_cursor(cursor, int, int)
            w.add("(tx, position) < ({}, {})", tx, position)
        n = w.param(limit + 1)
        rows = await self._fetch(
            "circuit_transitions",
            "SELECT position, tx, event_id, name, from_state, to_state, failures, reason, at, "
            f"run_id FROM {self._t['circuit_transitions']}{w.sql()} "
            f"ORDER BY tx DESC, position DESC LIMIT {n}",
            *w.args,
        )
        items = [CircuitTransitionRow(**dict(r)) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].tx, items[-1].position) if more else None)
