"""The run page: its totals, the timeline tree over a waterfall, step details, time travel
and live refresh in a real browser; and over HTTP, that its routes never show another
run's data, number steps as `agentrt fork --at` does and answer bad input with 4xx."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from projections.api import create_api
from projections.record import load_run
from runtime.events.builtin import StepRecorded
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections.test_api import (  # noqa: F401 (fixtures)
    TOKEN,
    Tallier,
    llm,
    serving,
    two_runs,
    with_token,
)
from tests.support.apps.mailpair import Responder, Triage
from tests.ui.conftest import Stack

browser = pytest.mark.browser


def _api_json(stack: Stack, path: str) -> Any:
    r = httpx.get(f"{stack.api}{path}", headers=stack.auth, timeout=10)
    r.raise_for_status()
    return r.json()


def _pipeline_run(stack: Stack) -> dict[str, Any]:
    """A settled run of the whole desk pipeline: model steps and a tool step."""
    for run in stack.runs(status="completed"):
        if "research" in run["agents"] and run["llm_calls"] and run["tool_calls"]:
            return run
    raise AssertionError(f"no completed pipeline run among {stack.runs()}")


@browser
def test_a_run_opens_from_the_table_with_its_tree_waterfall_and_step_details(
    page: Any, stack: Stack
) -> None:
    run = _pipeline_run(stack)
    run_id = run["run_id"]
    timeline = _api_json(stack, f"/runs/{run_id}/timeline")
    page.get_by_role("link", name=f"Run {run_id}").click()
    expect(page).to_have_url(re.compile(f"/ui/runs/{run_id}$"))
    expect(page.get_by_role("heading", level=1)).to_contain_text(run_id[:8])
    expect(page.locator("#run-body")).to_contain_text("Model calls")
    expect(page.locator("#run-body")).to_contain_text("reviewer (state machine)")
    expect(page.locator("#run-body table.usage")).to_contain_text("claude-")
    # Finished: no live connection.
    expect(page.locator("#run-live")).to_have_count(0)

    rows = page.locator("table.timeline tbody tr")
    expect(rows).to_have_count(len(timeline))
    # The tree: each row indented by its depth; the root first.
    deepest = max(e["depth"] for e in timeline)
    assert deepest >= 2
    expect(rows.first).to_contain_text(timeline[0]["event_type"])
    expect(page.locator(f"table.timeline td.i{deepest}")).not_to_have_count(0)
    # The waterfall: one bar per row, the timed ones as wide as their share of the run.
    expect(page.locator("table.timeline svg.wf rect")).to_have_count(len(timeline))
    widths = [float(w) for w in page.locator("svg.wf rect.timed").evaluate_all(
        "rs => rs.map(r => r.getAttribute('width'))")]  # fmt: skip
    timed = [e for e in timeline if e["duration_ms"]]
    assert len(widths) == len(timed) and max(widths) > 50 and min(widths) >= 3

    model = page.locator("table.timeline tr.k-llm").first
    model.locator("summary").click()
    detail = model.locator(".detail")
    for text in ("Prompt", "System", "Response", "Tokens", "in,", "Cost", "Attempts"):
        expect(detail).to_contain_text(text)
    fork = detail.get_by_role("link", name="Fork from this step")
    expect(fork).to_have_attribute("href", re.compile(rf"^/ui/runs/{run_id}/fork\?at=\d+$"))

    tool = page.locator("table.timeline tr.k-tool").first
    tool.locator("summary").click()
    detail = tool.locator(".detail")
    for text in ("Input", "Output", "Circuit breaker", "closed"):
        expect(detail).to_contain_text(text)
    expect(detail.get_by_role("link", name="Fork from this step")).to_be_visible()


@browser
def test_the_time_travel_slider_moves_with_the_keyboard(page: Any, stack: Stack) -> None:
    run_id = _pipeline_run(stack)["run_id"]
    total = len(_api_json(stack, f"/runs/{run_id}/events")["items"])
    page.goto(f"/ui/runs/{run_id}")
    at, state = page.locator("#tt-at"), page.locator("#tt-state")
    expect(at).to_contain_text(f"Event {total} of {total}")
    expect(state).to_contain_text('"current": "complete"')
    slider = page.get_by_label("State as of event")
    slider.focus()
    slider.press("Home")
    expect(at).to_contain_text(f"Event 1 of {total}")
    expect(state).to_contain_text('"current": "intake"')
    expect(state).not_to_contain_text('"current": "complete"')
    slider.press("ArrowRight")
    expect(at).to_contain_text(f"Event 2 of {total}")
    slider.press("End")
    slider.press("ArrowLeft")
    expect(at).to_contain_text(f"Event {total - 1} of {total}")


@browser
def test_a_waiting_run_s_page_follows_it_live_until_it_ends(page: Any, stack: Stack) -> None:
    before = {r["run_id"] for r in stack.runs()}
    stack.post_samples([0])  # Ada's invoice: the reviewer asks for approval
    runs = stack.wait_runs(lambda rs: any(r["run_id"] not in before
                                          and r["status"] == "waiting_for_approval"
                                          for r in rs))  # fmt: skip
    [run] = [r for r in runs if r["run_id"] not in before]
    run_id = run["run_id"]
    page.goto(f"/ui/runs/{run_id}")
    expect(page.locator("#run-live")).to_contain_text("Live")
    rows = page.locator("table.timeline tbody tr")
    expect(rows).to_have_count(len(_api_json(stack, f"/runs/{run_id}/timeline")))
    shown = rows.count()
    events = _api_json(stack, f"/runs/{run_id}/events")["items"]
    [asked] = [e for e in events if e["event_type"] == "approval.requested"]
    decided = httpx.post(
        f"{stack.api}/runs/{run_id}/approvals/{asked['body']['approval_id']}",
        json={"approved": True, "by": "test"}, headers=stack.auth, timeout=10,
    )  # fmt: skip
    assert decided.status_code == 200, decided.text
    # No reload: the log's tail refreshes the totals and the timeline, then stops.
    expect(page.locator("#run-body .badge.completed")).to_have_count(1, timeout=30_000)
    expect(page.locator("#run-live")).to_contain_text("live updates stopped", timeout=30_000)
    assert rows.count() > shown
    expect(page.locator("table.timeline")).to_contain_text("approval.decided")


# -- over HTTP, without a browser -----------------------------------------------------------


@pytest.fixture
def ui_client(settings: Settings) -> Iterator[httpx.Client]:
    """The query API with the run explorer on a real server, signed in."""
    app = create_api(with_token(settings), agents=[Triage(), Responder(), Tallier()])
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        _sign_in(client)
        yield client


def _sign_in(client: httpx.Client) -> None:
    form = client.get("/ui/login")
    nonce = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert nonce is not None, form.text
    signed = client.post("/ui/login", data={"token": TOKEN, "csrf": nonce[1], "next": "/ui/"})
    assert signed.status_code == 303, signed.text


def _fragment(client: httpx.Client, path: str, **params: Any) -> httpx.Response:
    return client.get(path, params=params, headers={"hx-request": "true"})


async def test_step_event_and_state_routes_never_show_another_run(
    ui_client: httpx.Client, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_runs
    mine, theirs = await log.read_run(a), await log.read_run(b)
    page = ui_client.get(f"/ui/runs/{a}")
    assert page.status_code == 200 and str(b) not in page.text
    assert page.text.count("<svg class=\"wf\"") == len(mine)
    # Its own steps show their data: the prompt with Ada's email.
    first = next(e for e in mine if isinstance(e.body, StepRecorded) and e.body.kind == "llm")
    own = _fragment(ui_client, f"/ui/runs/{a}/steps/{first.position}")
    assert own.status_code == 200 and "Prompt" in own.text and "invoice 1" in own.text
    secrets = ("grace@example.com", "invoice 2", *(str(e.event_id) for e in theirs))
    for e in theirs:
        for path, status in ((f"/ui/runs/{a}/steps/{e.position}", 404),
                             (f"/ui/runs/{a}/events/{e.position}", 404)):  # fmt: skip
            r = _fragment(ui_client, path)
            assert r.status_code == status, (path, r.text)
            assert not any(s in r.text for s in secrets), r.text
        r = _fragment(ui_client, f"/ui/runs/{a}/state", at=e.position)
        assert r.status_code == 422 and "is not an event of run" in r.text
        assert not any(s in r.text for s in secrets), r.text
    # A position of this run that is not a step is not served as one.
    [root] = [e for e in mine if e.event_id == a]
    assert _fragment(ui_client, f"/ui/runs/{a}/steps/{root.position}").status_code == 404
    assert "invoice 1" in _fragment(ui_client, f"/ui/runs/{a}/events/{root.position}").text
    # Time travel folds this run's events only: after its first event, one event.
    state = _fragment(ui_client, f"/ui/runs/{a}/state", i=0)
    assert state.status_code == 200 and f"Event 1 of {len(mine)}" in state.text
    assert "&#34;events&#34;: 1," in state.text


async def test_fork_links_number_steps_as_agentrt_fork_does(
    ui_client: httpx.Client, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, _ = two_runs
    record = await load_run(log, a)
    steps = [e for e in record.events if isinstance(e.body, StepRecorded)]
    assert len(steps) >= 2
    for e in steps:
        assert isinstance(e.body, StepRecorded)
        r = _fragment(ui_client, f"/ui/runs/{a}/steps/{e.position}")
        found = re.search(rf"/ui/runs/{a}/fork\?at=(\d+)", r.text)
        assert found is not None, r.text
        activation, n = record.locate(int(found[1]))
        assert (activation.activation_id, n) == (e.body.activation_id, e.body.step)


async def test_bad_ids_and_unknown_runs_get_4xx_pages(
    ui_client: httpx.Client, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, _ = two_runs
    missing = uuid.uuid4()
    cases = [
        ("/ui/runs/not-a-uuid", 422, "Invalid request"),
        (f"/ui/runs/{missing}", 404, f"no such run: {missing}"),
        (f"/ui/runs/{missing}/steps/1", 404, str(missing)),
        (f"/ui/runs/{missing}/state", 404, str(missing)),
        ("/ui/runs/not-a-uuid/steps/1", 422, "Invalid request"),
        (f"/ui/runs/{a}/steps/x", 422, "Invalid request"),
        (f"/ui/runs/{a}/steps/{2**70}", 404, "has no event at position"),
        (f"/ui/runs/{a}/events/-1", 404, "has no event at position"),
        (f"/ui/runs/{a}/state?i=-1", 422, "is not one"),
        (f"/ui/runs/{a}/state?i=100000", 422, "is not one"),
        (f"/ui/runs/{a}/state?at=x", 422, "Invalid request"),
    ]
    for path, status, text in cases:
        r = ui_client.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("text/html") and text in r.text, (path, r.text)
    # Signed out, nothing: the page redirects to the sign-in form.
    with httpx.Client(base_url=str(ui_client.base_url)) as anonymous:
        r = anonymous.get(f"/ui/runs/{a}/steps/1")
        assert r.status_code == 303 and "/ui/login" in r.headers["location"]


async def test_without_the_agents_time_travel_shows_the_current_state_and_says_why(
    settings: Settings, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    app = create_api(with_token(settings))
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        _sign_in(client)
        r = _fragment(client, f"/ui/runs/{two_runs[0]}/state", i=0)
        assert r.status_code == 200 and "agentrt api --app" in r.text
        assert "Event 1 of" in r.text
