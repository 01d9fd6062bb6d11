"""``scripts/bench_peers.py``: its options, and its agentrt part on a tiny run.

The peers are an optional extra, so the run measures agentrt alone: the
workflows/s figure is there, and the ratio to the best peer is null with the
reason, not a number made up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.support.servers import Servers

SCRIPT = str(REPO / "scripts" / "bench_peers.py")


def test_help() -> None:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--json", "--repeat", "--write-readme", "--systems"):
        assert option in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_agentrt_alone_gives_its_figure_and_no_ratio(servers: Servers) -> None:
    env = dict(os.environ, REDIS_URL=servers.redis_url, DATABASE_URL=servers.database_url)
    done = subprocess.run(
        [sys.executable, SCRIPT, "--systems", "agentrt", "--warmup", "0.5", "--duration", "1.5",
         "--repeat", "1", "--redis-db", "15", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    figures = {f["name"]: f for f in json.loads(done.stdout.strip().splitlines()[-1])["figures"]}
    assert figures["agentrt workflows/s"]["value"] > 0, done.stderr[-4000:]
    ratio = figures["agentrt / best peer"]
    assert ratio["value"] is None
    assert ratio["target"] == 10
    assert "no peer measured" in ratio["note"]
    # The sanity check found 3 step records and 1 result for every completed workflow.
    assert "errors flagged" not in done.stderr, done.stderr[-4000:]
