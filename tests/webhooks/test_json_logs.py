"""One view of logs: with AGENTRT_LOG_JSON every line ``agentrt serve`` writes is JSON,
uvicorn's and the stdlib's included."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import Servers
from tests.support.webhooks import redis_url_for_tests

# `agentrt serve` as users run it, plus one plain stdlib line written by "a library"
# once the process has configured its logging (uvicorn loads the app factory first).
# BROKEN=1: uvicorn keeps its own handlers and formatters (what serve did before).
SERVE = """
import logging, sys
import webhooks.app, webhooks.cli

made = webhooks.app.app_from_env

def app_from_env():
    app = made()
    logging.getLogger("some.library").warning("plain stdlib line from %s", "a library")
    return app

webhooks.app.app_from_env = app_from_env
if {broken}:
    webhooks.cli.uvicorn_logging = lambda level, access_log: {{
        "log_level": level, "access_log": access_log}}
from runtime.cli import main
sys.argv = ["agentrt", "serve", "--access-log", "--port", "{port}", "--config", "{config}"]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(servers: Servers, tmp_path: Path, *, broken: bool) -> list[str]:
    """Start serve with JSON logs at info, GET /healthz once, stop it; its stderr lines."""
    config = tmp_path / "webhooks.toml"
    config.write_text('[sources.open]\nformat = "generic"\nauth = "none"\n')
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AGENTRT_", "OTEL_"))},
        "REDIS_URL": redis_url_for_tests(servers.redis_url),
        "DATABASE_URL": servers.database_url,
        "AGENTRT_LOG_JSON": "1",
        "AGENTRT_LOG_LEVEL": "info",
    }
    code = textwrap.dedent(SERVE.format(broken=int(broken), port=port, config=config))
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=sink,
                                stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"agentrt serve did not start:\n{stderr.read_text()}")
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return [line for line in stderr.read_text().splitlines() if line.strip()]


def _parsed(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


def test_every_line_of_agentrt_serve_is_json(servers: Servers, tmp_path: Path) -> None:
    records = _parsed(_serve(servers, tmp_path, broken=False))
    by_logger: dict[str, list[str]] = {}
    for r in records:
        assert {"event", "level", "timestamp"} <= set(r), r
        by_logger.setdefault(r.get("logger", "(structlog)"), []).append(r["event"])
    assert any("Application startup complete" in e for e in by_logger["uvicorn.error"])
    assert any("GET /healthz" in e for e in by_logger["uvicorn.access"])
    assert by_logger["some.library"] == ["plain stdlib line from a library"]
    assert by_logger.get("(structlog)"), "agentrt's own structlog lines are there too"


def test_with_uvicorn_formatting_its_own_lines_the_check_fails(
    servers: Servers, tmp_path: Path
) -> None:
    """The check above can fail: uvicorn's own formatters write plain text."""
    lines = _serve(servers, tmp_path, broken=True)
    with pytest.raises(AssertionError, match="not a JSON line"):
        _parsed(lines)
