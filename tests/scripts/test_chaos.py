"""``scripts/chaos.py`` end to end on a tiny scenario: its own embedded servers, the
ingress and two workers as processes, one worker SIGKILL, Redis SIGKILLed and
PostgreSQL stopped once, duplicates injected; then the log counted.

The correct runtime must come out with every zero-target figure at zero; the
same scenario with a deliberately broken app (``chaos_broken_app``: a side
effect outside a step, a handler that fails) must be reported as failing, with
the figures that say why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.support import REPO

TINY = ["--duration", "6", "--rate", "8", "--kills", "1", "--redis-down", "1",
        "--postgres-down", "1", "--inject", "4", "--settle", "120", "--seed", "3",
        "--json"]  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def chaos(*extra: str) -> tuple[int, dict[str, Any], str]:
    """Run the script; its exit code, its figures by name and its stderr."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chaos.py"), *TINY, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output (exit {result.returncode}):\n{result.stderr[-4000:]}"
    figures = {f["name"]: f for f in json.loads(lines[-1])["figures"]}
    return result.returncode, figures, result.stderr


def test_chaos_loses_nothing_and_duplicates_nothing() -> None:
    code, figures, err = chaos()
    values = {name: f["value"] for name, f in figures.items()}
    assert values["webhooks_accepted"] == 48, err[-4000:]
    for name in ("lost", "duplicated", "steps_recalled", "extra_tool_calls",
                 "pending_at_end", "dead_lettered", "audit_problems"):  # fmt: skip
        assert figures[name]["target"] == 0
        assert values[name] == 0, f"{name} = {values[name]}:\n{err[-4000:]}"
    assert values["activations_completed"] == 3 * 48
    assert code == 0, err[-4000:]


def test_chaos_catches_a_broken_app() -> None:
    code, figures, err = chaos("--app", "tests.scripts.chaos_broken_app", "--max-deliveries", "2")
    values = {name: f["value"] for name, f in figures.items()}
    assert code == 1, err[-4000:]
    assert values["extra_tool_calls"] > 0, values
    assert values["lost"] > 0, values
    assert values["dead_lettered"] > 0, values
    assert "target missed" in err
