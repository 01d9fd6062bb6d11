"""The ``agent_states`` read model: each stateful agent's folded state within each run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, cast
from uuid import UUID

import asyncpg
import msgspec

from projections.engine import Projection, Tables
from runtime.agents.agent import Agent
from runtime.events.model import LogPosition, RecordedEvent
from runtime.events.model import registry as default_registry
from runtime.log.snapshots import Snapshot, SnapshotStore, decode_state, encode_state

_COLUMNS = (
    "run_id, agent, state, exact, event_count, last_tx, last_position, last_event_id, updated_at"
)


@dataclasses.dataclass(slots=True)
class _Fold:
    state: Any
    count: int = 0
    tx: int = 0
    position: int = 0
    event_id: UUID | None = None
    at: Any = None


class AgentStateProjection(Projection):
    """``Agent.initial_state()`` folded with ``Agent.evolve`` over every event of every
    run (table ``agent_states``, one row per run and stateful agent: those that
    override ``evolve``), as the worker folds ``ctx.state``.

    The state is stored as JSON (``state``, ``json`` and not ``jsonb``: the text as
    encoded, keys in their order, so a dict state decoded for the next batch is the
    very state the fold had), and a batch continues from it, decoded to the agent's
    ``state_type`` (else the type of its initial state). A state that
    does not survive that round trip (``exact`` false) is folded again from the
    run's events in the log instead, so the row never depends on how the log was
    cut into batches. Every ``snapshot_every`` events of a run a snapshot is saved
    (:mod:`runtime.log.snapshots`, in the same transaction), for ``ctx.state``,
    time travel and replay.
    """

    name: ClassVar[str] = "agent_state"
    version: ClassVar[int] = 2
    types: ClassVar[frozenset[str] | None] = None
    tables: ClassVar[dict[str, str]] = {
        "agent_states": (
            "(run_id uuid NOT NULL, agent text NOT NULL, state json, exact boolean NOT NULL,"
            " event_count bigint NOT NULL, last_tx bigint NOT NULL,"
            " last_position bigint NOT NULL, last_event_id uuid NOT NULL,"
            " updated_at timestamptz NOT NULL, PRIMARY KEY (run_id, agent))"
        )
    }

    def __init__(
        self,
        agents: Sequence[Agent] = (),
        *,
        snapshot_every: int = 100,
        log_schema: str | None = None,
    ) -> None:
        self.agents = [a for a in agents if type(a).evolve is not Agent.evolve]
        self.snapshot_every = snapshot_every
        #: The log's schema (snapshots and the refold of inexact states live there);
        #: by default the read schema without its ``_read`` suffix.
        self.log_schema = log_schema
        self._types = {a.name: _decode_type(a) for a in self.agents}

    def version_key(self) -> str:
        folds = ",".join(
            f"{a.name}={getattr(a, 'state_version', 1)}"
            for a in sorted(self.agents, key=lambda a: a.name)
        )
        return f"{self.version}:{folds}"

    def _log_schema(self, tables: Tables) -> str:
        if self.log_schema is not None:
            return self.log_schema
        return tables.schema.removesuffix("_read")

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], tables: Tables
    ) -> None:
        if not self.agents:
            return
        ids = list({e.run_id for e in events if e.run_id is not None})
        if not ids:
            return
        folds: dict[tuple[UUID, str], _Fold] = {}
        inexact: list[tuple[UUID, str, int, int]] = []
        for r in await conn.fetch(
            f"SELECT run_id, agent, state::text, exact, event_count, last_tx, last_position, "
            f"last_event_id, updated_at FROM {tables['agent_states']} "
            "WHERE run_id = ANY($1::uuid[])",
            ids,
        ):
            if r[1] not in self._types:
                continue  # an agent no longer in the app
            if r[3]:
                state = decode_state(r[2].encode(), self._types[r[1]])
                folds[(r[0], r[1])] = _Fold(state, r[4], r[5], r[6], r[7], r[8])
            else:
                inexact.append((r[0], r[1], r[5], r[6]))
        if inexact:
            await self._refold(conn, tables, inexact, folds)
        by_name = {a.name: a for a in self.agents}
        snapshots: list[Snapshot] = []
        every = self.snapshot_every
        for e in events:
            run_id = e.run_id
            if run_id is None:
                continue
            for name, agent in by_name.items():
                fold = folds.get((run_id, name))
                if fold is None:
                    fold = folds[(run_id, name)] = _Fold(agent.initial_state())
                fold.state = agent.evolve(fold.state, e)
                fold.count += 1
                fold.tx, fold.position, fold.event_id, fold.at = (
                    e.tx, e.position, e.event_id, e.recorded_at,
                )  # fmt: skip
                if every and fold.count % every == 0:
                    data = encode_state(fold.state, self._types[name])
                    if data is not None:
                        snapshots.append(
                            Snapshot(
                                run_id=run_id,
                                agent=name,
                                fold_version=getattr(agent, "fold_version", "v1"),
                                position=LogPosition(e.tx, e.position),
                                event_id=e.event_id,
                                event_count=fold.count,
                                state=data,
                            )
                        )
        rows = []
        for (run_id, name), f in folds.items():
            data = encode_state(f.state, self._types[name])
            if data is None:
                try:
                    shown = msgspec.json.encode(msgspec.to_builtins(f.state)).decode()
                except (TypeError, msgspec.MsgspecError):
                    shown = msgspec.json.encode({"unencodable": type(f.state).__name__}).decode()
                rows.append((run_id, name, shown, False, f.count, f.tx, f.position,
                             f.event_id, f.at))  # fmt: skip
            else:
                rows.append((run_id, name, data.decode(), True, f.count, f.tx, f.position,
                             f.event_id, f.at))  # fmt: skip
        t = tables["agent_states"]
        await conn.executemany(
            f"INSERT INTO {t} ({_COLUMNS}) VALUES ($1, $2, $3::json, $4, $5, $6, $7, $8, $9) "
            "ON CONFLICT (run_id, agent) DO UPDATE SET state = excluded.state, "
            "exact = excluded.exact, event_count = excluded.event_count, "
            "last_tx = excluded.last_tx, last_position = excluded.last_position, "
            "last_event_id = excluded.last_event_id, updated_at = excluded.updated_at",
            rows,
        )
        if snapshots:
            store = SnapshotStore(cast(asyncpg.Pool, None), self._log_schema(tables))
            await store.save(snapshots, conn=conn)

    async def _refold(
        self,
        conn: asyncpg.Connection,
        tables: Tables,
        inexact: list[tuple[UUID, str, int, int]],
        folds: dict[tuple[UUID, str], _Fold],
    ) -> None:
        """Fold again, from the log, the runs whose state the table cannot give back."""
        by_name = {a.name: a for a in self.agents}
        q = f'"{self._log_schema(tables)}"'
        for run_id, name, tx, position in inexact:
            agent = by_name[name]
            fold = _Fold(agent.initial_state())
            for r in await conn.fetch(
                "SELECT position, tx_id::text::bigint, event_id, stream_id, stream_version, "
                "event_type, schema_version, run_id, causation_id, producer, recorded_at, trace, "
                f"data::text, prev_hash, hash FROM {q}.events WHERE run_id = $1 "
                "AND (tx_id, position) <= ($2::text::xid8, $3::bigint) ORDER BY tx_id, position",
                run_id,
                str(tx),
                position,
            ):
                body = default_registry.decode(r[5], r[6], r[12])
                e = RecordedEvent(*r[:12], body, bytes(r[13]), bytes(r[14]))  # type: ignore[call-arg]
                fold.state = agent.evolve(fold.state, e)
                fold.count += 1
                fold.tx, fold.position, fold.event_id, fold.at = (
                    e.tx, e.position, e.event_id, e.recorded_at,
                )  # fmt: skip
            folds[(run_id, name)] = fold


def _decode_type(agent: Agent) -> Any:
    explicit = getattr(agent, "state_type", None)
    if explicit is not None:
        return explicit
    initial = agent.initial_state()
    return Any if initial is None else type(initial)
