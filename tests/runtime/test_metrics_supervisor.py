"""The supervisor's side of one metrics view: prepare the directory, serve it, reap children.

The children are real processes started with the environment ``prepare_multiprocess``
returns, recording through runtime.ops.metrics as workers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.log.store import EventLog
from runtime.ops import metrics
from runtime.settings import Settings
from tests.runtime.test_cli import env_for
from tests.support import REPO
from tests.webhooks.test_metrics_multiprocess import free_port

CHILD = """
import sys
from runtime.ops import metrics
assert metrics.multiprocess_dir() is not None, "not in multiprocess mode"
metrics.process_started("worker")
metrics.ACTIVATIONS.labels("triage", "completed").inc(int(sys.argv[1]))
metrics.CONSUMER_LAG.labels("triage", "s").set(int(sys.argv[1]))
print("ready", flush=True)
if sys.argv[2] == "stay":
    sys.stdin.read()  # until the test closes it
"""


def child(env: dict[str, str], count: int, *, stay: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(count), "stay" if stay else "exit"],
        env={**os.environ, **env},
        cwd=REPO,
        stdin=subprocess.PIPE if stay else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline().strip() == "ready"
    return proc


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_the_supervisor_serves_all_its_children(tmp_path: Path) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"a previous run's file")
    env = metrics.prepare_multiprocess(shared)
    assert env == {metrics.MULTIPROC_ENV: str(shared)}
    assert not list(shared.iterdir()), "a previous run's files are removed"

    staying = child(env, 3, stay=True)
    gone = child(env, 4, stay=False)
    assert gone.wait(30) == 0
    server = metrics.serve_metrics(0, shared, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.port}"
        text = httpx.get(f"{url}/metrics", timeout=10).text
        # Counters of both, the exited one included; the live gauge of the running one only.
        assert sample(text, "agentrt_activations_total", agent="triage") == 7
        assert sample(text, "agentrt_processes", component="worker") == 1
        assert sample(text, "agentrt_consumer_lag", agent="triage") == 3
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{url}/nothing", timeout=10).status_code == 404

        # The supervisor reaps the other one and says so: its live gauges go at once.
        assert staying.stdin is not None
        staying.stdin.close()
        assert staying.wait(30) == 0
        metrics.mark_dead(staying.pid, shared)
        assert not list(shared.glob(f"gauge_live*_{staying.pid}.db"))
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert sample(text, "agentrt_activations_total", agent="triage") == 7
        assert sample(text, "agentrt_processes", component="worker") is None
    finally:
        server.close()
        server.close()  # idempotent
    metrics.remove_dir(shared)
    assert not shared.exists()


def test_without_pruning_an_exited_child_counts_as_live(tmp_path: Path) -> None:
    """Broken variant: the plain multiprocess collector keeps a dead child's live gauge."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    env = metrics.prepare_multiprocess(tmp_path)
    gone = child(env, 2, stay=False)
    assert gone.wait(30) == 0
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(tmp_path))
    text = generate_latest(registry).decode()
    assert sample(text, "agentrt_processes", component="worker") == 1  # dead, still counted
    pruned = generate_latest(metrics.scrape_registry(tmp_path)).decode()
    assert sample(pruned, "agentrt_processes", component="worker") is None
    assert sample(pruned, "agentrt_activations_total", agent="triage") == 2


def test_a_path_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "file"
    taken.write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        metrics.prepare_multiprocess(taken)
    with pytest.raises(NotADirectoryError, match="PROMETHEUS_MULTIPROC_DIR"):
        metrics.scrape_registry(tmp_path / "missing")


async def test_a_long_running_command_serves_its_health_check(
    log: EventLog, settings: Settings
) -> None:
    """What compose's health check of the projector (relay, worker alike) asks for."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", "projector", "--metrics-port", str(port),
        env=env_for(settings), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/healthz")).status_code == 200:
                        break
                assert proc.returncode is None, "the projector exited"
                assert time.monotonic() < deadline, "no health check answer"
                await asyncio.sleep(0.1)
            text = (await client.get(f"{url}/metrics")).text
            assert sample(text, "agentrt_processes", component="projector") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
