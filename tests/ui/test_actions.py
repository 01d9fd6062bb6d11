"""Replay, fork and diff from the run explorer: in a browser against `agentrt up`, over HTTP
for what a browser does not send (no CSRF token, bad steps, unknown runs), and in process
for an API without agents and for a replay past its time limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from projections.api import create_api
from projections.replay import ActivationReplay, Divergence, RunReplay, _diff
from projections.ui.pages import actions
from projections.ui.pages.actions_diff import side_by_side
from runtime.settings import Settings
from tests.ui.conftest import Stack

browser = pytest.mark.browser


# -- helpers ---------------------------------------------------------------------------


def _pipeline_run(stack: Stack) -> dict[str, Any]:
    """A completed run of the whole sample pipeline (triage, desk, writer, ...), not a fork."""
    runs = [r for r in stack.runs() if r["status"] == "completed" and "desk" in r["agents"]
            and r["parent_run_id"] is None]  # fmt: skip
    assert runs, stack.runs()
    return runs[0]


def _small_run(stack: Stack) -> dict[str, Any]:
    """A completed run of one agent with a step or two (an `anomalies` run)."""
    runs = [r for r in stack.runs() if r["status"] == "completed" and r["agents"] == ["anomalies"]
            and r["llm_calls"] + r["tool_calls"] > 0 and r["parent_run_id"] is None]  # fmt: skip
    assert runs, stack.runs()
    return runs[0]


def signed_in(stack: Stack) -> tuple[httpx.Client, str]:
    """An HTTP client with a session (signed in through the form) and its CSRF token."""
    c = httpx.Client(base_url=stack.api, timeout=120)
    c.get("/ui/login")
    nonce = c.cookies.get("agentrt_login")
    r = c.post("/ui/login", data={"token": stack.token, "csrf": nonce, "next": "/ui/"})
    assert r.status_code == 303, r.text
    found = re.search(r'"X-CSRF-Token": "([^"]+)"', c.get("/ui/").text)
    assert found is not None
    return c, found.group(1)


@pytest.fixture
def http(stack: Stack) -> Iterator[tuple[httpx.Client, str]]:
    c, csrf = signed_in(stack)
    try:
        yield c, csrf
    finally:
        c.close()


def log_counts(stack: Stack) -> tuple[int, int]:
    """(runs in the log, ``run.forked`` events): read from the stack's PostgreSQL itself,
    not from a read model that may lag."""
    url = json.loads((stack.state / "services.json").read_text())["DATABASE_URL"]

    async def read() -> tuple[int, int]:
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow(
                "SELECT count(DISTINCT run_id), count(*) FILTER (WHERE event_type = 'run.forked') "
                f'FROM "{Settings().db_schema}".events'
            )
            assert row is not None
            return int(row[0]), int(row[1])
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # see in_process()
        return pool.submit(asyncio.run, read()).result()


def alert(html: str) -> str:
    found = re.search(r'role="alert"[^>]*>(.*?)</p>', html, re.S)
    assert found is not None, html[:2000]
    return found.group(1)


# -- in the browser --------------------------------------------------------------------


@browser
def test_replay_from_the_fork_page_says_identical(page: Any, stack: Stack) -> None:
    from playwright.sync_api import expect

    run = _pipeline_run(stack)
    page.goto(f"/ui/runs/{run['run_id']}/fork")
    page.get_by_role("button", name="Replay this run").click()
    result = page.locator("#replay-result")
    expect(result.locator(".replay-verdict")).to_contain_text("identical", timeout=60_000)
    expect(result.locator(".replay-verdict")).to_contain_text("Nothing was called")
    expect(result.locator("table.replay tbody tr")).to_have_count(run["activations"])
    expect(result.get_by_text("diverged")).to_have_count(0)


@browser
def test_replay_from_the_run_page(page: Any, stack: Stack) -> None:
    """The run page includes run_actions.html (once the run page is on the branch)."""
    from playwright.sync_api import expect

    run = _pipeline_run(stack)
    url = f"/ui/runs/{run['run_id']}"
    if httpx.get(stack.api + url).status_code == 404:
        pytest.skip("no run page on this branch yet (projections/ui/pages/run.py is a stub)")
    page.goto(url)
    page.get_by_role("button", name="Replay this run").click()
    expect(page.locator("#replay-result .replay-verdict")).to_contain_text(
        "identical", timeout=60_000
    )
    page.get_by_role("link", name="Fork this run…").click()
    expect(page).to_have_url(re.compile(f"/ui/runs/{run['run_id']}/fork"))


@browser
def test_fork_with_the_smart_tier_lands_on_the_diff_and_in_the_runs_table(
    page: Any, stack: Stack
) -> None:
    from playwright.sync_api import expect

    run = _pipeline_run(stack)
    parent = run["run_id"]
    page.goto(f"/ui/runs/{parent}/fork")
    step = page.get_by_label("Fork at step")
    # The run's steps are listed; choose its first model step after the first one.
    options = step.locator("option")
    expect(options.filter(has_text=re.compile(r"^Step \d+: \w+, model "))).to_have_count(
        run["llm_calls"]
    )
    labels = options.all_inner_texts()
    assert len(labels) >= run["llm_calls"] + run["tool_calls"]
    at = next(i + 1 for i, text in enumerate(labels) if " model " in text and i > 0)
    step.select_option(str(at))
    page.get_by_label("Model tier").select_option("smart")
    page.get_by_role("button", name="Fork and compare").click()
    expect(page).to_have_url(re.compile(rf"/ui/diff\?a={parent}&b=[0-9a-f-]{{36}}$"),
                             timeout=120_000)  # fmt: skip
    child = re.search(r"b=([0-9a-f-]{36})", page.url)
    assert child is not None
    fork_id = child.group(1)
    totals = page.locator("table.totals")
    expect(totals.get_by_role("link", name=f"Run A {parent}")).to_be_visible()
    expect(totals.get_by_role("link", name=f"Run B {fork_id}")).to_be_visible()
    expect(totals).to_contain_text(f"at step {at}, tier smart, model claude-sonnet-5-5")
    for label in ("Cost", "Model calls", "Tool calls", "Tokens in", "Duration"):
        expect(totals.get_by_role("rowheader", name=label)).to_be_visible()
    expect(totals).to_contain_text("the offline model")
    # The first difference is at the fork step (its request names another model).
    expect(page.locator(".first-note")).to_contain_text(f"step {at} ")
    first = page.locator("#first-difference")
    expect(first).to_have_count(1)
    expect(page.locator(".step-diff.first table.sbs ins").first).to_contain_text("claude-sonnet")
    page.get_by_role("navigation", name="Sections").get_by_role("link", name="Runs").click()
    link = page.get_by_role("link", name=f"Run {fork_id}")
    expect(link).to_be_visible(timeout=60_000)  # once the projector has folded it: live
    expect(page.locator("tr", has=link).locator(".badge", has_text="fork")).to_be_visible()
    # A forked run's actions link back to the diff with its parent.
    page.goto(f"/ui/runs/{fork_id}/fork")
    page.get_by_role("link", name=re.compile(r"Compare with the run it was forked from")).click()
    expect(page).to_have_url(re.compile(rf"/ui/diff\?a={parent}&b={fork_id}$"))


# -- over HTTP -------------------------------------------------------------------------


def test_posts_without_the_csrf_token_are_refused_and_write_nothing(
    stack: Stack, http: tuple[httpx.Client, str]
) -> None:
    c, csrf = http
    run = _small_run(stack)["run_id"]
    before = log_counts(stack)
    form = {"at": "1", "tier": "smart"}
    for headers, data in [
        ({}, form),  # no token at all
        ({"x-csrf-token": "forged"}, form),  # another token in the header
        ({}, {**form, "csrf": "forged"}),  # ... or in the form
        ({"hx-request": "true"}, form),  # htmx without its header
    ]:
        r = c.post(f"/ui/runs/{run}/fork", data=data, headers=headers)
        assert r.status_code == 403, r.text
        assert "CSRF" in r.text
        r = c.post(f"/ui/runs/{run}/replay", headers=headers)
        assert r.status_code == 403, r.text
    assert log_counts(stack) == before
    # The same form with the token forks: one new run, so the count above could see one.
    r = c.post(f"/ui/runs/{run}/fork", data={**form, "csrf": csrf})
    assert r.status_code == 303, r.text
    runs, forks = log_counts(stack)
    assert (runs, forks) == (before[0] + 1, before[1] + 1)


def test_bad_fork_input_gets_a_message_on_the_form(
    stack: Stack, http: tuple[httpx.Client, str]
) -> None:
    c, csrf = http
    small = _small_run(stack)
    run, total = small["run_id"], small["llm_calls"] + small["tool_calls"]
    before = log_counts(stack)
    cases = [
        ({"at": "99"}, f"has steps 1..{total}; step 99 is outside them"),
        ({"at": "0"}, "step 0 is outside them"),
        ({"at": "two"}, "The step must be a whole number"),
        ({"at": ""}, "Choose a step"),
        ({"at": "1", "tier": "smart", "model": "claude-x"}, "not both"),
        ({"at": "1", "tier": "huge"}, "no model tier"),
        ({"at": "1", "model": "two words"}, "one word without spaces"),
        ({"at": "1", "change_prompt": "1", "prompt": "  \n"}, "The system prompt is empty"),
        ({"at": "1", "prompt": "edited", "prompt_was": "original"}, "did not tick"),
    ]
    for data, message in cases:
        for headers in ({}, {"hx-request": "true"}):
            r = c.post(f"/ui/runs/{run}/fork", data={**data, "csrf": csrf}, headers=headers)
            assert r.status_code == 422, (data, r.text)
            assert message in alert(r.text), (data, alert(r.text))
            # htmx swaps the form alone; a plain POST gets the page back, the input kept.
            assert ('id="fork-form"' in r.text) and (("<h1>" in r.text) != bool(headers))
    # A step of another (longer) run is no step of this one: the URL's run alone is read.
    r = c.get(f"/ui/runs/{run}/fork", params={"at": total + 1})
    assert r.status_code == 422
    assert f"step {total + 1} is outside them" in alert(r.text)
    select = re.search(r'<select id="fork-at".*?</select>', r.text, re.S)
    assert select is not None
    listed = re.findall(r'<option value="(\d+)"', select.group(0))
    assert listed == [str(n) for n in range(1, total + 2)]  # its steps, and the one asked for
    assert log_counts(stack) == before


def test_unknown_runs_and_bad_ids_get_error_pages(
    stack: Stack, http: tuple[httpx.Client, str]
) -> None:
    c, csrf = http
    known = _small_run(stack)["run_id"]
    unknown = str(uuid.uuid4())
    for url in (f"/ui/diff?a={known}&b={unknown}", f"/ui/diff?a={unknown}&b={known}",
                f"/ui/runs/{unknown}/fork"):  # fmt: skip
        r = c.get(url)
        assert r.status_code == 404, (url, r.text)
        assert r.headers["content-type"].startswith("text/html")
        assert f"no run {unknown}" in r.text
        assert known not in r.text.split("<main", 1)[1]  # nothing of the other run is shown
    r = c.post(f"/ui/runs/{unknown}/replay", headers={"x-csrf-token": csrf})
    assert r.status_code == 404 and f"no run {unknown}" in r.text
    r = c.post(f"/ui/runs/{unknown}/fork", data={"at": "1", "csrf": csrf})
    assert r.status_code == 404 and f"no run {unknown}" in r.text
    for url in ("/ui/diff?a=nope&b=" + known, "/ui/diff?a=" + known, "/ui/runs/nope/fork"):
        r = c.get(url)
        assert r.status_code == 422, (url, r.text)
        assert "Invalid request" in r.text
    # The diff shows exactly the two runs it names.
    other = _pipeline_run(stack)["run_id"]
    r = c.get("/ui/diff", params={"a": known, "b": other})
    assert r.status_code == 200
    shown = set(re.findall(r'href="/ui/runs/([0-9a-f-]{36})"', r.text))
    assert shown == {known, other}


# -- in process: an API without agents or Redis, a replay past its time limit -----------
# (Over the stack's log, in a thread with a loop of its own: Playwright's sync API keeps an
# event loop running in the main thread once a browser test has run.)

TOKEN = "ui-actions-token"


def in_process(
    stack: Stack,
    check: Callable[[httpx.AsyncClient, str], Awaitable[None]],
    *,
    agents: bool,
    redis: bool = False,
) -> None:
    """``check(client, csrf)`` against an API of this process over the stack's log, with
    the sample app's agents (or none) and the stack's Redis (or none), signed in."""
    from runtime.cli import load_agents

    urls = json.loads((stack.state / "services.json").read_text())
    settings = Settings.from_env({}).with_urls(
        redis_url=urls["REDIS_URL"] if redis else None, database_url=urls["DATABASE_URL"]
    )
    app = create_api(dataclasses.replace(settings, api_token=TOKEN),
                     agents=load_agents("webhooks.demo.agents") if agents else ())  # fmt: skip

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://api", timeout=60
        ) as c:  # fmt: skip
            await c.get("/ui/login")
            nonce = c.cookies.get("agentrt_login")
            r = await c.post("/ui/login", data={"token": TOKEN, "csrf": nonce})
            assert r.status_code == 303
            found = re.search(r'"X-CSRF-Token": "([^"]+)"', (await c.get("/ui/")).text)
            assert found is not None
            await check(c, found.group(1))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def test_without_agents_replay_and_fork_say_they_need_the_app(stack: Stack) -> None:
    run = _small_run(stack)["run_id"]
    before = log_counts(stack)

    async def check(c: httpx.AsyncClient, csrf: str) -> None:
        r = await c.post(f"/ui/runs/{run}/replay",
                         headers={"x-csrf-token": csrf, "hx-request": "true"})  # fmt: skip
        assert r.status_code == 409
        assert "agentrt api --app MODULE" in alert(r.text)
        r = await c.get(f"/ui/runs/{run}/fork")
        assert "agentrt api --app MODULE" in alert(r.text)
        r = await c.post(f"/ui/runs/{run}/fork", data={"at": "1", "csrf": csrf})
        assert r.status_code == 409
        assert "agentrt api --app MODULE" in alert(r.text)

    in_process(stack, check, agents=False)
    assert log_counts(stack) == before


def test_without_redis_a_fork_says_so_and_writes_nothing(stack: Stack) -> None:
    run = _small_run(stack)["run_id"]
    before = log_counts(stack)

    async def check(c: httpx.AsyncClient, csrf: str) -> None:
        r = await c.get(f"/ui/runs/{run}/fork")
        assert "no Redis (REDIS_URL is not set)" in alert(r.text)
        r = await c.post(f"/ui/runs/{run}/fork", data={"at": "1", "tier": "smart", "csrf": csrf})
        assert r.status_code == 503
        assert "no Redis (REDIS_URL is not set)" in alert(r.text)
        # A replay needs no Redis.
        r = await c.post(f"/ui/runs/{run}/replay", headers={"x-csrf-token": csrf})
        assert r.status_code == 200
        assert "identical" in r.text

    in_process(stack, check, agents=True)
    assert log_counts(stack) == before


def test_a_replay_past_its_time_limit_is_stopped_with_a_message(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _pipeline_run(stack)["run_id"]
    monkeypatch.setattr(actions, "REPLAY_TIMEOUT", 0.0)

    async def check(c: httpx.AsyncClient, csrf: str) -> None:
        r = await c.post(f"/ui/runs/{run}/replay",
                         headers={"x-csrf-token": csrf, "hx-request": "true"})  # fmt: skip
        assert r.status_code == 504
        assert "did not finish within 0 s and was stopped" in alert(r.text)

    in_process(stack, check, agents=True)


def test_a_fork_past_its_time_limit_is_stopped_and_writes_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _small_run(stack)["run_id"]
    before = log_counts(stack)
    monkeypatch.setattr(actions, "FORK_TIMEOUT", 0.0)

    async def check(c: httpx.AsyncClient, csrf: str) -> None:
        r = await c.post(f"/ui/runs/{run}/fork", data={"at": "1", "csrf": csrf},
                         headers={"hx-request": "true"})  # fmt: skip
        assert r.status_code == 504
        assert "did not finish within 0 s and was stopped; nothing was written" in alert(r.text)

    in_process(stack, check, agents=True, redis=True)
    assert log_counts(stack) == before


# -- the side-by-side view --------------------------------------------------------------


def test_a_unified_diff_becomes_two_columns() -> None:
    recorded = {"model": "claude-haiku-4-5", "system": "Be brief.", "max_tokens": 64}
    replayed = {"model": "claude-sonnet-5-5", "system": "Be brief.", "max_tokens": 64,
                "a_flag": 0}  # fmt: skip
    rows = side_by_side(_diff(recorded, replayed, "step 1").splitlines())
    kinds = [r.kind for r in rows]
    assert kinds[0] == "hunk"
    changed = [r for r in rows if r.kind == "changed"]
    assert [(r.left, r.right) for r in changed] == [
        ('  "model": "claude-haiku-4-5",', '  "model": "claude-sonnet-5-5",')
    ]
    assert [r.right for r in rows if r.kind == "added"] == ['  "a_flag": 0,']
    assert all(r.left == r.right for r in rows if r.kind == "same")
    # Lines that are no part of a diff span both columns; a diff may follow them.
    rows = side_by_side(["only run A took step 3 (llm m)", "--- A", "+++ B", "@@ -1 +1 @@",
                         "-a", "+b", "… 4 more lines"])  # fmt: skip
    assert [r.kind for r in rows] == ["note", "hunk", "changed", "note"]


def test_a_divergence_is_shown_recorded_beside_replayed() -> None:
    from projections.ui.app import _environment

    d = Divergence(
        kind="step", step=2, run_step=5, recorded="llm 'claude-haiku-4-5'",
        replayed="llm 'claude-haiku-4-5'",
        message="the record holds llm 'claude-haiku-4-5' at step 2 with a different request",
        diff=_diff({"system": "old prompt"}, {"system": "new prompt"}, "step 2"),
    )  # fmt: skip
    a = ActivationReplay(agent="desk", activation_id=uuid.uuid4(), trigger_id=uuid.uuid4(),
                         trigger_type="support.triaged", steps=2, replayed_steps=2,
                         outcome="completed", emitted=1, divergence=d)  # fmt: skip
    report = RunReplay(run_id=uuid.uuid4(), activations=[a])
    html = _environment().get_template("actions_replay.html").render(
        htmx=True, run_id=report.run_id, report=report, error=None,
        divergences={a.activation_id: side_by_side(d.diff.splitlines())},
    )  # fmt: skip
    assert "divergent" in html and "at step 2 (run step 5)" in html
    table = html.split('<table class="sbs">', 1)[1]
    assert '<th scope="col">Recorded</th><th scope="col">Replayed</th>' in table
    q = "&#34;"  # autoescaped
    assert re.search(rf"<td><del>\s*{q}system{q}: {q}old prompt{q}</del></td>\s*"
                     rf"<td><ins>\s*{q}system{q}: {q}new prompt{q}</ins></td>", table)  # fmt: skip
