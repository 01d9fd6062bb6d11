"""agentrt runs and agentrt runs show, on runs made by real workers with the offline model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from runtime.effects.retry import RetryPolicy
from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.apps.mailpair import Responder, Triage
from tests.support.runtime import count_type, running, send, wait_for
from webhooks.events import Address, EmailReceived


def agentrt(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "COLUMNS": "250",  # rich: room for every column, ids unbroken
        "NO_COLOR": "1",
    }
    env.pop("AGENTRT_APP", None)
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def email(n: int, sender: str) -> EmailReceived:
    return EmailReceived(
        source="test",
        provider="raw",
        message_id=f"<cli{n}@example.com>",
        sender=Address(sender),
        subject=f"Login broken {n}",
        text="Since I reset my password the login page shows an error.",
    )


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[LLM]:
    async with model_client(settings) as mc:
        assert mc.offline
        yield LLM(mc.client, settings, offline=True, policy=RetryPolicy(max_attempts=2))


@pytest.fixture
async def two_runs(redis: aioredis.Redis, log: EventLog, llm: LLM) -> tuple[uuid.UUID, uuid.UUID]:
    """Two demo runs (triage: llm + tool + emit; responder: llm + emit), NOT projected:
    the commands catch up themselves."""
    a = await send(redis, email(1, "ada@example.com"))
    b = await send(redis, email(2, "grace@example.com"))
    async with running([Triage(), Responder()], redis, log, llm=llm):
        await wait_for(lambda: _at_least(log, "reply.drafted", 2), seconds=60, what="replies")
        await wait_for(lambda: _at_least(log, "activation.completed", 4), what="4 completions")
    return a, b


async def _at_least(log: EventLog, event_type: str, n: int) -> bool:
    return await count_type(log, event_type) >= n


async def test_runs_lists_the_runs_after_catching_up(
    settings: Settings, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_runs
    stale = agentrt(settings, "runs", "--no-catch-up")
    assert stale.returncode == 1  # nothing folded yet: the read model does not exist
    assert "[projection_not_found]" in stale.stderr

    table = agentrt(settings, "runs")
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if str(a) in line or str(b) in line]
    assert len(lines) == 2, table.stdout
    for line in lines:
        assert "completed" in line and "responder, triage" in line
        assert "2/1" in line  # llm/tool calls
        assert "email.received" in line

    # Filters, JSON, and the cursor: one page of one run, then the other.
    first = agentrt(settings, "runs", "--json", "--limit", "1", "--status", "completed",
                    "--agent", "responder", "--since", "2000-01-01", "--no-catch-up")  # fmt: skip
    assert first.returncode == 0, first.stderr
    page = json.loads(first.stdout)
    assert len(page["items"]) == 1 and page["items"][0]["status"] == "completed"
    rest = agentrt(settings, "runs", "--cursor", page["next_cursor"], "--no-catch-up")
    assert rest.returncode == 0, rest.stderr
    (other,) = {str(a), str(b)} - {page["items"][0]["run_id"]}
    assert other in rest.stdout and page["items"][0]["run_id"] not in rest.stdout
    assert "more:" not in rest.stderr  # the last page

    bad = agentrt(settings, "runs", "--status", "nope", "--no-catch-up")
    assert bad.returncode == 1 and "[invalid_query]" in bad.stderr


async def test_runs_show_prints_the_trigger_before_its_steps(
    settings: Settings, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_runs
    shown = agentrt(settings, "runs", "show", str(a))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"run {a}" in text and "completed" in text
    assert str(b) not in text
    trigger = text.index("email.received")
    steps = [text.index(s) for s in ("step 1 llm", "step 2 tool lookup_customer")]
    assert trigger < min(steps), text
    # In the log the steps come first (appended before the trigger commits).
    events = await log.read_run(a)
    assert events[0].event_type == "step.recorded"
    # The responder's activation hangs under the emitted event that triggered it.
    classified = text.index("triage.classified")
    assert classified < text.index("step 1 llm claude-sonnet-5-5 responder")
    assert classified < text.index("reply.drafted")
    assert text.count("activation.completed") == 2
    assert "tokens" in text and "$" in text and " ms" in text

    doc = json.loads(agentrt(settings, "runs", "show", str(a), "--json").stdout)
    assert doc["run"]["run_id"] == str(a)
    assert {e["event_id"] for e in doc["timeline"]} == {str(e.event_id) for e in events}
    assert doc["timeline"][0]["event_id"] == str(a)


async def test_runs_show_of_an_unknown_run_exits_1_with_the_code(settings: Settings) -> None:
    missing = agentrt(settings, "runs", "show", str(uuid.uuid4()))
    assert missing.returncode == 1
    assert "[run_not_found]" in missing.stderr
    garbage = agentrt(settings, "runs", "show", "not-a-uuid")
    assert garbage.returncode == 2 and "not a run id" in garbage.stderr
