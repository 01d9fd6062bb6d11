"""agentrt diff: a demo run and its fork part at the fork's changed step; a run against itself
has no differences; both runs' costs are shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import msgspec
import pytest
import redis.asyncio as aioredis

from projections.diff import diff_records, diff_runs, unified
from projections.errors import UnknownRun
from projections.fork import Change
from projections.record import load_run
from runtime.events.builtin import StepRecorded
from runtime.llm.client import ModelClient
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections.test_fork import RESPONDER_LLM, mc, parent, run_fork

__all__ = ["mc", "parent"]  # fixtures shared with the fork tests

PROMPT = "You write very short replies.\nAnswer in JSON."


async def test_a_fork_and_its_parent_part_at_the_changed_step(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    child = (
        await run_fork(log, redis, mc, settings, parent, RESPONDER_LLM, Change(prompt=PROMPT))
    ).run_id
    d = await diff_runs(log, parent, child)
    assert not d.identical
    assert (
        d.first_difference == f"step {RESPONDER_LLM} (responder, its step 1): the request differs"
    )
    triage, responder = d.activations
    assert triage.agent == "triage" and triage.same  # reused: the same requests and results
    assert responder.agent == "responder" and not responder.same
    [step] = responder.steps
    assert (step.run_step_a, step.run_step_b, step.same_request) == (3, 3, False)
    assert any(line.startswith("+") and "very short replies" in line for line in step.diff)
    assert any(line.startswith("-") and "friendly replies" in line for line in step.diff)
    # Both runs' totals, from their recorded steps.
    for t in (d.totals_a, d.totals_b):
        assert (t.steps, t.model_calls, t.tool_calls) == (3, 2, 1)
        assert t.input_tokens > 0 and t.output_tokens > 0 and t.cost_usd == 0.0  # offline
    parent_steps = [e.body for e in await log.read_run(parent) if isinstance(e.body, StepRecorded)]
    assert d.totals_a.input_tokens == sum(s.usage.input_tokens for s in parent_steps if s.usage)
    # JSON: every field, and the summary.
    data = json.loads(msgspec.json.encode(d.to_json()))
    assert data["identical"] is False and data["first_difference"] == d.first_difference
    assert data["totals_b"]["model_calls"] == 2


async def test_a_run_against_itself_has_no_differences(log: EventLog, parent: uuid.UUID) -> None:
    d = await diff_runs(log, parent, parent)
    assert d.identical and d.first_difference is None
    assert all(a.same and not a.steps and not a.emitted for a in d.activations)
    assert d.totals_a == d.totals_b


async def test_a_live_rerun_with_no_change_has_the_same_steps_and_events(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    # The offline model answers the same request the same way: a fork that changes nothing
    # and runs the responder live again must compare equal (message ids, usage ignored).
    child = (await run_fork(log, redis, mc, settings, parent, RESPONDER_LLM)).run_id
    d = await diff_runs(log, parent, child)
    assert d.identical, d.first_difference


async def test_activations_present_in_one_run_only(log: EventLog, parent: uuid.UUID) -> None:
    record = await load_run(log, parent)
    shorter = type(record)(record.run_id, record.events, record.activations[:1])
    d = diff_records(record, shorter)
    assert d.first_difference == "activation 1 of responder is only in run A"
    assert [a.only_in for a in d.activations] == [None, "a"]


async def test_unknown_runs_are_refused(log: EventLog, parent: uuid.UUID) -> None:
    with pytest.raises(UnknownRun):
        await diff_runs(log, parent, uuid.uuid4())
    with pytest.raises(UnknownRun):
        await diff_runs(log, uuid.uuid4(), parent)


def test_a_long_diff_is_cut() -> None:
    lines = unified("\n".join(map(str, range(100))), "\n".join(map(str, range(100, 200))))
    assert len(lines) == 25 and lines[-1].startswith("…")
    assert all(len(line) <= 160 for line in unified("x" * 1000, "y" * 1000))


@pytest.mark.slow
async def test_the_command(
    log: EventLog, redis: aioredis.Redis, mc: ModelClient, settings: Settings, parent: uuid.UUID
) -> None:
    child = (
        await run_fork(log, redis, mc, settings, parent, RESPONDER_LLM, Change(prompt=PROMPT))
    ).run_id
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
    }
    done = subprocess.run([sys.executable, "-m", "runtime", "diff", str(parent), str(child)],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "first difference: step 3 (responder, its step 1): the request differs" in done.stdout
    assert "A: 3 steps (2 model, 1 tool)" in done.stdout
    assert "B: 3 steps (2 model, 1 tool)" in done.stdout
    assert "very short replies" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "runtime", "diff", str(parent),
                              str(uuid.uuid4())], env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert missing.returncode == 1 and "[run_not_found]" in missing.stderr
