"""One process that runs the others (``agentrt up``): starts them, restarts a crashed one,
stops them all.

Each child runs in a session of its own, so the terminal's Ctrl-C reaches the
supervisor alone and the children are stopped in order: SIGTERM (each drains:
workers finish their activations, uvicorn its requests), then SIGKILL for
one still there after ``stop_timeout``. On Linux a child also gets SIGTERM
when the supervisor dies without that chance (``PR_SET_PDEATHSIG``), so a
``kill -9`` of ``agentrt up`` leaves no process behind.

A child that exits while the supervisor is not stopping is restarted after a
backoff that doubles with each quick crash (up to ``max_backoff``) and
starts over once a child has stayed up for ``stable_after`` seconds. Its
output goes to a log file of its own; the last lines are shown on a crash.

Hand-written rather than supervisord/circus: those run as their own daemon
with their own config file; this is a hundred lines over asyncio's
subprocess support, and lives and dies with the command that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ChildSpec:
    """A child process: its name, full command line, environment and log file."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path


@dataclasses.dataclass(slots=True)
class ChildState:
    """What the supervisor knows of one child."""

    spec: ChildSpec
    pid: int | None = None
    #: The pid of its last process (kept after it exited).
    last_pid: int | None = None
    #: running, restarting (waiting out its backoff), stopped, or failed (gave up).
    status: str = "starting"
    restarts: int = 0
    started_at: float = 0.0
    last_exit: int | None = None


def _parent_death_signal() -> Callable[[], None] | None:
    """``preexec_fn`` giving the child SIGTERM when its parent dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: go now
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a child's log (what it said before it died)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Runs ``specs`` until ``stop`` is set; see the module's docstring."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        stop_timeout: float = 10.0,
        first_backoff: float = 0.5,
        max_backoff: float = 30.0,
        stable_after: float = 30.0,
        on_exit: Callable[[ChildState, str], None] | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
        self.children = {s.name: ChildState(s) for s in specs}
        self.stop_timeout = stop_timeout
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        #: Called with (child, tail of its log) when a child exits unasked.
        self.on_exit = on_exit
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping = False

    async def _start(self, state: ChildState) -> asyncio.subprocess.Process:
        spec = state.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as out:  # noqa: ASYNC230 - a local file, once per start
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}\n".encode())
            out.flush()
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=dict(spec.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        self._procs[spec.name] = proc
        state.pid = state.last_pid = proc.pid
        state.status = "running"
        state.started_at = time.monotonic()
        return proc

    async def _keep(self, state: ChildState, stop: asyncio.Event) -> None:
        backoff = self.first_backoff
        while not stop.is_set():
            proc = await self._start(state)
            code = await proc.wait()
            state.last_exit = code
            state.pid = None
            if stop.is_set() or self._stopping:
                state.status = "stopped"
                return
            up_for = time.monotonic() - state.started_at
            if up_for >= self.stable_after:
                backoff = self.first_backoff
            state.status = "restarting"
            if self.on_exit is not None:
                self.on_exit(state, log_tail(state.spec.log_path))
            log.warning("supervisor.child_exited", child=state.spec.name, code=code,
                        up_for=round(up_for, 1), restart_in=backoff)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, self.max_backoff)
            state.restarts += 1
        state.status = "stopped"

    async def run(self, stop: asyncio.Event) -> None:
        """Start every child, keep them running until ``stop``, then stop them all."""
        keepers = [asyncio.create_task(self._keep(s, stop), name=f"keep-{n}")
                   for n, s in self.children.items()]  # fmt: skip
        try:
            await stop.wait()
        finally:
            self._stopping = True
            await self.terminate()
            for k in keepers:
                k.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)

    async def terminate(self) -> None:
        """SIGTERM to every running child, SIGKILL to what is left after ``stop_timeout``."""
        running = [p for p in self._procs.values() if p.returncode is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if not running:
            return
        waits = [asyncio.create_task(p.wait()) for p in running]
        _, late = await asyncio.wait(waits, timeout=self.stop_timeout)
        for p in running:
            if p.returncode is None:
                log.warning("supervisor.child_killed", pid=p.pid, after=self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    # The whole session: a child's own children (uvicorn's workers) too.
                    os.killpg(p.pid, signal.SIGKILL)
        if late:
            await asyncio.wait(late, timeout=5)
        for state in self.children.values():
            state.pid = None
            state.status = "stopped"
