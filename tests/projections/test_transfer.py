"""agentrt runs export / import: a run made by real workers moves to a fresh schema with its
chain intact; an altered, reordered or cut export is refused and nothing is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from projections.errors import ImportRefused, UnknownRun
from projections.replay import replay_run
from projections.transfer import export_run, import_run, parse_export
from runtime.effects.retry import RetryPolicy
from runtime.errors import ConcurrencyConflict
from runtime.events.model import NewEvent, RecordedEvent
from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.log import audit, chain
from runtime.log.migrations import migrate
from runtime.log.pool import open_runtime_pool
from runtime.log.store import COPY_THRESHOLD, NO_STREAM, EventLog, RawEvent
from runtime.settings import Settings
from tests.support.apps.mailpair import Responder, Triage
from tests.support.events import Noted
from tests.support.runtime import count_type, running, send, wait_for
from tests.support.servers import Servers, drop_schema, fresh_schema
from webhooks.events import Address, EmailReceived


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[LLM]:
    async with model_client(settings) as mc:
        assert mc.offline and mc.server is not None
        yield LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))


@pytest.fixture
async def target_settings(servers: Servers) -> AsyncIterator[Settings]:
    """A second installation: another migrated schema on the same server."""
    schema = fresh_schema()
    s = Settings.from_env({}, db_schema=schema, poll_interval=0.05).with_urls(
        redis_url=servers.redis_url, database_url=servers.database_url
    )
    await migrate(s)
    yield s
    await drop_schema(servers.database_url, schema)


@pytest.fixture
async def target(target_settings: Settings) -> AsyncIterator[EventLog]:
    pool = await open_runtime_pool(target_settings, max_size=5)
    try:
        yield EventLog(pool, schema=target_settings.db_schema)
    finally:
        await pool.close()


def email(n: int, sender: str = "ada@example.com") -> EmailReceived:
    return EmailReceived(
        source="test",
        provider="raw",
        message_id=f"<m{n}@example.com>",
        sender=Address(sender),
        subject="Refund for invoice 42",
        text='I was charged twice, please refund the payment. Ünïcode ✓ "quoted"',
    )


async def demo_run(redis: aioredis.Redis, log: EventLog, llm: LLM) -> uuid.UUID:
    """One run of the demo (triage: llm + tool + emit; responder: llm + emit)."""
    run_id = await send(redis, email(1))
    async with running([Triage(), Responder()], redis, log, llm=llm):
        await wait_for(lambda: _has(log, "reply.drafted"), what="the drafted reply")
        await wait_for(lambda: _has(log, "activation.completed", 2), what="two completions")
    return run_id


async def _has(log: EventLog, event_type: str, n: int = 1) -> bool:
    return await count_type(log, event_type) >= n


async def total(log: EventLog) -> int:
    return int(await log.pool.fetchval(f'SELECT count(*) FROM "{log.schema}".events'))


async def raw_rows(log: EventLog, run_id: uuid.UUID) -> list[tuple[object, ...]]:
    """Everything but position and tx, in log order, bodies as stored."""
    rows = await log.pool.fetch(
        "SELECT event_id, stream_id, stream_version, event_type, schema_version, run_id, "
        "causation_id, producer, recorded_at, trace, data, prev_hash, hash "
        f'FROM "{log.schema}".events WHERE run_id = $1 ORDER BY tx_id, position',
        run_id,
    )
    return [tuple(r) for r in rows]


def envelope(e: RecordedEvent) -> tuple[object, ...]:
    return (e.event_id, e.stream_id, e.stream_version, e.event_type, e.body, e.recorded_at,
            e.causation_id, e.producer, e.prev_hash, e.hash)  # fmt: skip


@pytest.fixture
async def exported(redis: aioredis.Redis, log: EventLog, llm: LLM) -> tuple[uuid.UUID, list[bytes]]:
    run_id = await demo_run(redis, log, llm)
    return run_id, await export_run(log, run_id)


async def test_a_run_moves_to_another_schema_with_the_same_chain(
    log: EventLog, target: EventLog, exported: tuple[uuid.UUID, list[bytes]]
) -> None:
    run_id, lines = exported
    header = json.loads(lines[0])
    assert header["format"] == "agentrt.run-export" and header["version"] == 1
    assert header["run_id"] == str(run_id) and header["events"] == len(lines) - 1
    assert header["chain_format"] == chain.CHAIN_FORMAT
    source = await log.read_run(run_id)
    assert header["events"] == len(source)
    assert {e.stream_id for e in source} == set(header["streams"])
    assert sum(1 for e in source if e.stream_id.startswith("act-")) >= 3  # llm, tool, llm steps

    report = await import_run(target, parse_export(lines))
    assert not report.already_present and report.imported == len(source)
    imported = await target.read_run(run_id)
    # Ids, chain, typed bodies, times, causation, and the log order itself.
    assert [envelope(e) for e in imported] == [envelope(e) for e in source]
    assert await raw_rows(target, run_id) == await raw_rows(log, run_id)
    async with target.pool.acquire() as conn:
        verified = await audit.verify(conn, target.schema)
    assert verified.ok, verified.problems
    # A second export from the target is the same file but for where the events sit.
    again = await export_run(target, run_id)
    assert [_without_place(line) for line in again[1:]] == [_without_place(x) for x in lines[1:]]


def _without_place(line: bytes) -> dict[str, object]:
    event: dict[str, object] = json.loads(line)
    del event["position"], event["tx"]
    return event


class Retriaged(Triage):
    system = "You triage a support inbox, differently."


async def test_an_imported_run_replays_identical_there(
    target: EventLog, target_settings: Settings, exported: tuple[uuid.UUID, list[bytes]]
) -> None:
    """Export, import into another installation, replay there with the same agents: identical,
    with the model never called (replay's own guard) and nothing written."""
    run_id, lines = exported
    await import_run(target, parse_export(lines))
    count = await total(target)
    result = await replay_run(target, [Triage(), Responder()], run_id, settings=target_settings)
    assert [a.agent for a in result.activations] == ["triage", "responder"]
    assert result.identical, result.divergent
    assert await total(target) == count
    # A changed agent is caught there too: the import carried the recorded requests.
    diverged = await replay_run(
        target, [Retriaged(), Responder()], run_id, settings=target_settings
    )
    assert not diverged.identical


async def test_importing_twice_is_idempotent(
    target: EventLog, exported: tuple[uuid.UUID, list[bytes]]
) -> None:
    _, lines = exported
    first = await import_run(target, parse_export(lines))
    count = await total(target)
    second = await import_run(target, parse_export(lines))
    assert not first.already_present and second.already_present and second.imported == 0
    assert await total(target) == count == first.imported


def _data_index(line: bytes) -> int:
    return line.index(b'"data":"') + len(b'"data":"')


def alter_body_byte(lines: list[bytes]) -> list[bytes]:
    out = list(lines)
    line = out[3]
    i = line.index(b"e", _data_index(line) + 12)  # a letter inside the stored body
    out[3] = line[:i] + b"f" + line[i + 1 :]
    return out


def swap_lines(lines: list[bytes]) -> list[bytes]:
    out = list(lines)
    out[2], out[3] = out[3], out[2]
    return out


def remove_line(lines: list[bytes]) -> list[bytes]:
    return lines[:4] + lines[5:]


def remove_last_line(lines: list[bytes]) -> list[bytes]:
    return lines[:-1]


def change_hash(lines: list[bytes]) -> list[bytes]:
    event = json.loads(lines[4])
    event["hash"] = ("0" if event["hash"][0] != "0" else "1") + event["hash"][1:]
    return [*lines[:4], json.dumps(event).encode() + b"\n", *lines[5:]]


def change_recorded_at(lines: list[bytes]) -> list[bytes]:
    event = json.loads(lines[2])
    event["recorded_at"] = event["recorded_at"].replace("+00:00", "+01:00")
    return [*lines[:2], json.dumps(event).encode() + b"\n", *lines[3:]]


def drop_header_count(lines: list[bytes]) -> list[bytes]:
    header = json.loads(lines[0])
    header["events"] -= 1
    return [json.dumps(header).encode() + b"\n", *lines[1:-1]]


def other_format(lines: list[bytes]) -> list[bytes]:
    header = json.loads(lines[0])
    header["version"] = 2
    return [json.dumps(header).encode() + b"\n", *lines[1:]]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (alter_body_byte, "altered: the hash of event"),
        (swap_lines, "out of log order"),
        (remove_line, "an event of the stream was removed or moved"),
        (remove_last_line, "the header says"),
        (change_hash, "altered: the hash of event"),
        (change_recorded_at, "altered: the hash of event"),
        (drop_header_count, "does not end where the header says"),
        (other_format, "export version 2 is not supported"),
    ],
)
async def test_an_altered_export_is_refused_and_nothing_written(
    target: EventLog, exported: tuple[uuid.UUID, list[bytes]], tamper: object, message: str
) -> None:
    _, lines = exported
    assert callable(tamper)
    bad = tamper(lines)
    assert bad != lines
    before = await total(target)
    with pytest.raises(ImportRefused, match=message) as refused:
        await import_run(target, parse_export(bad))
    assert await total(target) == before == 0
    if "hash of event" in message:
        assert "(line " in refused.value.message


def rechain(lines: list[bytes]) -> list[bytes]:
    """The same ids with another body, every hash recomputed: a consistent export of a
    different run under those ids."""
    events = [json.loads(line) for line in lines[1:]]
    events[0]["data"] = events[0]["data"].replace("Refund", "Rebate", 1)
    heads: dict[str, str] = {}
    for e in events:
        prev = bytes.fromhex(heads.get(e["stream_id"], chain.GENESIS.hex()))
        content = chain.content_hash_raw(
            uuid.UUID(e["event_id"]), e["event_type"], e["schema_version"],
            uuid.UUID(e["run_id"]), e["causation_id"] and uuid.UUID(e["causation_id"]),
            e["producer"], _dt(e["recorded_at"]), e["trace"], e["data"].encode(),
        )  # fmt: skip
        e["prev_hash"] = prev.hex()
        e["hash"] = heads[e["stream_id"]] = chain.link(
            prev, e["stream_version"], content, e["stream_id"]
        ).hex()
    header = json.loads(lines[0])
    for stream, head in heads.items():
        header["streams"][stream]["head"] = head
    return [json.dumps(x).encode() + b"\n" for x in (header, *events)]


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_a_different_run_under_the_same_ids_is_refused(
    target: EventLog, exported: tuple[uuid.UUID, list[bytes]]
) -> None:
    _, lines = exported
    forged = rechain(lines)
    assert b"Rebate" in forged[1]
    parse_export(forged)  # consistent in itself
    await import_run(target, parse_export(lines))
    count = await total(target)
    with pytest.raises(ImportRefused, match="another hash"):
        await import_run(target, parse_export(forged))
    assert await total(target) == count


async def test_an_unknown_run_is_refused(log: EventLog) -> None:
    with pytest.raises(UnknownRun, match="no run"):
        await export_run(log, uuid.uuid4())


async def test_a_partial_stream_is_verified_and_skipped(
    log: EventLog, target: EventLog, settings: Settings
) -> None:
    run_id = uuid.uuid4()
    await log.append("circuit-crm", [Noted(text="open")])  # another run's transition
    await log.append(f"run-{run_id}", [NewEvent(body=Noted(text="t"), event_id=run_id,
                                                run_id=run_id)], NO_STREAM)  # fmt: skip
    await log.append("circuit-crm", [NewEvent(body=Noted(text="closed"), run_id=run_id)])
    lines = await export_run(log, run_id)
    export = parse_export(lines)
    assert export.partial == {"circuit-crm": 1}
    report = await import_run(target, export)
    assert report.skipped == {"circuit-crm": 1} and report.imported == 1
    assert [e.stream_id for e in await target.read_run(run_id)] == [f"run-{run_id}"]
    # Its link is still checked: a changed prev_hash breaks its hash.
    event = json.loads(lines[2])
    event["prev_hash"] = chain.GENESIS.hex()
    with pytest.raises(ImportRefused, match="altered"):
        parse_export([lines[0], lines[1], json.dumps(event).encode()])


# -- EventLog.append_raw: the raw path import writes through --------------------------


@pytest.mark.parametrize("n", [1, 3, COPY_THRESHOLD + 1])
async def test_append_raw_chains_as_append_does(log: EventLog, target: EventLog, n: int) -> None:
    """One event (scalar insert), a few (unnest), many (COPY); new stream and continued."""
    bodies = [NewEvent(body=Noted(text=f"é{i}"), run_id=uuid.uuid4(), producer="p",
                       causation_id=uuid.uuid4(), trace="00-x") for i in range(2 * n)]  # fmt: skip
    await log.append("s-1", bodies[:n], NO_STREAM)
    await log.append("s-1", bodies[n:], n)
    source = await log.pool.fetch(
        f"SELECT event_id, event_type, schema_version, data, run_id, causation_id, producer, "
        f'trace, recorded_at, prev_hash, hash FROM "{log.schema}".events ORDER BY position'
    )
    raws = [RawEvent(event_id=r[0], event_type=r[1], schema_version=r[2], data=r[3].encode(),
                     run_id=r[4], causation_id=r[5], producer=r[6], trace=r[7],
                     recorded_at=r[8]) for r in source]  # fmt: skip
    first = await target.append_raw("s-1", raws[:n], NO_STREAM)
    assert first.inserted and first.stream_version == n
    async with target.pool.acquire() as conn, conn.transaction():
        await target.append_raw("s-1", raws[n:], n, conn=conn)
    stored = await target.read_stream("s-1")
    assert [(e.prev_hash, e.hash) for e in stored] == [(r[9], r[10]) for r in source]
    assert [e.body for e in stored] == [b.body for b in bodies]
    again = await target.append_raw("s-1", raws[:n], NO_STREAM)  # an idempotent re-append
    assert not again.inserted
    with pytest.raises(ConcurrencyConflict):
        await target.append_raw("s-1", [msgspec.structs.replace(raws[0], event_id=uuid.uuid4())],
                                NO_STREAM)  # fmt: skip


# -- the commands --------------------------------------------------------------------


def agentrt(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
    }
    return subprocess.run([sys.executable, "-m", "runtime", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


async def test_the_commands(
    settings: Settings,
    target_settings: Settings,
    target: EventLog,
    exported: tuple[uuid.UUID, list[bytes]],
    tmp_path: Path,
) -> None:
    run_id, lines = exported
    file = tmp_path / "run.jsonl"
    done = agentrt(settings, "runs", "export", str(run_id), "-o", str(file))
    assert done.returncode == 0, done.stderr
    assert [_without_place(x) for x in file.read_bytes().splitlines()[1:]] == [
        _without_place(x) for x in lines[1:]
    ]
    to_stdout = agentrt(settings, "runs", "export", str(run_id))
    assert to_stdout.returncode == 0
    # The same file but for the header's exported_at.
    assert to_stdout.stdout.encode().splitlines()[1:] == file.read_bytes().splitlines()[1:]

    imported = agentrt(target_settings, "runs", "import", str(file))
    assert imported.returncode == 0, imported.stderr
    assert f"imported run {run_id}: {len(lines) - 1} events" in imported.stdout
    twice = agentrt(target_settings, "runs", "import", str(file))
    assert twice.returncode == 0 and "already present" in twice.stdout

    missing = tmp_path / "missing.jsonl"
    unknown = agentrt(settings, "runs", "export", str(uuid.uuid4()), "-o", str(missing))
    assert unknown.returncode == 1 and "[run_not_found]" in unknown.stderr
    assert not missing.exists()
    not_an_id = agentrt(settings, "runs", "export", "nope")
    assert not_an_id.returncode == 2 and "not a run id" in not_an_id.stderr

    altered = tmp_path / "altered.jsonl"
    altered.write_bytes(b"".join(alter_body_byte(lines)))
    before = await total(target)
    refused = agentrt(target_settings, "runs", "import", str(altered))
    assert refused.returncode == 1 and "[import_refused] altered" in refused.stderr
    assert await total(target) == before
