"""Prometheus metrics of workers, the relay and the LLM layer, and one view of several processes.

One process exports its own registry. Several processes (``agentrt serve --workers N``,
the children of a supervisor) export ONE aggregated view with prometheus-client's
multiprocess mode: each process writes its values to files in a shared directory
(``PROMETHEUS_MULTIPROC_DIR``, which must be set before ``prometheus_client`` is
imported, so it is set in the environment a child starts with) and the endpoint sums
them. Counters and histograms of a process that exited stay in the sum; the gauges are
``live*`` (or read from Redis, where every process sees the same value), so a dead
process's gauges leave the view: whoever reaps a child calls :func:`mark_dead`, and the
endpoint drops the files of processes that are gone (a SIGKILLed uvicorn worker has
nobody to call it).

The supervisor's side::

    env = prepare_multiprocess(state_dir / "metrics")   # empty dir; env for the children
    server = serve_metrics(9100, env[MULTIPROC_ENV])     # /metrics, /healthz
    ...  # start children with {**os.environ, **env}; on a child's exit: mark_dead(pid, dir)
    server.close()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

#: The variable prometheus-client reads, once, when it is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The routes :func:`serve_metrics` answers (compose health checks name them).
METRICS_ROUTES = frozenset({"/metrics", "/healthz"})

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

ACTIVATIONS = Counter(
    "agentrt_activations_total",
    "Activations by agent and outcome "
    "(completed, budget_exceeded, duplicate, skipped, failed, dead_lettered).",
    ["agent", "outcome"],
)
ACTIVATION_SECONDS = Histogram(
    "agentrt_activation_seconds",
    "From an entry's arrival at the worker to its XACK, for committed activations.",
    ["agent"],
    buckets=_LATENCY,
)
LLM_SECONDS = Histogram(
    "agentrt_llm_seconds",
    "Model call latency, retries included.",
    ["model"],
    buckets=_LATENCY,
)
LLM_TOKENS = Counter(
    "agentrt_llm_tokens_total", "Tokens used, by model and kind (input, output).", ["model", "kind"]
)
LLM_COST = Counter("agentrt_llm_cost_usd_total", "Cost in USD by model.", ["model"])
LLM_CACHE_HITS = Counter("agentrt_llm_cache_hits_total",
                         "Model steps answered by an agent's response cache, by model and kind.",
                         ["model", "kind"])  # fmt: skip
RETRIES = Counter("agentrt_retries_total", "Retried attempts by step kind and reason.",
                  ["kind", "reason"])  # fmt: skip
DEAD_LETTERS = Counter("agentrt_dead_letters_total", "Entries sent to the dead-letter stream.",
                       ["agent"])  # fmt: skip
# Gauges across processes: the breaker state is shared by all workers (Redis) and the lag
# is read from Redis, so every process reports the same quantity: the latest report of a
# live process is the value (a sum would count it once per process).
CIRCUIT_STATE = Gauge(
    "agentrt_circuit_state",
    "Circuit breaker state (0 closed, 1 half-open, 2 open).",
    ["name"],
    multiprocess_mode="livemostrecent",
)
CONSUMER_LAG = Gauge(
    "agentrt_consumer_lag",
    "Entries of a stream not yet acknowledged by an agent's group (pending + never delivered).",
    ["agent", "stream"],
    multiprocess_mode="livemostrecent",
)
# Each process counts itself once: the sum over live processes is how many run.
PROCESSES = Gauge(
    "agentrt_processes",
    "Live agentrt processes by component (ingress, worker, relay, projector, ...).",
    ["component"],
    multiprocess_mode="livesum",
)
GROUP_FLUSH_SIZE = Histogram(
    "agentrt_group_flush_size",
    "Items per shared statement of a worker's group writers (step records, first-step "
    "reads, activation commits).",
    ["writer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
RELAYED = Counter("agentrt_relayed_total", "Log events the relay published, by type.", ["type"])

STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def multiprocess_dir() -> str | None:
    """The shared directory when this process records in multiprocess mode, else None.

    Decided when ``prometheus_client`` was imported: setting the variable later does
    not switch an already-imported client over.
    """
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get(MULTIPROC_ENV)


def prepare_multiprocess(path: str | os.PathLike[str]) -> dict[str, str]:
    """Empty (or create) ``path`` for a new set of processes; the environment their
    children need. Files of a previous run would add their counts to this one's."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory (the metrics files go there)")
    directory.mkdir(parents=True, exist_ok=True)
    for f in directory.glob("*.db"):
        f.unlink()
    return {MULTIPROC_ENV: str(directory)}


def mark_dead(pid: int, path: str | os.PathLike[str]) -> None:
    """A child exited: drop its live gauges (its counters and histograms stay summed)."""
    # Idempotent: two processes answering scrapes at once may both prune one pid.
    with contextlib.suppress(FileNotFoundError):
        mark_process_dead(pid, os.fspath(path))  # type: ignore[no-untyped-call]


def prune_dead(path: str | os.PathLike[str]) -> list[int]:
    """:func:`mark_dead` every process whose live gauges are in ``path`` but that is gone."""
    dead = []
    for f in Path(path).glob("gauge_live*_*.db"):
        pid = f.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            mark_dead(int(pid), path)
            dead.append(int(pid))
    return dead


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the pid: ours is gone
        return False
    try:  # a zombie (exited, not yet reaped) is dead for our purpose
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class _Aggregated(Collector):
    """The multiprocess collector, dropping the live gauges of dead processes first."""

    def __init__(self, path: str) -> None:
        self._collector = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
        self._path = path

    def collect(self) -> Iterable[Metric]:
        prune_dead(self._path)
        metrics: Iterable[Metric] = self._collector.collect()  # type: ignore[no-untyped-call]
        return metrics


def scrape_registry(multiprocess: str | os.PathLike[str] | None = None) -> CollectorRegistry:
    """What an endpoint exports: every process's metrics summed when ``multiprocess`` names
    the shared directory, else this process's default registry."""
    if multiprocess is None:
        return REGISTRY
    path = os.fspath(multiprocess)
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{MULTIPROC_ENV}={path} is not a directory")
    registry = CollectorRegistry()
    registry.register(_Aggregated(path))
    return registry


def process_started(component: str) -> None:
    """Count this process in ``agentrt_processes`` (with livesum: until it is marked dead)."""
    PROCESSES.labels(component).set(1)


def process_stopping() -> None:
    """A clean exit: leave the live gauges now instead of waiting for a reaper."""
    path = multiprocess_dir()
    if path is not None and os.path.isdir(path):
        mark_dead(os.getpid(), path)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log."""


class MetricsServer:
    """The HTTP endpoint of :func:`serve_metrics`, in a daemon thread."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True,
                                        name="agentrt-metrics")  # fmt: skip
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


def serve_metrics(
    port: int, multiprocess: str | os.PathLike[str] | None = None, *, host: str = "0.0.0.0"
) -> MetricsServer:
    """Serve ``/metrics`` (and ``/healthz``) on ``host:port`` from a thread.

    ``multiprocess``: the shared directory of a set of processes (a supervisor passes the
    one it prepared); by default this process's own directory when it records in
    multiprocess mode, else its own registry. ``port`` 0 picks a free port.
    """
    # prometheus-client's start_http_server answers every path with the metrics; a
    # health check should name a route that exists, so route the two paths here.
    path = os.fspath(multiprocess) if multiprocess is not None else multiprocess_dir()
    metrics_app = make_wsgi_app(scrape_registry(path))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        route = environ.get("PATH_INFO", "")
        if route == "/metrics":
            return iter(metrics_app(environ, start_response))
        if route == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return iter([b"ok\n"])
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return iter([b"not found: the routes are /metrics and /healthz\n"])

    return MetricsServer(make_server(host, port, app, _Server, handler_class=_Quiet))


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Remove a directory :func:`prepare_multiprocess` made (at the supervisor's exit)."""
    shutil.rmtree(path, ignore_errors=True)
