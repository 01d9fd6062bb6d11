"""agentrt fork: a demo run made by real workers, forked at a step: the steps before it are the
parent's (no model or tool call), the ones from it run live with the change; the parent is
untouched; bad input changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from projections.errors import AgentMissing, InvalidInput, StepOutOfRange, UnknownRun
from projections.fork import (
    Change,
    ForkLLM,
    ForkReport,
    ForkServices,
    decode_input,
    fork,
    plan_fork,
)
from projections.record import load_run
from runtime.effects.retry import RetryPolicy
from runtime.events.builtin import RunForked, StepRecorded
from runtime.events.model import RecordedEvent
from runtime.llm.calls import LLM
from runtime.llm.client import ModelClient, model_client
from runtime.llm.offline import OfflineServer
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.apps.mailpair import Responder, Triage
from tests.support.apps.orders import Auditor, Fulfilment, OrderAudited, OrderPlaced
from tests.support.runtime import count_type, running, send, wait_for
from webhooks.events import Address, EmailReceived

AGENTS = [Triage(), Responder()]
#: The demo run's steps: triage's model call (1) and CRM lookup (2), the responder's call (3).
TRIAGE_LLM, TRIAGE_TOOL, RESPONDER_LLM = 1, 2, 3


@pytest.fixture
async def mc(settings: Settings) -> AsyncIterator[ModelClient]:
    async with model_client(settings) as client:
        assert client.offline and client.server is not None
        yield client


def model_requests(mc: ModelClient) -> int:
    server = mc.server
    assert isinstance(server, OfflineServer)
    return sum(1 for r in server.requests.all() if r.path == "/v1/messages")


def email(subject: str = "Refund for invoice 42") -> EmailReceived:
    return EmailReceived(
        source="test",
        provider="raw",
        message_id="<m1@example.com>",
        sender=Address("ada@example.com"),
        subject=subject,
        text="I was charged twice, please refund the payment.",
    )


async def _has(log: EventLog, event_type: str, n: int = 1) -> bool:
    return await count_type(log, event_type) >= n


@pytest.fixture
async def parent(
    redis: aioredis.Redis, log: EventLog, mc: ModelClient, settings: Settings
) -> uuid.UUID:
    """One demo run by real workers (and relay): triage (llm, tool, emit), responder (llm)."""
    llm = LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))
    run_id = await send(redis, email())
    async with running(AGENTS, redis, log, llm=llm):
        await wait_for(lambda: _has(log, "reply.drafted"), what="the drafted reply")
        await wait_for(lambda: _has(log, "activation.completed", 2), what="two completions")
    record = await load_run(log, run_id)
    assert [a.agent for a in record.activations] == ["triage", "responder"]
    assert record.step_total == 3
    assert [(s.kind) for a in record.activations for s in a.steps.values()] == [
        "llm",
        "tool",
        "llm",
    ]
    return run_id


async def run_fork(
    log: EventLog,
    redis: aioredis.Redis,
    mc: ModelClient,
    settings: Settings,
    run_id: uuid.UUID,
    at: int,
    change: Change | None = None,
) -> ForkReport:
    change = change or Change()
    plan = await plan_fork(log, run_id, at, AGENTS)
    llm = ForkLLM(mc.client, settings, offline=True, at=at, change=change)
    return await fork(log, plan, services=ForkServices(log, redis, llm, settings), change=change)


def fingerprint(events: list[RecordedEvent]) -> list[tuple[Any, ...]]:
    return [(e.event_id, e.stream_id, e.stream_version, e.hash, e.prev_hash) for e in events]


def steps_of(events: list[RecordedEvent]) -> dict[tuple[str, int], StepRecorded]:
    return {(e.body.agent, e.body.step): e.body for e in events if isinstance(e.body, StepRecorded)}


def crm_lookups(logs: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for entry in logs if entry.get("event") == "crm.lookup")


# -- fork -----------------------------------------------------------------------------------


async def test_a_fork_at_the_responders_step_calls_only_the_responders_model(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    before = fingerprint(await log.read_run(parent))
    requests = model_requests(mc)
    with capture_logs() as logs:
        report = await run_fork(log, redis, mc, settings, parent, RESPONDER_LLM)
    # The triage's model call and CRM lookup came from the record; the responder ran live.
    assert model_requests(mc) - requests == 1
    assert crm_lookups(logs) == 0
    assert report.model_calls == 1 and report.tool_calls == 0
    assert [(a.agent, a.reused, a.live, a.outcome) for a in report.activations] == [
        ("triage", [TRIAGE_LLM, TRIAGE_TOOL], [], "completed"),
        ("responder", [], [RESPONDER_LLM], "completed"),
    ]
    assert report.input_tokens > 0 and report.output_tokens > 0

    # The parent is untouched: the same events, ids, chain.
    assert fingerprint(await log.read_run(parent)) == before
    # The child: run.forked first in its run stream, then the trigger; every event its own.
    child = await log.read_run(report.run_id)
    assert all(e.run_id == report.run_id for e in child)
    # In the log, in the order a worker commits: each activation's steps, then its outputs.
    assert [e.event_type for e in child] == [
        "step.recorded",
        "step.recorded",
        "run.forked",
        "email.received",
        "triage.classified",
        "activation.completed",
        "step.recorded",
        "reply.drafted",
        "activation.completed",
    ]
    stream = await log.read_stream(f"run-{report.run_id}")
    assert isinstance(stream[0].body, RunForked)
    assert stream[0].body.parent_run_id == parent and stream[0].body.at_step == RESPONDER_LLM
    assert stream[1].event_id == report.run_id and stream[1].event_type == "email.received"
    assert stream[1].body == (await load_run(log, parent)).root.body
    assert {e.event_id for e in child}.isdisjoint({e.event_id for e in await log.read_run(parent)})
    # Its reused steps carry the parent's results, in its own activation's stream.
    mine, theirs = steps_of(child), steps_of(await log.read_run(parent))
    for key in [("triage", 1), ("triage", 2)]:
        assert mine[key].result == theirs[key].result
        assert mine[key].usage == theirs[key].usage
        assert mine[key].request_hash == theirs[key].request_hash
        assert mine[key].activation_id != theirs[key].activation_id
    # The child is a complete run: two activations, the same outputs' types.
    record = await load_run(log, report.run_id)
    assert [(a.agent, a.outcome) for a in record.activations] == [
        ("triage", "completed"),
        ("responder", "completed"),
    ]
    assert [e.event_type for a in record.activations for e in a.emitted] == [
        "triage.classified",
        "reply.drafted",
    ]


async def test_a_fork_at_step_one_with_another_model_runs_every_step_live(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    requests = model_requests(mc)
    with capture_logs() as logs:
        report = await run_fork(
            log, redis, mc, settings, parent, 1, Change(model="claude-forked-model")
        )
    assert model_requests(mc) - requests == 2
    assert crm_lookups(logs) == 1  # step 2 is after the fork point: the tool ran again
    assert [(a.reused, a.live) for a in report.activations] == [([], [1, 2]), ([], [3])]
    steps = steps_of(await log.read_run(report.run_id))
    assert steps[("triage", 1)].request["model"] == "claude-forked-model"
    assert steps[("responder", 1)].request["model"] == "claude-forked-model"
    assert steps[("triage", 1)].name == "claude-forked-model"
    forked = (await log.read_stream(f"run-{report.run_id}"))[0].body
    assert isinstance(forked, RunForked) and forked.model == "claude-forked-model"


async def test_the_model_change_applies_from_the_fork_step_only(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    report = await run_fork(
        log, redis, mc, settings, parent, RESPONDER_LLM, Change(model="claude-other")
    )
    steps = steps_of(await log.read_run(report.run_id))
    theirs = steps_of(await log.read_run(parent))
    assert steps[("triage", 1)].request == theirs[("triage", 1)].request
    assert steps[("responder", 1)].request["model"] == "claude-other"
    assert theirs[("responder", 1)].request["model"] != "claude-other"
    # Its replay applies the recorded change from the same step on: identical (without
    # that, the app's code asks for its own model at the responder's step).
    from projections import replay as replay_mod

    replayed = await replay_mod.replay_run(log, AGENTS, report.run_id, settings=settings)
    assert replayed.identical, replayed.divergent
    record = await load_run(log, report.run_id)
    bare = await replay_mod.replay_record(
        dataclasses.replace(
            record, events=[e for e in record.events if not isinstance(e.body, RunForked)]
        ),
        AGENTS,
        settings=settings,
    )
    assert not bare.identical


async def test_each_check_comes_before_anything_is_written(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    before, requests = await total(log), model_requests(mc)
    with pytest.raises(UnknownRun):
        await plan_fork(log, uuid.uuid4(), 1, AGENTS)
    for at in (0, -1, 4):
        with pytest.raises(StepOutOfRange, match=r"has steps 1\.\.3; step"):
            await plan_fork(log, parent, at, AGENTS)
    with pytest.raises(AgentMissing, match="responder"):
        await plan_fork(log, parent, 1, [Triage()])
    plan = await plan_fork(log, parent, 1, AGENTS)
    with pytest.raises(InvalidInput, match=r"\$\.sender"):
        decode_input(
            plan.parent, json.dumps({**msgspec.to_builtins(email()), "sender": 1}).encode()
        )
    with pytest.raises(InvalidInput):
        decode_input(plan.parent, b"[1, 2")
    assert decode_input(plan.parent, msgspec.json.encode(email("other"))) == email("other")
    assert await total(log) == before and model_requests(mc) == requests


# -- the command ----------------------------------------------------------------------------


def agentrt(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
    }
    env.pop("ANTHROPIC_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def total(log: EventLog) -> int:
    return int(await log.pool.fetchval(f'SELECT count(*) FROM "{log.schema}".events'))


@pytest.mark.slow
async def test_the_command_with_a_prompt_file(
    log: EventLog, settings: Settings, parent: uuid.UUID, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You write very short replies. Answer in JSON.")
    done = agentrt(
        settings,
        "fork",
        str(parent),
        "--at",
        str(RESPONDER_LLM),
        "--app",
        "tests.support.apps.mailpair",
        "--prompt-file",
        str(prompt),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["parent_run_id"] == str(parent) and report["at_step"] == RESPONDER_LLM
    assert report["model_calls"] == 1 and report["tool_calls"] == 0
    child = uuid.UUID(report["run_id"])
    steps = steps_of(await log.read_run(child))
    assert steps[("responder", 1)].request["system"] == prompt.read_text()
    assert steps[("triage", 1)].request["system"] == Triage.system
    forked = (await log.read_stream(f"run-{child}"))[0].body
    assert isinstance(forked, RunForked) and forked.prompt == prompt.read_text()

    text = agentrt(
        settings, "fork", str(parent), "--at", "2", "--app", "tests.support.apps.mailpair"
    )
    assert text.returncode == 0, text.stderr
    assert "reused steps 1; live steps 2" in text.stdout
    assert "live: 1 model call(s), 1 tool call(s)" in text.stdout


async def test_the_command_with_an_input_file(
    log: EventLog, settings: Settings, parent: uuid.UUID, tmp_path: Path
) -> None:
    body = msgspec.to_builtins(email(subject="Login broken"))
    file = tmp_path / "input.json"
    file.write_text(json.dumps(body))
    done = agentrt(
        settings,
        "fork",
        str(parent),
        "--at",
        str(RESPONDER_LLM),
        "--app",
        "tests.support.apps.mailpair",
        "--input-file",
        str(file),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    child = await load_run(log, uuid.UUID(report["run_id"]))
    assert isinstance(child.root.body, EmailReceived)
    assert child.root.body.subject == "Login broken"
    # The trigger changed, so the triage's model request did: it ran live, before the fork
    # step; its CRM lookup asks for the same thing as the parent's and is reused.
    assert report["activations"][0]["live"] == [1]
    assert report["activations"][0]["reused"] == [2]
    assert report["activations"][1]["live"] == [3]
    steps = steps_of(child.events)
    assert "Login broken" in json.dumps(steps[("triage", 1)].request)
    first = (await log.read_stream(f"run-{child.run_id}"))[0].body
    assert isinstance(first, RunForked) and first.input_changed


async def agentrt_async(settings: Settings, *args: str) -> tuple[int, str]:
    """The command in a subprocess (several run at once): exit code, stderr (unfolded)."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "COLUMNS": "400",
    }
    env.pop("ANTHROPIC_API_KEY", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, " ".join(stderr.decode().split())


@pytest.mark.slow
async def test_bad_input_is_refused_by_the_command_and_writes_nothing(
    log: EventLog, settings: Settings, parent: uuid.UUID, tmp_path: Path
) -> None:
    good = [str(parent), "--at", str(RESPONDER_LLM), "--app", "tests.support.apps.mailpair"]
    undecodable = tmp_path / "undecodable.json"
    undecodable.write_text(json.dumps({**msgspec.to_builtins(email()), "subject": 5}))
    not_json = tmp_path / "not.json"
    not_json.write_text("{not json")
    # case -> (arguments, exit code, what stderr must say)
    cases: dict[str, tuple[list[str], int, list[str]]] = {
        "unknown run": (
            [str(uuid.uuid4()), *good[1:]], 1, ["[run_not_found]"]),
        "step 0": (
            [str(parent), "--at", "0", *good[3:]], 1, ["[step_out_of_range]", "has steps 1..3"]),
        "past the end": (
            [str(parent), "--at", "4", *good[3:]], 1, ["[step_out_of_range]", "has steps 1..3"]),
        "agent missing": (
            [*good[:4], "tests.support.apps.mailpair:Triage"], 1,
            ["[agent_not_found]", "responder"]),
        "input does not decode": (
            [*good, "--input-file", str(undecodable)], 1, ["[invalid_input]", "$.subject"]),
        "input not json": (
            [*good, "--input-file", str(not_json)], 1, ["[invalid_input]"]),
        "input unreadable": (
            [*good, "--input-file", str(tmp_path / "missing.json")], 2, ["--input-file"]),
        "prompt unreadable": (
            [*good, "--prompt-file", str(tmp_path / "missing.txt")], 2, ["--prompt-file"]),
        "model and tier": ([*good, "--model", "m", "--tier", "fast"], 2, ["not both"]),
        "unknown tier": ([*good, "--tier", "nope"], 2, ["AGENTRT_MODELS"]),
    }  # fmt: skip
    before = await total(log)
    results = await asyncio.gather(
        *(agentrt_async(settings, "fork", *a) for a, _, _ in cases.values())
    )
    assert await total(log) == before  # not one event written, by any of them
    for (case, (_, code, says)), (returncode, stderr) in zip(cases.items(), results, strict=True):
        assert returncode == code, (case, stderr)
        for text in says:
            assert text in stderr, (case, stderr)


# -- state, failures ------------------------------------------------------------------------


async def test_an_agent_with_state_folds_the_forks_own_history(
    redis: aioredis.Redis,
    log: EventLog,
    mc: ModelClient,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("ORDERS_CALLS", str(calls))
    agents = [Fulfilment(), Auditor()]
    run_id = await send(redis, OrderPlaced(order_id="o1", sku="SKU-1", quantity=2))
    async with running(agents, redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the audit")
    assert len(calls.read_text().splitlines()) == 1
    plan = await plan_fork(log, run_id, 1, agents)
    llm = ForkLLM(mc.client, settings, offline=True, at=1, change=Change())
    report = await fork(
        log, plan, services=ForkServices(log, redis, llm, settings), change=Change()
    )
    # Step 1 (the reservation) is the fork point: the tool ran again, under the fork's key.
    assert len(calls.read_text().splitlines()) == 2
    assert [(a.agent, a.reused, a.live) for a in report.activations] == [
        ("fulfilment", [], [1]),
        ("auditor", [], []),
    ]
    # The auditor's state is the fork's events before its trigger, as replay will fold them.
    child = await load_run(log, report.run_id)
    auditor = child.activations[1]
    [audited] = auditor.emitted
    assert isinstance(audited.body, OrderAudited)
    assert audited.body.seen_by == f"{len(child.history_before(auditor.trigger))} earlier"
    assert any(e.event_type == "run.forked" for e in child.history_before(auditor.trigger))


class FailingResponder(Responder):
    """The responder, changed so that it fails after its model call."""

    async def handle(self, event: Any, ctx: Any) -> None:
        await ctx.llm("Say something", tools=[])
        raise RuntimeError("the changed responder fails")


async def test_a_handler_that_fails_in_the_fork_is_recorded_there(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    agents = [Triage(), FailingResponder()]
    plan = await plan_fork(log, parent, RESPONDER_LLM, agents)
    llm = ForkLLM(mc.client, settings, offline=True, at=RESPONDER_LLM, change=Change())
    report = await fork(
        log, plan, services=ForkServices(log, redis, llm, settings), change=Change()
    )
    triage, responder = report.activations
    assert triage.outcome == "completed" and responder.outcome == "dead_lettered"
    assert responder.error == "RuntimeError: the changed responder fails"
    assert responder.live == [RESPONDER_LLM]  # its model call was made and recorded
    child = await load_run(log, report.run_id)
    assert [a.outcome for a in child.activations] == ["completed", "dead_lettered"]
    dead = child.activations[1].dead_lettered
    assert dead is not None and dead.error_type == "RuntimeError"
    outcomes = await log.pool.fetch(
        f'SELECT consumer, outcome FROM "{log.schema}".inbox WHERE run_id = $1', report.run_id
    )
    assert sorted(tuple(r) for r in outcomes) == [
        ("responder", "dead_lettered"),
        ("triage", "completed"),
    ]


async def test_a_fork_beside_running_workers_commits_whole_and_runs_nowhere_else(
    redis: aioredis.Redis, log: EventLog, mc: ModelClient, settings: Settings
) -> None:
    """The deployment's relay publishes the fork's emitted events to the workers; they must
    find them handled (the fork's commit has their inbox rows) and call nothing."""
    llm = LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))
    run_id = await send(redis, email())
    async with running(AGENTS, redis, log, llm=llm):
        await wait_for(lambda: _has(log, "reply.drafted"), what="the drafted reply")
        await wait_for(lambda: _has(log, "activation.completed", 2), what="two completions")
        requests = model_requests(mc)
        forks = [
            await run_fork(log, redis, mc, settings, run_id, RESPONDER_LLM, Change(model="m-x"))
            for _ in range(5)
        ]
        # Each fork's classified email reaches the responder's stream; wait until the
        # worker has taken (and settled) every one of them.
        await wait_for(lambda: _settled(redis, len(forks) + 1), what="the workers' duplicates")
    assert model_requests(mc) - requests == len(forks)  # the forks' own calls, nothing more
    for report in forks:
        record = await load_run(log, report.run_id)
        assert [(a.agent, a.outcome) for a in record.activations] == [
            ("triage", "completed"),
            ("responder", "completed"),
        ]
        types = [e.event_type for e in record.events]
        assert types.count("activation.completed") == 2
        assert "activation.dead_lettered" not in types
        steps = steps_of(record.events)
        assert steps[("responder", 1)].request["model"] == "m-x"


async def _settled(redis: aioredis.Redis, delivered: int) -> bool:
    from runtime.streams.keys import agent_stream

    stream = agent_stream("responder")
    entries = await redis.xrange(stream, "-", "+") or []
    if len(entries) < delivered:
        return False
    [group] = [
        g for g in await redis.xinfo_groups(stream) if g["name"] in ("responder", b"responder")
    ]
    read_all = group["last-delivered-id"] == entries[-1][0]
    return bool(read_all and int(group["pending"]) == 0)


async def test_replay_of_a_fork_that_changes_no_code_is_identical(
    redis: aioredis.Redis,
    log: EventLog,
    mc: ModelClient,
    settings: Settings,
    parent: uuid.UUID,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork is a run like another: replaying it with the app's code reproduces it (its
    copied steps, the state folded over what its commit wrote, its outputs)."""
    from projections.replay import replay_run

    report = await run_fork(log, redis, mc, settings, parent, RESPONDER_LLM)
    replayed = await replay_run(log, AGENTS, report.run_id, settings=settings, snapshots=False)
    assert replayed.identical, replayed.divergent
    # An agent that folds the run's events: the fork's ctx.state is what replay folds.
    monkeypatch.setenv("ORDERS_CALLS", str(tmp_path / "calls.txt"))
    orders = [Fulfilment(), Auditor()]
    run_id = await send(redis, OrderPlaced(order_id="o2", sku="SKU-2"))
    async with running(orders, redis, log):
        await wait_for(lambda: _has(log, "orders.audited"), what="the audit")
    plan = await plan_fork(log, run_id, 1, orders)
    llm = ForkLLM(mc.client, settings, offline=True, at=1, change=Change())
    child = await fork(log, plan, services=ForkServices(log, redis, llm, settings), change=Change())
    replayed = await replay_run(log, orders, child.run_id, settings=settings, snapshots=False)
    assert replayed.identical, replayed.divergent
