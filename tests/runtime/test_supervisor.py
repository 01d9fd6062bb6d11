"""The supervisor of ``agentrt up``: restarts, orderly stops, no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.ops.supervisor import ChildSpec, Supervisor
from tests.support.procs import alive


def _child(tmp: Path, name: str, code: str) -> ChildSpec:
    script = tmp / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    return ChildSpec(name, [sys.executable, str(script)], dict(os.environ), tmp / f"{name}.log")


async def _until(check: object, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_a_crashed_child_is_restarted_and_told(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    crash = _child(
        tmp_path,
        "crash",
        f"""
        import pathlib, sys, time
        p = pathlib.Path({str(counter)!r})
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        print("start", n, flush=True)
        if n < 3:
            sys.exit(7)
        time.sleep(60)
    """,
    )
    exits: list[tuple[str, int | None, str]] = []
    sup = Supervisor([crash], first_backoff=0.05, on_exit=lambda c, tail: exits.append(
        (c.spec.name, c.last_exit, tail)))  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    state = sup.children["crash"]
    await _until(lambda: counter.exists() and counter.read_text() == "3" and state.pid)
    assert state.restarts == 2 and state.status == "running"
    assert [(n, c) for n, c, _ in exits] == [("crash", 7), ("crash", 7)]
    assert "start 2" in exits[1][2]  # the tail of its log comes with the report
    pid = state.pid
    stop.set()
    await asyncio.wait_for(task, 15)
    assert pid is not None and not alive(pid)
    assert state.status == "stopped"


async def test_stop_sends_sigterm_then_sigkill_to_a_child_that_ignores_it(tmp_path: Path) -> None:
    polite = _child(
        tmp_path,
        "polite",
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        print("ready", flush=True)
        time.sleep(60)
    """,
    )
    stubborn = _child(
        tmp_path,
        "stubborn",
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """,
    )
    sup = Supervisor([polite, stubborn], stop_timeout=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    await _until(lambda: all("ready" in (tmp_path / f"{n}.log").read_text(errors="replace")
                             for n in ("polite", "stubborn")
                             if (tmp_path / f"{n}.log").exists())
                 and all(c.pid for c in sup.children.values()))  # fmt: skip
    pids = {n: c.pid for n, c in sup.children.items()}
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 15)
    took = time.monotonic() - started
    assert not any(alive(p) for p in pids.values() if p)
    assert 0.9 <= took < 10  # the stubborn one waited out stop_timeout, then SIGKILL
    assert sup.children["polite"].last_exit == 0
    assert sup.children["stubborn"].last_exit == -signal.SIGKILL


def _orphans_after_kill(tmp_path: Path, *, broken: bool) -> list[int]:
    """Start a supervisor of two children in a process, kill -9 it; the children left."""
    pids = tmp_path / "pids"
    script = tmp_path / "sup.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio, os, sys
        from pathlib import Path
        import runtime.ops.supervisor as s
        from runtime.ops.supervisor import ChildSpec, Supervisor
        if {broken!r}:
            s._parent_death_signal = lambda: None
        code = "import time, os; print(os.getpid(), flush=True); time.sleep(120)"
        specs = [ChildSpec(f"c{{i}}", [sys.executable, "-c", code], dict(os.environ),
                           Path({str(tmp_path)!r}) / f"c{{i}}.log") for i in range(2)]
        async def main():
            sup = Supervisor(specs)
            stop = asyncio.Event()
            task = asyncio.create_task(sup.run(stop))
            while not all(c.pid for c in sup.children.values()):
                await asyncio.sleep(0.05)
            Path({str(pids)!r}).write_text(" ".join(str(c.pid) for c in sup.children.values()))
            await task
        asyncio.run(main())
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = [int(p) for p in pids.read_text().split()]
        assert all(alive(p) for p in children)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + (10 if not broken else 1)
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in children if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of ``agentrt up`` leaves no process behind."""
    assert _orphans_after_kill(tmp_path, broken=False) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_broken_variant_without_the_parent_death_signal_leaves_orphans(tmp_path: Path) -> None:
    """The test above catches a supervisor that does not arrange for its children's end."""
    assert len(_orphans_after_kill(tmp_path, broken=True)) == 2


def test_child_names_must_be_unique(tmp_path: Path) -> None:
    a = ChildSpec("a", ["true"], {}, tmp_path / "a.log")
    with pytest.raises(ValueError, match="unique"):
        Supervisor([a, a])


async def test_ctrl_c_while_a_service_starts_is_not_kept_waiting() -> None:
    """`agentrt up` waits up to 60 s for each service's health URL; a stop (Ctrl-C) ends
    the wait at once (it used to sit out the 60 s: longer than a test's patience)."""
    from runtime.cli.up import Service, _wait_ready, free_base_port

    never = Service("api", ["api"], health=f"http://127.0.0.1:{free_base_port('127.0.0.1')}/")
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    started = time.monotonic()
    late = await _wait_ready([never], within=60, stop=stop)
    assert late == ["api"]
    assert time.monotonic() - started < 5
