"""Replay (promise 7): real runs made by real workers, replayed with current (or changed) code.

Runs are produced by a worker (with its relay) over the test's Redis and PostgreSQL
and the offline model; a replay must call nothing (the offline model's request count,
the demo tool's lookups) and write nothing (the log's events), and report a changed
agent at the right step, event or outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import pytest
import redis.asyncio as aioredis
import typer
from typer.testing import CliRunner

from projections import replay as replay_mod
from projections.cli import replay as cli_replay
from projections.errors import AgentMissing, UnknownRun
from projections.record import RunRecord, load_run
from projections.replay import RunReplay, replay_run
from runtime.agents.agent import Agent
from runtime.effects.budget import Budget
from runtime.events.model import RecordedEvent
from runtime.llm.calls import LLM
from runtime.llm.offline import OfflineServer
from runtime.llm.tokens import estimate_request_tokens
from runtime.log.queries import LogQueries
from runtime.log.snapshots import Snapshot, SnapshotStore, encode_state
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support import REPO
from tests.support.apps import mailpair as demo
from tests.support.apps import orders, replayed
from tests.support.apps.orders import OrderPlaced
from tests.support.runtime import count_type, fast_options, running, send, wait_for
from webhooks.events import Address, EmailReceived

EMAILS = [
    ("ada@example.com", "Invoice 1042 charged twice?",
     "Hi, my card was charged twice for invoice 1042. Could you refund one payment?"),
    ("grace@example.com", "Login broken after password reset",
     "Since I reset my password the login page shows an error. Please help."),
    ("promo@lucky-draw.example", "You are our winner!",
     "Claim your prize now: a crypto offer for our lottery winner."),
]  # fmt: skip


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[OfflineServer]:
    with OfflineServer() as s:
        yield s


@pytest.fixture
async def llm(server: OfflineServer, settings: Settings) -> AsyncIterator[LLM]:
    client = anthropic.AsyncAnthropic(
        base_url=server.base_url, api_key="offline", max_retries=0, timeout=10.0
    )
    yield LLM(client, settings, offline=True)
    await client.close()


class CountingCRM(dict[str, Any]):
    """The demo tool's customer table, counting its lookups (one per tool invocation)."""

    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:
        type(self).lookups += 1
        return super().get(key, default)


@pytest.fixture
def crm(monkeypatch: pytest.MonkeyPatch) -> type[CountingCRM]:
    CountingCRM.lookups = 0
    monkeypatch.setattr(demo, "_CRM", CountingCRM(demo._CRM))
    return CountingCRM


def model_requests(server: OfflineServer) -> int:
    return sum(1 for r in server.requests.all() if r.path == "/v1/messages")


async def log_size(log: EventLog) -> tuple[int, int]:
    """Events in the log and its highest position: both unchanged by a replay."""
    row = await log.pool.fetchrow(
        f'SELECT count(*), coalesce(max(position), 0) FROM "{log.schema}".events'
    )
    return int(row[0]), int(row[1])


def email(sender: str, subject: str, text: str) -> EmailReceived:
    return EmailReceived(
        source="test",
        provider="test",
        message_id=f"<{uuid.uuid4().hex}@example.com>",
        sender=Address(email=sender),
        subject=subject,
        text=text,
    )


async def run_demo(
    redis: aioredis.Redis,
    log: EventLog,
    llm: LLM,
    agents: Sequence[Agent] | None = None,
    emails: Sequence[tuple[str, str, str]] = EMAILS,
) -> list[uuid.UUID]:
    """The demo's pipeline on real workers: one run per email, each finished (2 activations)."""
    before = await count_type(log, "activation.completed")
    ids = [await send(redis, email(*e), partition=i % 2) for i, e in enumerate(emails)]
    want = before + 2 * len(ids)

    async def done() -> bool:
        return await count_type(log, "activation.completed") >= want

    async with running(agents or demo.agents, redis, log, llm=llm):
        await wait_for(done, seconds=60, what=f"{want} completed activations")
    return ids


def verdicts(report: RunReplay) -> list[tuple[str, str | None]]:
    return [(a.agent, None if a.divergence is None else a.divergence.kind)
            for a in report.activations]  # fmt: skip


def triage_of(report: RunReplay) -> Any:
    [a] = [a for a in report.activations if a.agent == "triage"]
    return a


# -- replaying the demo's runs ---------------------------------------------------------------


async def test_demo_runs_replay_identical_calling_and_writing_nothing(
    redis: aioredis.Redis,
    log: EventLog,
    llm: LLM,
    server: OfflineServer,
    crm: type[CountingCRM],
    settings: Settings,
) -> None:
    runs = await run_demo(redis, log, llm)
    made, looked_up = model_requests(server), crm.lookups
    assert made == 5 and looked_up == 2  # 3 triage + 2 responder calls; 2 customers
    size = await log_size(log)

    for app in (demo.agents, replayed.unchanged):
        for run_id in runs:
            report = await replay_run(log, app, run_id, settings=settings)
            assert report.identical, report
            assert verdicts(report) == [("triage", None), ("responder", None)]
    # The spam run's responder took no step; the others took theirs from the record.
    reports = [await replay_run(log, demo.agents, r, settings=settings) for r in runs]
    assert [[a.replayed_steps for a in r.activations] for r in reports] == [[2, 1], [2, 1], [1, 0]]
    assert [[a.steps for a in r.activations] for r in reports] == [[2, 1], [2, 1], [1, 0]]

    # Changed code: the same runs, each change reported where it is.
    billing = runs[0]
    prompt = triage_of(await replay_run(log, replayed.prompt_changed, billing, settings=settings))
    d = prompt.divergence
    assert (d.kind, d.step, d.run_step) == ("step", 1, 1)
    model = settings.models["fast"]
    assert d.recorded == d.replayed == f"llm {model!r}"
    assert d.message == f"the record holds llm {model!r} at step 1 with a different request"
    changed = [line for line in d.diff.splitlines() if line[:1] in "+-" and "Subject:" in line]
    assert len(changed) == 2
    assert changed[0].startswith("-") and "Classify this email" not in changed[0]
    assert changed[1].startswith("+") and "Classify this email:" in changed[1]

    tool = triage_of(await replay_run(log, replayed.tool_changed, billing, settings=settings))
    d = tool.divergence
    assert (d.kind, d.step, d.run_step) == ("step", 2, 2)
    assert d.recorded == d.replayed == "tool 'lookup_customer'"
    assert '-  "email": "ada@example.com"' in d.diff
    assert '+  "email": "ADA@EXAMPLE.COM"' in d.diff

    extra = triage_of(await replay_run(log, replayed.extra_emit, billing, settings=settings))
    d = extra.divergence
    assert (d.kind, d.index, d.recorded, d.replayed) == ("emit", 1, None, "test.replay.noted")
    assert "extra event 1" in d.message and '+  "message_id"' in d.diff

    removed = triage_of(await replay_run(log, replayed.step_removed, billing, settings=settings))
    d = removed.divergence
    assert (d.kind, d.step, d.run_step) == ("step", 2, 2)
    assert (
        d.message == "the record holds step 2: tool 'lookup_customer' the handler no longer takes"
    )
    assert d.replayed is None and '-  "email": "ada@example.com"' in d.diff

    # A handler asking for a step the record lacks: reported, not executed.
    added = triage_of(await replay_run(log, replayed.extra_tool, billing, settings=settings))
    d = added.divergence
    assert (d.kind, d.step, d.recorded) == ("step", 3, None)
    assert d.message == (
        "the handler asked for step 3: tool 'lookup_customer' which the record does not have"
    )
    # The spam run took no tool step: its extra tool call is step 2 there.
    spam = triage_of(await replay_run(log, replayed.extra_tool, runs[2], settings=settings))
    assert (spam.divergence.step, spam.divergence.recorded) == (2, None)
    # Each replay's responder still matched (its activation is independent of triage's code).
    assert verdicts(await replay_run(log, replayed.prompt_changed, billing, settings=settings)) == [
        ("triage", "step"),
        ("responder", None),
    ]

    # Nothing was called, nothing was written.
    assert model_requests(server) == made
    assert crm.lookups == looked_up
    assert await log_size(log) == size


async def test_a_step_the_record_lacks_is_never_executed_even_by_the_steps_base(
    redis: aioredis.Redis, log: EventLog, llm: LLM, crm: type[CountingCRM], settings: Settings
) -> None:
    """The guard is what stops the call: the plain record-only Steps would execute it."""
    [run_id] = await run_demo(redis, log, llm, emails=EMAILS[:1])
    looked_up = crm.lookups
    record = await load_run(log, run_id)
    [triage] = [a for a in record.activations if a.agent == "triage"]
    report = await replay_mod.replay_activation(
        record, triage, replayed.ExtraTool(), replay_mod.ReplayServices(settings, offline=True)
    )
    assert report.divergence is not None and report.divergence.step == 3
    assert crm.lookups == looked_up


async def test_a_budget_stop_replays_identical(
    redis: aioredis.Redis,
    log: EventLog,
    llm: LLM,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A responder whose own call fits its budget but not with triage's spend on top."""
    [first] = await run_demo(redis, log, llm, emails=EMAILS[:1])
    record = await load_run(log, first)
    steps = {a.agent: a.steps for a in record.activations}
    triage_tokens = sum(s.usage.tokens for s in steps["triage"].values() if s.usage)
    ask = steps["responder"][1].request
    own = estimate_request_tokens(ask) + ask["max_tokens"]

    class Tight(demo.Responder):
        budget = Budget(tokens=own + triage_tokens // 2)

    agents = [demo.Triage(), Tight()]
    [run_id] = await run_demo(redis, log, llm, agents=agents, emails=EMAILS[:1])
    record = await load_run(log, run_id)
    assert [a.outcome for a in record.activations] == ["completed", "budget_exceeded"]
    assert await count_type(log, "run.budget_exceeded") == 1
    report = await replay_run(log, agents, run_id, settings=settings)
    assert report.identical, report

    # Without the run's other spend the call would fit: the replay would ask for it.
    async def nothing() -> tuple[int, float]:
        return 0, 0.0

    monkeypatch.setattr(replay_mod, "_spend", lambda record, a: nothing)
    blind = await replay_run(log, agents, run_id, settings=settings)
    [d] = [a.divergence for a in blind.activations if a.divergence is not None]
    assert (d.kind, d.step, d.recorded) == ("step", 1, None)


async def test_a_dead_lettered_activation_replays_identical_when_it_raises_again(
    redis: aioredis.Redis, log: EventLog, settings: Settings
) -> None:
    run_id = await send(redis, OrderPlaced(order_id="o1", sku="SKU-1"))
    async with running(replayed.failing, redis, log, options=fast_options(max_deliveries=2)):
        await wait_for(lambda: _has(log, "activation.dead_lettered"), what="a dead letter")
    record = await load_run(log, run_id)
    assert [(a.agent, a.outcome) for a in record.activations] == [
        ("fulfilment", "completed"),
        ("grumpy", "dead_lettered"),
    ]
    size = await log_size(log)
    report = await replay_run(log, replayed.failing, run_id, settings=settings)
    assert report.identical, report
    fixed = await replay_run(log, replayed.fixed, run_id, settings=settings)
    [d] = [a.divergence for a in fixed.activations if a.divergence is not None]
    assert d.kind == "outcome" and d.recorded == "dead_lettered (RuntimeError)"
    assert "but the handler completed" in d.message
    assert await log_size(log) == size


async def _has(log: EventLog, event_type: str) -> bool:
    return await count_type(log, event_type) >= 1


async def test_a_folding_agent_sees_the_same_ctx_state(
    redis: aioredis.Redis, log: EventLog, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The auditor emits how many events its ctx.state folded: a replay must fold the same."""
    run_id = await send(redis, OrderPlaced(order_id="o3", sku="SKU-3"))
    async with running(orders.agents, redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the audit")
    [audited] = [e.body for e in await log.read_run(run_id) if e.event_type == "orders.audited"]
    assert getattr(audited, "seen_by", "") != "0 earlier"
    report = await replay_run(log, orders.agents, run_id, settings=settings)
    assert report.identical, report
    # From a snapshot (the agent-state projection's cache): the same state, folded less.
    record = await load_run(log, run_id)
    [act] = [a for a in record.activations if a.agent == "auditor"]
    history = record.history_before(act.trigger)
    assert len(history) >= 2
    store = SnapshotStore(log.pool, log.schema)
    auditor = orders.Auditor()

    async def snapshot(state: list[str], at: RecordedEvent) -> None:
        await store.drop()
        data = encode_state(state, list[str])
        assert data is not None
        version = auditor.fold_version
        await store.save([Snapshot(run_id=run_id, agent="auditor", fold_version=version,
                                   position=at.log_position, event_id=at.event_id, event_count=1,
                                   state=data)])  # fmt: skip

    await snapshot([history[0].event_type], history[0])
    assert (await replay_run(log, orders.agents, run_id, settings=settings)).identical
    # A snapshot is read: a wrong one shows (and with snapshots=False it is not read).
    await snapshot(["x"] * 7, history[0])
    misled = await replay_run(log, orders.agents, run_id, settings=settings)
    [d] = [a.divergence for a in misled.activations if a.divergence is not None]
    assert d.kind == "emit" and f'"{6 + len(history)} earlier"' in d.diff
    unread = await replay_run(log, orders.agents, run_id, settings=settings, snapshots=False)
    assert unread.identical
    await store.drop()

    # Without the run's history ctx.state is empty: the emitted body says so.
    monkeypatch.setattr(RunRecord, "history_before", lambda self, trigger: [])
    blind = await replay_run(log, orders.agents, run_id, settings=settings)
    [d] = [a.divergence for a in blind.activations if a.divergence is not None]
    assert (d.kind, d.index) == ("emit", 0)
    assert '+  "seen_by": "0 earlier"' in d.diff


async def test_unknown_run_and_missing_agent(
    redis: aioredis.Redis, log: EventLog, llm: LLM, settings: Settings
) -> None:
    with pytest.raises(UnknownRun):
        await replay_run(log, demo.agents, uuid.uuid4(), settings=settings)
    [run_id] = await run_demo(redis, log, llm, emails=EMAILS[:1])
    with pytest.raises(AgentMissing, match="needs agent 'responder', which --app x"):
        await replay_run(log, replayed.no_responder, run_id, settings=settings, app="--app x")


async def test_runs_between_selects_by_time_and_agent(
    redis: aioredis.Redis, log: EventLog, llm: LLM
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    runs = await run_demo(redis, log, llm, emails=EMAILS[:2])
    order = await send(redis, OrderPlaced(order_id="o2", sku="SKU-2"))
    async with running(replayed.fixed, redis, log):
        await wait_for(lambda: _has(log, "test.replay.noted"), what="the order's runs")
    q = LogQueries(log)
    everything = await q.runs_between(start)
    assert set(everything) == {*runs, order}
    assert everything.index(runs[0]) < everything.index(order)
    assert set(await q.runs_between(start, agent="responder")) == set(runs)
    assert await q.runs_between(start, agent="grumpy") == [order]
    assert await q.runs_between(start + timedelta(days=1)) == []
    assert await q.runs_between(start - timedelta(days=1), start) == []


# -- the command ---------------------------------------------------------------------------


async def agentrt(settings: Settings, *args: str) -> tuple[int, str, str]:
    """``agentrt replay ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "AGENTRT_LOG_LEVEL": "warning",
        "PYTHONPATH": str(REPO),
        "COLUMNS": "200",
    }
    env.pop("AGENTRT_APP", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", "replay", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.mark.slow
async def test_cli_replay(
    redis: aioredis.Redis, log: EventLog, llm: LLM, settings: Settings
) -> None:
    runs = await run_demo(redis, log, llm)
    size = await log_size(log)
    app = "--app=tests.support.apps.mailpair"
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    # Started together: each process spends seconds importing.
    ok, changed, many, good, unknown, missing = await asyncio.gather(
        agentrt(settings, str(runs[0]), app),
        agentrt(settings, str(runs[0]), "--app=tests.support.apps.replayed:tool_changed"),
        agentrt(settings, "--since", since, "--json",
                "--app=tests.support.apps.replayed:prompt_changed"),
        agentrt(settings, "--since", "1h", "--agent", "responder", app, "--json"),
        agentrt(settings, str(uuid.uuid4()), app),
        agentrt(settings, str(runs[0]), "--app=tests.support.apps.replayed:no_responder"),
    )  # fmt: skip

    assert ok[0] == 0, ok
    assert "identical" in ok[1] and "DIVERGED" not in ok[1]
    assert "triage" in ok[1] and "responder" in ok[1]

    assert changed[0] == 1, changed
    assert "DIVERGED at step 2 (run step 2)" in changed[1]
    assert "tool 'lookup_customer'" in changed[1] and "ADA@EXAMPLE.COM" in changed[1]

    assert many[0] == 1, many
    lines = [json.loads(line) for line in many[1].splitlines()]
    assert lines[-1] == {"runs": 3, "activations": 6, "identical": 3, "divergent": 3,
                         "divergent_runs": [str(r) for r in runs]}  # fmt: skip
    assert [line["identical"] for line in lines[:-1]] == [False] * 3
    first = lines[0]["activations"][0]
    assert first["agent"] == "triage" and first["divergence"]["step"] == 1

    assert good[0] == 0, good
    assert json.loads(good[1].splitlines()[-1])["identical"] == 6

    assert unknown[0] == 1 and "run_not_found" in unknown[2], unknown
    assert missing[0] == 1 and "agent_not_found" in missing[2], missing
    assert "needs agent 'responder'" in missing[2]
    assert await log_size(log) == size


def cli() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def main() -> None:
        """agentrt"""

    cli_replay.register(root)
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday-ish"], "is not a date"),
        (["--since", "2024-05-01", "--until", "soon"], "is not a date"),
        ([str(uuid.uuid4()), "--since", "1d"], "either RUN_ID or --since"),
        ([], "either RUN_ID or --since"),
        (["not-a-uuid"], "is not a run id"),
        ([str(uuid.uuid4()), "--agent", "triage"], "go with --since"),
    ],
)
def test_cli_refuses_bad_arguments(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli(), ["replay", *args, "--app", "tests.support.apps.mailpair"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_cli_needs_an_app() -> None:
    result = CliRunner().invoke(cli(), ["replay", str(uuid.uuid4())], env={"AGENTRT_APP": ""})
    assert result.exit_code == 2
    assert "--app" in result.output


def test_dates() -> None:
    now = datetime(2024, 5, 10, 12, tzinfo=UTC)
    assert cli_replay.parse_when("7d", now=now) == datetime(2024, 5, 3, 12, tzinfo=UTC)
    assert cli_replay.parse_when("30m", now=now) == datetime(2024, 5, 10, 11, 30, tzinfo=UTC)
    assert cli_replay.parse_when("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert cli_replay.parse_when("2024-05-01", end=True) == datetime(2024, 5, 2, tzinfo=UTC)
    assert cli_replay.parse_when("2024-05-01T10:00:00+02:00") == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert cli_replay.parse_when("2024-05-01T10:00:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
