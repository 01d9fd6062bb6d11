"""The agentrt command, end to end against the test servers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from importlib.metadata import EntryPoint

import pytest
import typer
from typer.testing import CliRunner

from runtime.cli import app as cli
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support.events import Noted


def agentrt(
    settings: Settings, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def env_for(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "REDIS_URL": settings.require_redis_url(),
        "AGENTRT_DB_SCHEMA": settings.db_schema,
        "AGENTRT_POLL_INTERVAL": "0.05",
    }


def test_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    for command in ("services", "db", "audit", "log", "demo"):
        assert command in result.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "runtime", "log", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "tail" in sub.stdout


def test_db_migrate_and_status(settings: Settings) -> None:
    migrate = agentrt(settings, "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr
    assert "up to date" in migrate.stdout
    status = agentrt(settings, "db", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "applied  0001_event_log" in status.stdout
    assert "NOT in force" not in status.stdout
    assert "applied  0002_agents" in status.stdout
    # Two triggers on each of events, seals, seal_heads and inbox, and three role checks.
    assert status.stdout.count("in force") == 11


async def test_log_tail_prints_backlog_as_json(settings: Settings, log: EventLog) -> None:
    await log.append("s-1", [Noted(text="a"), Noted(text="b")])
    result = agentrt(settings, "log", "tail", "--no-follow", "--json", "--from-start")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["body"]["text"] for line in lines] == ["a", "b"]
    assert lines[0]["stream_id"] == "s-1"
    assert lines[0]["type"] == "test.noted"
    assert len(lines[0]["hash"]) == 64
    # --after continues from a printed position.
    after = f"{lines[0]['tx']}:{lines[0]['position']}"
    rest = agentrt(settings, "log", "tail", "--no-follow", "--json", "--after", after)
    assert [json.loads(x)["body"]["text"] for x in rest.stdout.splitlines()] == ["b"]
    bad = agentrt(settings, "log", "tail", "--after", "yesterday")
    assert bad.returncode == 2
    assert "not a log position" in bad.stderr


async def test_log_tail_follows_new_events(settings: Settings, log: EventLog) -> None:
    await log.append("s-old", [Noted(text="old")])
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "runtime", "log", "tail", "--last", "1", "--limit", "3"],
        env=env_for(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # Wait until the backlog is printed: the tail is running and following.
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"test.noted" in first
        await log.append("s-new", [Noted(text="fresh one"), Noted(text="fresh two")])
        rest, errors = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, errors
    out = (first + rest).decode()
    assert out.index("old") < out.index("fresh one") < out.index("fresh two")
    assert "test.noted" in out


def test_plugins_add_commands_and_broken_ones_are_skipped() -> None:
    root = typer.Typer()

    @root.command("builtin")
    def builtin() -> None:
        print("builtin")

    eps = [
        EntryPoint("sample", "tests.support.plugins.sample:app", cli.PLUGIN_GROUP),
        EntryPoint("direct", "tests.support.plugins.sample:register", cli.PLUGIN_GROUP),
        EntryPoint("broken", "tests.support.plugins.does_not_exist:app", cli.PLUGIN_GROUP),
        EntryPoint("weird", "tests.support.plugins.sample:not_a_command", cli.PLUGIN_GROUP),
        EntryPoint("builtin", "tests.support.plugins.sample:app", cli.PLUGIN_GROUP),
    ]
    added = cli.load_plugins(root, eps)
    assert added == ["sample", "direct"]
    runner = CliRunner()
    assert "hello from a plugin" in runner.invoke(root, ["sample", "hello"]).output
    assert "direct plugin command" in runner.invoke(root, ["sample-direct"]).output
    assert "builtin" in runner.invoke(root, ["builtin"]).output


pytestmark = pytest.mark.filterwarnings("error")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuch.module", "cannot import 'nosuch.module'"),
        ("", "name a module"),
        ("runtime.events", "defines no agents"),
        ("tests.support.apps.orders:nothing", "has no 'nothing'"),
    ],
)
def test_worker_refuses_a_bad_app_clearly(settings: Settings, target: str, message: str) -> None:
    result = agentrt(settings, "worker", "--app", target)
    assert result.returncode == 1
    assert "[app_load_failed]" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_dlq_list_show_redrive(settings: Settings) -> None:
    import redis as sync_redis

    agent = f"cli-{uuid.uuid4().hex[:8]}"
    event_id = str(uuid.uuid4())
    client = sync_redis.Redis.from_url(settings.require_redis_url())
    try:
        entry = client.xadd("agentrt:dlq", {
            "event_id": event_id, "type": "orders.placed", "body": b"{}",
            "dlq_agent": agent, "dlq_stream": "agentrt:in:{p0}", "dlq_entry_id": "1-0",
            "dlq_deliveries": "5", "dlq_error_type": "RuntimeError", "dlq_error": "boom",
            "dlq_at": "2026-11-29T00:00:00+00:00",
        }).decode()  # fmt: skip
        listed = agentrt(settings, "dlq", "list", "--agent", agent, "--json")
        assert listed.returncode == 0, listed.stderr
        [letter] = [json.loads(line) for line in listed.stdout.splitlines()]
        assert (letter["id"], letter["error_type"], letter["error"]) == (
            entry,
            "RuntimeError",
            "boom",
        )
        table = agentrt(settings, "dlq", "list", "--agent", agent)
        assert entry in table.stdout
        shown = agentrt(settings, "dlq", "show", entry)
        assert shown.returncode == 0 and f'"event_id": "{event_id}"' in shown.stdout
        missing = agentrt(settings, "dlq", "show", "1-1")
        assert missing.returncode == 1 and "no dead letter" in missing.stderr
        moved = agentrt(settings, "dlq", "redrive", entry)
        assert moved.returncode == 0, moved.stderr
        assert "1 dead letter(s) redriven" in moved.stdout
        [(_, fields)] = client.xrange(f"agentrt:agent:{{{agent}}}")
        assert fields[b"generation"] == b"1" and fields[b"event_id"].decode() == event_id
        assert not client.xrange("agentrt:dlq", entry, entry)
        assert agentrt(settings, "dlq", "redrive").returncode == 2  # neither ids nor --all
    finally:
        client.delete(f"agentrt:agent:{{{agent}}}")
        client.close()


def test_dlq_redrive_refuses_a_handled_event_unless_forced(settings: Settings) -> None:
    import asyncpg
    import redis as sync_redis

    agent = f"cli-{uuid.uuid4().hex[:8]}"
    event_id = uuid.uuid4()

    async def handled() -> None:
        conn = await asyncpg.connect(settings.require_database_url())
        try:
            await conn.execute(
                f'INSERT INTO "{settings.db_schema}".inbox '
                "(consumer, event_id, activation_id, outcome, run_id) "
                "VALUES ($1, $2, $3, 'completed', $2)",
                agent, event_id, uuid.uuid4(),
            )  # fmt: skip
        finally:
            await conn.close()

    client = sync_redis.Redis.from_url(settings.require_redis_url())
    try:
        entry = client.xadd("agentrt:dlq", {
            "event_id": str(event_id), "type": "orders.placed", "body": b"{}",
            "dlq_agent": agent, "dlq_stream": "agentrt:in:{p0}", "dlq_entry_id": "1-0",
            "dlq_deliveries": "5", "dlq_error_type": "RuntimeError", "dlq_error": "boom",
        }).decode()  # fmt: skip
        asyncio.run(handled())
        refused = agentrt(settings, "dlq", "redrive", entry)
        assert refused.returncode == 1
        assert "[redrive_refused]" in refused.stderr and "--force" in refused.stderr
        assert "0 dead letter(s) redriven, 1 refused" in refused.stdout
        assert client.xrange("agentrt:dlq", entry, entry)  # left where it was
        forced = agentrt(settings, "dlq", "redrive", "--force", entry)
        assert forced.returncode == 0, forced.stderr
        assert "forced: a second activation" in forced.stdout
        [(_, fields)] = client.xrange(f"agentrt:agent:{{{agent}}}")
        assert fields[b"forced"] == b"1" and fields[b"generation"] == b"1"
    finally:
        client.delete(f"agentrt:agent:{{{agent}}}")
        client.close()


async def test_approve_shows_what_is_asked_then_decides_once(
    settings: Settings, log: EventLog
) -> None:
    from datetime import UTC, datetime, timedelta

    from runtime.events.builtin import ApprovalRequested
    from runtime.events.model import NewEvent

    run_id, approval_id = uuid.uuid4(), uuid.uuid4()
    due = datetime.now(UTC) + timedelta(hours=1)
    asked = ApprovalRequested(approval_id=approval_id, agent="gatekeeper", subject="ship SKU-7?",
                              details={"order": "o7"}, deadline=due, default="deny")  # fmt: skip
    await log.append(f"run-{run_id}", [NewEvent(body=asked, run_id=run_id)])
    listed = await asyncio.to_thread(agentrt, settings, "approve")
    assert listed.returncode == 0, listed.stderr
    for part in (str(approval_id), "ship SKU-7?", '{"order":"o7"}', str(run_id), "gatekeeper",
                 due.isoformat(), "then: deny"):  # fmt: skip
        assert part in listed.stdout, (part, listed.stdout)
    decided = await asyncio.to_thread(agentrt, settings, "approve", str(approval_id), "--by", "ada")
    assert decided.returncode == 0, decided.stderr
    assert "ship SKU-7?" in decided.stdout and f"approved {approval_id}" in decided.stdout
    again = await asyncio.to_thread(
        agentrt, settings, "approve", str(approval_id), "--deny", "--by", "bob"
    )
    assert again.returncode == 1 and "already approved by ada" in again.stderr
    none_left = await asyncio.to_thread(agentrt, settings, "approve")
    assert "no approvals waiting" in none_left.stdout
