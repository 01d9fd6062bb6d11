"""Tamper evidence: seal the stream heads, and verify every chain and seal."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from uuid import UUID

import asyncpg

from runtime.log import chain


@dataclasses.dataclass(frozen=True)
class Problem:
    """One way the stored log differs from what was written."""

    kind: str  # "altered" | "missing" | "broken_link" | "seal"
    detail: str
    stream_id: str | None = None
    stream_version: int | None = None
    event_id: UUID | None = None
    position: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.stream_id is not None:
            where = f"stream {self.stream_id!r} version {self.stream_version}"
            if self.event_id is not None:
                where += f" (event {self.event_id}, position {self.position})"
            where += ": "
        return f"{self.kind}: {where}{self.detail}"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    events: int
    streams: int
    seals: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None


@dataclasses.dataclass(frozen=True)
class SealResult:
    seal_id: int
    upto_tx: int
    event_count: int
    head_count: int
    digest: bytes


def _q(schema: str) -> str:
    return '"' + schema.replace('"', '""') + '"'


async def seal(conn: asyncpg.Connection, schema: str = "agentrt") -> SealResult | None:
    """Record the heads of every stream changed since the last seal.

    The seal covers exactly the events below the oldest running transaction,
    a set no later commit can change. Returns ``None`` if nothing was appended
    since the last seal.
    """
    q = _q(schema)
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"agentrt.seal.{schema}")
        horizon = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())")
        last = await conn.fetchrow(
            f"SELECT upto_tx, event_count, digest FROM {q}.seals ORDER BY seal_id DESC LIMIT 1"
        )
        from_tx = last["upto_tx"] if last else 0
        prev_digest = last["digest"] if last else chain.GENESIS
        if horizon <= from_tx:
            return None
        heads = await conn.fetch(
            f"SELECT DISTINCT ON (stream_id) stream_id, stream_version, hash FROM {q}.events "
            "WHERE tx_id >= $1 AND tx_id < $2 ORDER BY stream_id, stream_version DESC",
            from_tx,
            horizon,
        )
        if not heads:
            return None
        added = await conn.fetchval(
            f"SELECT count(*) FROM {q}.events WHERE tx_id >= $1 AND tx_id < $2", from_tx, horizon
        )
        count = (last["event_count"] if last else 0) + added
        head_list = [(r["stream_id"], r["stream_version"], r["hash"]) for r in heads]
        digest = chain.heads_digest(prev_digest, head_list)
        seal_id = await conn.fetchval(
            f"INSERT INTO {q}.seals (upto_tx, from_tx, event_count, head_count, prev_digest, "
            "digest) VALUES ($1, $2, $3, $4, $5, $6) RETURNING seal_id",
            horizon,
            from_tx,
            count,
            len(head_list),
            prev_digest,
            digest,
        )
        await conn.copy_records_to_table(
            "seal_heads",
            schema_name=schema,
            columns=["seal_id", "stream_id", "stream_version", "hash"],
            records=[(seal_id, s, v, h) for s, v, h in head_list],
        )
    return SealResult(seal_id, horizon, count, len(head_list), digest)


async def verify(
    conn: asyncpg.Connection,
    schema: str = "agentrt",
    *,
    on_progress: Callable[[int], None] | None = None,
    max_problems: int = 1000,
) -> VerifyReport:
    """Walk every stream's chain and every seal; report what does not hold.

    Problems come back in log order (lowest position first), so ``first``
    names the earliest altered or missing event.
    """
    q = _q(schema)
    problems: list[Problem] = []
    events = streams = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        stream: str | None = None
        expected = 1
        prev = chain.GENESIS
        cursor = conn.cursor(
            "SELECT stream_id, stream_version, event_id, position, event_type, schema_version, "
            "run_id, causation_id, producer, recorded_at, trace, data, prev_hash, hash "
            f"FROM {q}.events ORDER BY stream_id, stream_version",
            prefetch=2000,
        )
        async for r in cursor:
            sid, version = r["stream_id"], r["stream_version"]
            if sid != stream:
                stream, expected, prev = sid, 1, chain.GENESIS
                streams += 1
            events += 1
            if on_progress is not None and events % 1000 == 0:
                on_progress(events)
            if len(problems) >= max_problems:
                continue
            where = {"stream_id": sid, "event_id": r["event_id"], "position": r["position"]}
            if version != expected:
                # Named by the first missing version; ordered by the survivor after it.
                problems.append(
                    Problem(
                        "missing",
                        f"{version - expected} event(s) before version {version} are gone",
                        stream_id=sid,
                        stream_version=expected,
                        position=r["position"],
                    )
                )
            elif r["prev_hash"] != prev:
                problems.append(
                    Problem(
                        "broken_link",
                        "prev_hash does not match the previous event's hash",
                        stream_version=version,
                        **where,
                    )
                )
            content = chain.content_hash(
                event_id=r["event_id"],
                event_type=r["event_type"],
                schema_version=r["schema_version"],
                run_id=r["run_id"],
                causation_id=r["causation_id"],
                producer=r["producer"],
                recorded_at=r["recorded_at"],
                trace=r["trace"],
                data=r["data"].encode(),
            )
            if chain.link(r["prev_hash"], version, content, sid) != r["hash"]:
                problems.append(
                    Problem(
                        "altered",
                        "stored content does not match its hash",
                        stream_version=version,
                        **where,
                    )
                )
            prev = r["hash"]
            expected = version + 1
        if on_progress is not None:
            on_progress(events)
        seals = await _verify_seals(conn, q, problems)
    problems.sort(key=lambda p: (p.position is None, p.position or 0))
    return VerifyReport(events, streams, seals, problems)


async def _verify_seals(conn: asyncpg.Connection, q: str, problems: list[Problem]) -> int:
    seals = await conn.fetch(
        f"SELECT seal_id, upto_tx, event_count, prev_digest, digest FROM {q}.seals ORDER BY seal_id"
    )
    prev_digest = chain.GENESIS
    for s in seals:
        heads = await conn.fetch(
            f"SELECT h.stream_id, h.stream_version, h.hash, e.hash AS actual, e.event_id, "
            f"e.position FROM {q}.seal_heads h LEFT JOIN {q}.events e "
            "ON e.stream_id = h.stream_id AND e.stream_version = h.stream_version "
            "WHERE h.seal_id = $1",
            s["seal_id"],
        )
        digest = chain.heads_digest(
            s["prev_digest"], [(h["stream_id"], h["stream_version"], h["hash"]) for h in heads]
        )
        if s["prev_digest"] != prev_digest or digest != s["digest"]:
            problems.append(Problem("seal", f"seal {s['seal_id']} does not match its digest chain"))
        prev_digest = s["digest"]
        for h in heads:
            if h["actual"] is None:
                problems.append(
                    Problem(
                        "missing",
                        f"sealed as the stream's head by seal {s['seal_id']}, now gone",
                        stream_id=h["stream_id"],
                        stream_version=h["stream_version"],
                    )
                )
            elif h["actual"] != h["hash"]:
                problems.append(
                    Problem(
                        "altered",
                        f"hash differs from the one seal {s['seal_id']} recorded",
                        stream_id=h["stream_id"],
                        stream_version=h["stream_version"],
                        event_id=h["event_id"],
                        position=h["position"],
                    )
                )
    if seals:
        last = seals[-1]
        count = await conn.fetchval(
            f"SELECT count(*) FROM {q}.events WHERE tx_id < $1", last["upto_tx"]
        )
        if count != last["event_count"]:
            problems.append(
                Problem(
                    "missing" if count < last["event_count"] else "seal",
                    f"seal {last['seal_id']} covers {last['event_count']} events, "
                    f"the log now holds {count} below its horizon",
                )
            )
    return len(seals)
