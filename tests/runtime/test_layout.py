"""The layout's promises that a lint cannot see: what importing a light module loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("anthropic", "asyncpg", "redis", "fastapi", "uvicorn", "prometheus_client")


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return list(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import runtime.events",
        "import runtime.events.builtin, runtime.events.values, runtime.events.ids",
        "import runtime.errors, runtime.settings",
        "import webhooks.formats, webhooks.formats.email, webhooks.formats.changes",
        "import webhooks.formats.generic, webhooks.events, webhooks.errors",
        "from runtime import Event, registry, new_event_id",
    ],
)
def test_pure_modules_load_no_driver_server_or_sdk(code: str) -> None:
    assert _loaded_after(code) == []


def test_the_probe_sees_a_heavy_import() -> None:
    """The check above can fail: the public API's Worker does load the drivers, its LLM the
    model SDK (a worker's agents and tools alone do not: `agentrt` starts without it)."""
    assert set(_loaded_after("from runtime import Worker")) >= {"asyncpg", "redis"}
    assert "anthropic" in _loaded_after("from runtime import LLM")
