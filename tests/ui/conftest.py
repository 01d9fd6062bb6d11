"""The run explorer's browser tests: headless Chromium from the distribution's packages,
driven by Playwright through its executable path, against `agentrt up` with the sample
application (its own embedded servers, the offline model).

Without a Chromium (or without Playwright) every browser test is skipped, and the end of
the test run says so in a banner, with the reason and the fix: `.ci/run` installs
Chromium when it is missing, so CI always runs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Where the browser tests' screenshots go (kept after the run; not in git).
ARTIFACTS = Path(os.environ.get("AGENTRT_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
#: Flags for a headless Chromium on a machine with a closed network, as root.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--mute-audio",
]  # fmt: skip


def chromium() -> tuple[str | None, str]:
    """The browser's path, or None and why not."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "Playwright is not installed (it comes with the `test` extra)"
    explicit = os.environ.get("AGENTRT_CHROMIUM")
    if explicit:
        return (explicit, "") if os.access(explicit, os.X_OK) else (
            None, f"AGENTRT_CHROMIUM={explicit} is not an executable")  # fmt: skip
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found, ""
    return None, "no Chromium on this machine: `apt-get install chromium` (.ci/run does that)"


BROWSER, WHY_NOT = chromium()
_skipped: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BROWSER is not None:
        return
    mark = pytest.mark.skip(reason=f"browser tests skipped: {WHY_NOT}")
    for item in items:
        if "tests/ui/" in item.nodeid and "browser" in item.keywords:
            item.add_marker(mark)
            _skipped.append(item.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _skipped:
        terminalreporter.write_sep("!", "BROWSER TESTS SKIPPED", yellow=True, bold=True)
        terminalreporter.write_line(
            f"{len(_skipped)} browser tests of the run explorer did not run: {WHY_NOT}."
        )
        terminalreporter.write_line(
            "Install Chromium (Debian/Ubuntu: `apt-get install chromium`) or set "
            "AGENTRT_CHROMIUM to a Chromium binary, then run the tests again."
        )


@dataclass
class Stack:
    """`agentrt up` with the sample application, running for the session."""

    proc: subprocess.Popen[bytes]
    state: Path
    port: int
    token: str

    @property
    def ingress(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port + 1}"

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def runs(self, **params: Any) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.api}/runs", params={"limit": 1000, **params},
                      headers=self.auth, timeout=10)  # fmt: skip
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    def wait_runs(self, done: Any, timeout: float = 90) -> list[dict[str, Any]]:
        """The runs once ``done(runs)`` holds."""
        deadline = time.monotonic() + timeout
        runs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            runs = self.runs()
            if done(runs):
                return runs
            time.sleep(0.3)
        raise AssertionError(f"runs did not settle: {runs}")

    def post_samples(self, indexes: list[int] | None = None) -> int:
        """Post the sample stream (or the posts at ``indexes``); how many were posted."""
        from webhooks.config import load
        from webhooks.demo.traffic import sample_posts

        _, sources = load(self.state / "webhooks.toml")
        posts = sample_posts(sources)
        chosen = posts if indexes is None else [posts[i] for i in indexes]
        for post in chosen:
            r = httpx.post(f"{self.ingress}/webhooks/{post.source}", content=post.body,
                           headers=post.headers, timeout=10)  # fmt: skip
            assert r.status_code == 202, r.text
        return len(chosen)

    def log(self) -> str:
        return (self.state.parent / "up.log").read_text(errors="replace")[-6000:]


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(AGENTRT_STATE_DIR=str(state), AGENTRT_POLL_INTERVAL="0.05",
               ANTHROPIC_API_KEY="")  # fmt: skip
    return env


def _wait(proc: subprocess.Popen[bytes], url: str, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"agentrt up exited while waiting for {what}"
        try:
            if httpx.get(url, timeout=2).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come up within {timeout} s")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`agentrt up` (embedded servers of its own) with the sample stream posted and settled."""
    from runtime.cli.up import free_base_port

    state = tmp_path_factory.mktemp("ui-up") / "state"
    state.mkdir()
    port = free_base_port("127.0.0.1")
    with open(state.parent / "up.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "up", "--port", str(port)],
            env=_env(state), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        _wait(proc, f"http://127.0.0.1:{port}/readyz", "the ingress")
        _wait(proc, f"http://127.0.0.1:{port + 1}/healthz", "the query API")
        stack = Stack(proc, state, port, (state / "api-token").read_text().strip())
        expected = stack.post_samples()
        stack.wait_runs(lambda rs: len(rs) >= expected
                        and not any(r["status"] == "running" for r in rs))  # fmt: skip
        yield stack
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run([sys.executable, "-m", "runtime", "services", "down"],
                       env=_env(state), capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Per module, not per session: Playwright's sync API keeps an event loop running in
    # this thread while it is open, and pytest-asyncio cannot run the async tests of the
    # modules after it (RuntimeError: "cannot be called from a running event loop").
    from playwright.sync_api import sync_playwright

    assert BROWSER is not None
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def sign_in(page: Any, stack: Stack, token: str | None = None) -> None:
    """Sign in through the form, as a person does."""
    page.goto(f"{stack.api}/ui/login")
    page.get_by_label("API token").fill(stack.token if token is None else token)
    page.get_by_role("button", name="Sign in").click()


@pytest.fixture
def page(browser: Any, stack: Stack, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context, signed in; a screenshot of where the test ended is kept
    under test-artifacts/ui/ (and the browser's console errors fail the test)."""
    context = browser.new_context(base_url=stack.api, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(15_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(pg, stack)
    pg.wait_for_url("**/ui/")
    try:
        yield pg
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = request.node.name.replace("/", "_")[:120]
        try:
            pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        finally:
            context.close()
    assert not errors, f"the browser reported errors: {errors}"
