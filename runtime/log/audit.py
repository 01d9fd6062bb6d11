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

    kind: str  # "altered" | "missing" | "broken_link" | "order" | "seal"
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
    a set no later commit can change, and commits their order (see
    :mod:`runtime.log.chain`). The database computes it (``seal_log()``, which
    runs as the log's owner: the caller needs no privilege on the seal
    tables), under a lock taken before it reads the last seal, so concurrent
    sealers never fork the chain. Returns ``None`` if nothing was appended
    since the last seal.
    """
    sql = f"SELECT * FROM {_q(schema)}.seal_log()"
    if conn.is_in_transaction():
        # The caller's transaction must be READ COMMITTED (seal_log says so if not).
        row = await conn.fetchrow(sql)
    else:
        async with conn.transaction(isolation="read_committed"):
            row = await conn.fetchrow(sql)
    if row is None:
        return None
    seal_id, upto_tx, count, head_count, digest = row
    return SealResult(seal_id, upto_tx, count, head_count, digest)


async def verify(
    conn: asyncpg.Connection,
    schema: str = "agentrt",
    *,
    on_progress: Callable[[int], None] | None = None,
    max_problems: int = 1000,
    kept_digest: bytes | None = None,
) -> VerifyReport:
    """Walk every stream's chain, the log in commit order, and every seal.

    Beside altered and missing events, ``order`` problems name rows whose
    ``tx_id`` or ``position`` was rewritten: a ``tx_id`` no committed
    transaction had, a stream whose positions do not grow with its versions,
    a sealed range that gained or lost events or (format 2 seals) whose
    commit order changed. With ``kept_digest`` (a seal digest kept outside
    the database, as ``agentrt audit seal`` prints it) the verified seal chain
    must contain that very seal: a rewrite of the events and seals up to it,
    digests recomputed, leaves it out. Problems come back in log order
    (lowest position first), so ``first`` names the earliest altered or
    missing event.
    """
    q = _q(schema)
    problems: list[Problem] = []
    events = streams = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        stream: str | None = None
        expected = 1
        prev = chain.GENESIS
        last_position = 0
        cursor = conn.cursor(
            "SELECT stream_id, stream_version, event_id, position, event_type, schema_version, "
            "run_id, causation_id, producer, recorded_at, trace, data, prev_hash, hash "
            f"FROM {q}.events ORDER BY stream_id, stream_version",
            prefetch=2000,
        )
        async for r in cursor:
            sid, version = r["stream_id"], r["stream_version"]
            if sid != stream:
                stream, expected, prev, last_position = sid, 1, chain.GENESIS, 0
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
            if r["position"] <= last_position:
                # Each version is inserted after the one before it exists, and
                # positions are drawn in insertion order.
                problems.append(
                    Problem(
                        "order",
                        f"position is not after the previous version's ({last_position}): "
                        "the log's order was rewritten",
                        stream_version=version,
                        **where,
                    )
                )
            last_position = r["position"]
            prev = r["hash"]
            expected = version + 1
        if on_progress is not None:
            on_progress(events)
        seal_rows = await _seals(conn, schema)
        await _verify_order(conn, q, seal_rows, problems, max_problems)
        seals = await _verify_seals(conn, q, seal_rows, problems)
        if kept_digest is not None and all(s["digest"] != kept_digest for s in seal_rows):
            problems.append(
                Problem(
                    "seal",
                    f"no seal has the digest kept outside the database ({kept_digest.hex()}): "
                    "the seals were rewritten, or it is from another log",
                )
            )
    problems.sort(key=lambda p: (p.position is None, p.position or 0))
    return VerifyReport(events, streams, seals, problems)


async def _seals(conn: asyncpg.Connection, schema: str) -> list[asyncpg.Record]:
    q = _q(schema)
    has_format = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = $1::regclass "
        "AND attname = 'order_digest' AND NOT attisdropped)",
        f"{q}.seals",
    )
    extra = "format, order_digest" if has_format else "1 AS format, NULL::bytea AS order_digest"
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT seal_id, from_tx, upto_tx, event_count, prev_digest, digest, {extra} "
        f"FROM {q}.seals ORDER BY seal_id"
    )
    return rows


async def _verify_order(
    conn: asyncpg.Connection,
    q: str,
    seals: list[asyncpg.Record],
    problems: list[Problem],
    max_problems: int,
) -> None:
    """Walk the log in commit order: every ``tx_id`` possible, every seal's range intact.

    A visible row whose ``tx_id`` is not a transaction that committed before
    this snapshot (a special id, one still running, one not yet assigned) was
    written or moved by hand. Each seal's range ``[from_tx, upto_tx)`` must
    hold the events it counted, in the order it sealed (format 2).
    """
    counts = [0] * len(seals)
    orders = [chain.OrderDigest() for _ in seals]
    uptos = [s["upto_tx"] for s in seals]
    i = 0
    cursor = conn.cursor(
        "SELECT tx_id, position, stream_id, stream_version, event_id, "
        "(tx_id < '3'::xid8 OR tx_id >= pg_snapshot_xmax(pg_current_snapshot()) "
        " OR NOT pg_visible_in_snapshot(tx_id, pg_current_snapshot())) AS impossible "
        f"FROM {q}.events ORDER BY tx_id, position",
        prefetch=5000,
    )
    async for r in cursor:
        tx = r["tx_id"]
        if r["impossible"] and len(problems) < max_problems:
            problems.append(
                Problem(
                    "order",
                    f"tx_id {tx} is not a transaction that committed: the row was written "
                    "or moved by hand",
                    stream_id=r["stream_id"],
                    stream_version=r["stream_version"],
                    event_id=r["event_id"],
                    position=r["position"],
                )
            )
        while i < len(seals) and tx >= uptos[i]:
            i += 1
        if i < len(seals):
            counts[i] += 1
            if seals[i]["format"] >= 2:
                orders[i].add(tx, r["position"], r["event_id"])
    before = 0
    for n, s in enumerate(seals):
        expected = s["event_count"] - before
        before = s["event_count"]
        span = f"tx_id {s['from_tx']}..{s['upto_tx']}"
        if counts[n] != expected:
            problems.append(
                Problem(
                    "missing" if counts[n] < expected else "order",
                    f"seal {s['seal_id']} covers {expected} events ({span}), "
                    f"the log now holds {counts[n]} there",
                )
            )
        elif s["format"] >= 2 and orders[n].digest() != s["order_digest"]:
            problems.append(
                Problem(
                    "order",
                    f"seal {s['seal_id']}: the events of {span} are no longer in the commit "
                    "order (tx_id, position) it sealed",
                )
            )


async def _verify_seals(
    conn: asyncpg.Connection, q: str, seals: list[asyncpg.Record], problems: list[Problem]
) -> int:
    prev_digest = chain.GENESIS
    for s in seals:
        heads = await conn.fetch(
            f"SELECT h.stream_id, h.stream_version, h.hash, e.hash AS actual, e.event_id, "
            f"e.position, e.tx_id FROM {q}.seal_heads h LEFT JOIN {q}.events e "
            "ON e.stream_id = h.stream_id AND e.stream_version = h.stream_version "
            "WHERE h.seal_id = $1",
            s["seal_id"],
        )
        digest = chain.seal_digest(
            s["prev_digest"],
            [(h["stream_id"], h["stream_version"], h["hash"]) for h in heads],
            s["order_digest"] if s["format"] >= 2 else None,
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
            elif not s["from_tx"] <= h["tx_id"] < s["upto_tx"]:
                problems.append(
                    Problem(
                        "order",
                        f"sealed by seal {s['seal_id']} with tx_id in "
                        f"{s['from_tx']}..{s['upto_tx']}, now at tx_id {h['tx_id']}",
                        stream_id=h["stream_id"],
                        stream_version=h["stream_version"],
                        event_id=h["event_id"],
                        position=h["position"],
                    )
                )
    return len(seals)
