"""``agentrt up`` and ``agentrt demo`` with the sample application, end to end.

Real processes (the supervisor and its children) against real servers, the offline model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.ops.embedded import EmbeddedServices
from runtime.settings import Settings
from tests.support.procs import alive, descendants
from webhooks.config import load
from webhooks.demo.agents import Triaged, risk
from webhooks.demo.traffic import EMAILS, ORDER_CHANGES, sample_posts


def _env(settings: Settings | None, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(AGENTRT_STATE_DIR=str(state), AGENTRT_POLL_INTERVAL="0.05",
               ANTHROPIC_API_KEY="")  # fmt: skip
    if settings is not None:
        env.update(REDIS_URL=settings.require_redis_url(),
                   DATABASE_URL=settings.require_database_url(),
                   AGENTRT_DB_SCHEMA=settings.db_schema)  # fmt: skip
    return env


async def test_demo_runs_every_sample_webhook_to_its_end(
    settings: Settings, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", "demo", "--port", "0",
        env=_env(settings, tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out_b, _ = await asyncio.wait_for(proc.communicate(), 240)
    out = out_b.decode(errors="replace")
    assert proc.returncode == 0, out
    assert "-> 401 signature_mismatch" in out and "duplicate=True" in out
    assert "audit verify: ok" in out
    expected = len(EMAILS) + len(ORDER_CHANGES)
    conn = await asyncpg.connect(settings.require_database_url())
    try:
        q = f'"{settings.db_schema}"'
        runs = await conn.fetch(f'SELECT * FROM "{settings.read_schema}".runs')
        assert len(runs) == expected
        types = [r[0] for r in await conn.fetch(f"SELECT event_type FROM {q}.events")]
        assert types.count("email.received") == len(EMAILS)
        assert types.count("row.changed") == len(ORDER_CHANGES)
        assert types.count("support.ignored") == 1  # the spam
        assert types.count("support.triaged") == len(EMAILS) - 1
        assert types.count("shop.anomaly_flagged") == 2  # the ordinary change is not
        # Each triaged ticket was planned, researched and drafted, and reviewed: replies
        # below the approval risk went out, the others wait for a human.
        tickets = [Triaged(**{k: v for k, v in msgspec.json.decode(d[0]).items() if k != "type"})
                   for d in await conn.fetch(f"SELECT data FROM {q}.events "
                                             "WHERE event_type = 'support.triaged'")]  # fmt: skip
        risky = sum(risk(t) >= 3 for t in tickets)
        assert 0 < risky < len(tickets)  # both paths are exercised
        assert types.count("supervision.finished") == len(tickets)
        assert types.count("task.completed") == 2 * len(tickets)  # research and writer
        assert types.count("approval.requested") == risky
        assert types.count("support.reply_sent") == len(tickets) - risky
        assert types.count("state.transition_refused") == 0
        statuses = sorted(r["status"] for r in runs)
        assert statuses == sorted(["waiting_for_approval"] * risky
                                  + ["completed"] * (expected - risky))  # fmt: skip
        # No run waits on a timer: the desk cancelled its subtasks' timeouts.
        assert types.count("timer.cancelled") == types.count("timer.scheduled") - risky
        # Totals of the runs read model = the sums of the recorded model calls.
        steps = await conn.fetch(
            f"SELECT run_id, data FROM {q}.events WHERE event_type = 'step.recorded'"
        )
        tokens: dict[object, int] = {}
        for run_id, data in steps:
            usage = msgspec.json.decode(data).get("usage")
            if usage:
                tokens[run_id] = tokens.get(run_id, 0) + usage["input_tokens"] + usage[
                    "output_tokens"]  # fmt: skip
        for r in runs:
            assert r["input_tokens"] + r["output_tokens"] == tokens.get(r["run_id"], 0)
        assert sum(tokens.values()) > 0
        triaged = await conn.fetch(
            f"SELECT data FROM {q}.events WHERE event_type = 'support.triaged'"
        )
        labels = {msgspec.json.decode(d[0])["subject"]: msgspec.json.decode(d[0])
                  for d in triaged}  # fmt: skip
        for e in EMAILS:
            if e.kind == "spam":
                continue
            got = labels[e.subject]
            assert (got["category"], got["language"]) == (e.kind, e.language), e.subject
    finally:
        await conn.close()


def _runs(api: str, auth: dict[str, str], done: object) -> list[dict[str, object]]:
    """The API's runs once ``done(runs)`` holds (60 s at most): the last answer."""
    deadline = time.monotonic() + 60
    runs: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{api}/runs", headers=auth, timeout=5)
        except httpx.ConnectError:  # the API may start after the ingress
            time.sleep(0.3)
            continue
        if answer.is_success:
            runs = answer.json()["items"]
            if done(runs):  # type: ignore[operator]
                break
        time.sleep(0.3)
    return runs


async def _status_line(state: Path, port: int) -> dict[str, str]:
    """The figures of `agentrt up`'s status line, from every plugin, as it asks them."""
    import projections.up
    import webhooks.up
    from runtime.cli.up import UpPlan, core_status

    urls = json.loads((state / "services.json").read_text())
    settings = Settings.from_env({}, state_dir=state).with_urls(
        redis_url=urls["REDIS_URL"], database_url=urls["DATABASE_URL"]
    )
    plan = UpPlan(settings, "webhooks.demo.agents", "127.0.0.1", port, 1, False)
    figures: dict[str, str] = {}
    for source in (core_status, webhooks.up.status, projections.up.status):
        figures.update(await source(plan))
    return figures


def _up(state: Path, port: int) -> subprocess.Popen[bytes]:
    with open(state.parent / "up.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "runtime", "up", "--port", str(port)],
            env=_env(None, state), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "agentrt up exited early"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the ingress did not become ready")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_up_from_an_empty_state_serves_stops_and_starts_again(tmp_path: Path) -> None:
    """Embedded servers from an empty state directory; a webhook end to end; SIGINT stops
    everything within seconds, no process left; a second start finds the same data."""
    from runtime.cli.up import free_base_port

    state = tmp_path / "state"
    try:
        for round_ in (1, 2):
            # Ports of their own each time: other tests may take the last ones meanwhile.
            port = free_base_port("127.0.0.1")
            url = f"http://127.0.0.1:{port}"
            proc = _up(state, port)
            try:
                _wait_ready(proc, url)
                _, sources = load(state / "webhooks.toml")
                # 1: the complaint (it waits for approval), 2: an ordinary ticket.
                post = sample_posts(sources)[5 if round_ == 1 else 1]
                r = httpx.post(f"{url}/webhooks/{post.source}", content=post.body,
                               headers=post.headers, timeout=10)  # fmt: skip
                assert r.status_code == 202, r.text
                token = (state / "api-token").read_text().strip()
                api = f"http://127.0.0.1:{port + 1}"
                auth = {"authorization": f"Bearer {token}"}
                if round_ == 1:
                    [run] = _runs(api, auth, lambda rs: rs and rs[0]["status"] != "running")
                    assert run["status"] == "waiting_for_approval", run
                    # Approved over HTTP, as a person would from a UI.
                    events = httpx.get(f"{api}/runs/{run['run_id']}/events", headers=auth,
                                       timeout=5).json()["items"]  # fmt: skip
                    [asked] = [e for e in events if e["event_type"] == "approval.requested"]
                    r = httpx.post(
                        f"{api}/runs/{run['run_id']}/approvals/{asked['body']['approval_id']}",
                        json={"approved": True, "by": "ops"}, headers=auth, timeout=5,
                    )  # fmt: skip
                    assert r.status_code == 200, r.text
                runs = _runs(api, auth, lambda rs, n=round_: len(rs) == n
                             and all(x["status"] == "completed" for x in rs))  # fmt: skip
                assert len(runs) == round_ and {x["status"] for x in runs} == {"completed"}, runs
                line = asyncio.run(_status_line(state, port))
                assert int(line.pop("activations")) >= 8 * round_  # triage, desk, ... per ticket
                assert line == {
                    "webhooks in": "1",  # this process's count: the ingress restarted
                    "runs": f"completed {round_}",
                    "cost": "$0.0000",  # the offline model's
                }
                # One metrics endpoint: every child's, summed (this start's processes only).
                text = httpx.get(f"http://127.0.0.1:{port + 2}/metrics", timeout=5).text
                samples = {
                    (m.name, tuple(sorted(m.labels.items()))): m.value
                    for f in text_string_to_metric_families(text) for m in f.samples
                }  # fmt: skip
                done = sum(v for (n, labels), v in samples.items()
                           if n == "agentrt_activations_total" and ("outcome", "completed")
                           in labels)  # fmt: skip
                assert done >= 8, text  # every agent of the ticket, this start
                live = {dict(labels)["component"] for (n, labels), v in samples.items()
                        if n == "agentrt_processes" and v > 0}  # fmt: skip
                assert {"ingress", "worker", "relay", "projector"} <= live, live
                family = descendants(proc.pid)
                assert len(family) >= 5  # ingress, api, projector, worker, relay
            finally:
                started = time.monotonic()
                proc.send_signal(signal.SIGINT)
                code = proc.wait(timeout=40)
                took = time.monotonic() - started
            assert code == 0, (state.parent / "up.log").read_text()
            assert took < 20
            deadline = time.monotonic() + 5
            while any(alive(p) for p in family) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not [p for p in family if alive(p)]
            # It started the embedded servers, so it stopped them too.
            assert not any(s.running for s in EmbeddedServices(state).status())
    finally:
        subprocess.run([sys.executable, "-m", "runtime", "services", "down"],
                       env=_env(None, state), capture_output=True, timeout=60)  # fmt: skip


def test_webhooks_sign_finds_the_sources_up_made(tmp_path: Path) -> None:
    """With no ./webhooks.toml, `agentrt webhooks sign` signs with the secrets `agentrt up`
    made and printed (so the README's curl works right after `agentrt up`)."""
    from webhooks.auth import verify_standard
    from webhooks.demo.traffic import sample_config

    state = tmp_path / "state"
    made = sample_config(state / "webhooks.toml")
    body = tmp_path / "message.eml"
    body.write_bytes(b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "webhooks", "sign", str(body), "--source", "mta"],
        env=_env(None, state) | {"PYTHONPATH": os.getcwd()}, cwd=work, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    headers = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    _, sources = load(made)
    assert verify_standard(sources["mta"].keys, headers, body.read_bytes())
    assert "webhooks.toml" in result.stderr  # it says which file it used


def test_up_with_json_logs_writes_only_json(settings: Settings, tmp_path: Path) -> None:
    """AGENTRT_LOG_JSON: what `agentrt up` itself says (ready, where each service is, the
    status, stopping) is one JSON object a line, like every other agentrt line. With
    --open it says where the run explorer is and opens it in the browser ($BROWSER here:
    a script that writes down the URL it is given) once the API is up."""
    from runtime.cli.up import free_base_port

    port = free_base_port("127.0.0.1")
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" >> {opened}\n')
    browser.chmod(0o755)
    env = _env(settings, tmp_path) | {"AGENTRT_LOG_JSON": "true", "BROWSER": f"{browser} %s"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "up", "--port", str(port), "--open"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    explorer = f"http://127.0.0.1:{port + 1}/ui/"
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not opened.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "agentrt up exited early"
            time.sleep(0.2)
        # The browser was sent to the explorer, and the API answers there by then.
        assert opened.read_text().split() == [explorer]
        login = httpx.get(explorer, timeout=5, follow_redirects=True)
        assert login.status_code == 200 and "API token" in login.text
        time.sleep(1)  # the lines after "ready"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0, out.decode(errors="replace")
    lines = [line for line in out.decode().splitlines() if line.strip()]
    events = [json.loads(line)["event"] for line in lines]  # each line parses, or this fails
    assert "up.ready" in events and "up.stopping" in events
    services = [json.loads(line) for line in lines if '"up.service"' in line]
    assert {"ingress", "api", "metrics"} <= {s["service"] for s in services}
    about = [s.get("about", "") for s in services if s["service"] == "api"]
    assert any(a.startswith(f"run explorer: {explorer} (sign in with the API token: kept in ")
               for a in about), about  # fmt: skip
    assert [json.loads(line)["url"] for line in lines if '"up.open"' in line] == [explorer]


def test_open_skips_a_service_not_ready_and_says_when_no_browser_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--open: only ready services' pages are opened; a browser that cannot be started is
    said, with the URL to open by hand (webbrowser stands in for the desktop here)."""
    import threading
    import webbrowser

    from rich.console import Console

    from runtime.cli.up import Service, _Say, open_pages

    asked: list[str] = []
    done = threading.Event()

    def fake_open(url: str, *args: Any, **kwargs: Any) -> bool:
        asked.append(url)
        done.set()
        return False  # no browser on this machine

    monkeypatch.setattr(webbrowser, "open", fake_open)
    console = Console(record=True, width=200)
    services = [
        Service("api", [], open_url="http://127.0.0.1:1/ui/"),
        Service("late", [], open_url="http://127.0.0.1:2/ui/"),
        Service("worker", []),
    ]
    opened = open_pages(services, ["late"], _Say(console, json=False))
    assert opened == ["http://127.0.0.1:1/ui/"]
    assert done.wait(10)
    deadline = time.monotonic() + 10
    while "yourself" not in console.export_text(clear=False) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = console.export_text(clear=False)
    assert asked == ["http://127.0.0.1:1/ui/"]
    assert "not opening the pages of late: not ready" in text
    assert "no browser found: open http://127.0.0.1:1/ui/ yourself" in text
    assert open_pages(services[2:], [], _Say(console, json=False)) == []
