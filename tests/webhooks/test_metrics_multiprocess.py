"""One /metrics for `agentrt serve --workers N`: every process's counts, summed.

The workers are real uvicorn processes against the test Redis. Which worker accepts a
connection is the kernel's choice, so the tests post until the per-process metric files
show that both accepted some, then check what one scrape says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from runtime.ops import metrics
from tests.support import REPO
from tests.support.servers import Servers
from tests.support.webhooks import redis_url_for_tests

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)"),
]

CONFIG = """
[ingress]
partitions = 2

[sources.open]
format = "generic"
auth = "none"
"""
ACCEPTED = ("agentrt_webhook_requests_total", {"source": "open", "outcome": "accepted"})
INGRESS = ("agentrt_processes", {"component": "ingress"})


# -- processes and files -------------------------------------------------------------------


def workers_of(parent: int) -> set[int]:
    """uvicorn's worker processes: ``parent``'s children started by multiprocessing spawn."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.add(int(stat.parent.name))
    return found


def shared_dir_of(pid: int) -> Path:
    """The multiprocess directory a worker was started with (from its environment)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = item.partition(b"=")
        if name.decode() == metrics.MULTIPROC_ENV:
            return Path(value.decode())
    raise AssertionError(f"worker {pid} has no {metrics.MULTIPROC_ENV}")


def value(families: CollectorRegistry | str, wanted: tuple[str, dict[str, str]]) -> float:
    """The sample ``wanted`` (name, labels) in a registry or an exposition text; 0 if absent."""
    name, labels = wanted
    if isinstance(families, str):
        parsed = list(text_string_to_metric_families(families))
    else:
        parsed = list(families.collect())
    for family in parsed:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def collected(files: list[Path], scratch: Path) -> CollectorRegistry:
    """The multiprocess collector over just ``files`` (one process's view, or all of them)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for f in files:
        shutil.copy(f, scratch / f.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(scratch))
    return registry


def accepted_per_process(shared: Path, scratch: Path) -> dict[int, float]:
    counts = {}
    for f in shared.glob("counter_*.db"):
        pid = int(f.stem.rpartition("_")[2])
        counts[pid] = value(collected([f], scratch / str(pid)), ACCEPTED)
    return counts


# -- serving and posting -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], object], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def post_one(url: str) -> bool:
    """One webhook on a fresh connection (so the kernel may hand it to either worker)."""
    body = json.dumps({"n": uuid.uuid4().hex}).encode()
    response = httpx.post(
        f"{url}/webhooks/open",
        content=body,
        headers={"content-type": "application/json", "connection": "close"},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return not response.json()["duplicate"]


def post_until_spread(url: str, parent: int, shared: Path, scratch: Path) -> int:
    """Post rounds of concurrent webhooks until each worker has accepted some; the total."""
    total = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(60):
            total += sum(pool.map(lambda _: post_one(url), range(16)))
            counts = accepted_per_process(shared, scratch)
            live = workers_of(parent)
            if len(live) == 2 and all(counts.get(pid, 0) > 0 for pid in live):
                return total
    raise AssertionError(f"one worker took every webhook: {counts} (workers {live})")


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def scrape(self) -> str:
        # A fresh connection each time: any of the workers may answer.
        response = httpx.get(f"{self.url}/metrics", headers={"connection": "close"}, timeout=30)
        assert response.status_code == 200, response.text
        return response.text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start(args: list[str], env: dict[str, str], workdir: Path) -> Served:
    port = free_port()
    log = workdir / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *args, "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: healthy(served.url) or proc.poll() is not None, "the ingress")
        wait_until(lambda: len(workers_of(proc.pid)) == 2, "two workers")
    except AssertionError:
        served.stop()
        raise AssertionError(f"the ingress did not start: {log.read_text()}") from None
    if proc.poll() is not None:
        raise AssertionError(f"the ingress exited: {log.read_text()}")
    return served


@pytest.fixture
def environment(servers: Servers, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "webhooks.toml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "REDIS_URL": redis_url_for_tests(servers.redis_url),
        "DATABASE_URL": servers.database_url,
        "AGENTRT_WEBHOOKS_CONFIG": str(config),
    }
    env.pop(metrics.MULTIPROC_ENV, None)
    return env


@pytest.fixture
def serve_two(environment: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    served = start(["-m", "runtime", "serve", "--workers", "2"], environment, tmp_path)
    try:
        yield served
    finally:
        served.stop()


# -- the tests -------------------------------------------------------------------------------


def test_one_scrape_sums_every_worker(serve_two: Served, tmp_path: Path) -> None:
    parent = serve_two.proc.pid
    shared = shared_dir_of(min(workers_of(parent)))
    total = post_until_spread(serve_two.url, parent, shared, tmp_path / "scratch")
    per_process = accepted_per_process(shared, tmp_path / "scratch")
    assert sum(per_process.values()) == total
    # Whichever worker answers, it reports all of them.
    for _ in range(6):
        assert value(serve_two.scrape(), ACCEPTED) == total
    assert value(serve_two.scrape(), INGRESS) == 2

    # A killed worker: its counts stay in the sum, its live gauge leaves the view.
    killed = max(workers_of(parent))
    os.kill(killed, signal.SIGKILL)
    replacement: set[int] = set()

    def replaced() -> bool:
        replacement.update(workers_of(parent) - {killed} - set(per_process))
        return any((shared / f"gauge_livesum_{pid}.db").exists() for pid in replacement)

    wait_until(replaced, "uvicorn to start a replacement worker")
    wait_until(lambda: healthy(serve_two.url), "the ingress after the restart")
    # Broken variant: the plain collector still counts the killed worker as live.
    raw = collected(sorted(shared.glob("*.db")), tmp_path / "raw")
    assert value(raw, INGRESS) == 3
    text = serve_two.scrape()
    assert value(text, ACCEPTED) == total
    assert value(text, INGRESS) == 2
    assert not list(shared.glob(f"gauge_live*_{killed}.db"))

    serve_two.stop()
    assert not shared.exists(), "serve removes the metrics directory it made"


def per_process_app() -> FastAPI:
    """Broken variant: the ingress as it was, /metrics from the answering process only."""
    from webhooks.app import app_from_env

    app = app_from_env()
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/metrics"]

    @app.get("/metrics")
    async def own_metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry))

    return app


def test_without_the_collector_a_scrape_shows_one_worker(
    environment: dict[str, str], tmp_path: Path
) -> None:
    shared = tmp_path / "metrics"
    env = {**environment, **metrics.prepare_multiprocess(shared)}
    args = ["-m", "uvicorn", "--factory", f"{__name__}:per_process_app", "--workers", "2"]
    served = start(args, env, tmp_path)
    try:
        total = post_until_spread(served.url, served.proc.pid, shared, tmp_path / "scratch")
        for _ in range(4):
            scraped = value(served.scrape(), ACCEPTED)
            with pytest.raises(AssertionError):
                assert scraped == total
            assert 0 < scraped < total
    finally:
        served.stop()
    # A clean exit leaves the live gauges (each worker marks itself dead).
    assert not list(shared.glob("gauge_live*.db"))
    assert list(shared.glob("counter_*.db"))


def test_a_missing_metrics_directory_is_refused_by_name(
    environment: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    env = {**environment, metrics.MULTIPROC_ENV: str(missing)}
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "serve", "--workers", "2", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    # rich wraps long lines (inside the path too): compare without the white space.
    assert f"PROMETHEUS_MULTIPROC_DIR={missing}isnotadirectory" in "".join(result.stderr.split())
