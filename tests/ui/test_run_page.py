"""The run page in a real browser: its totals, the timeline tree over a waterfall, step
details, time travel with the keyboard and live refresh (its routes over HTTP are in
test_run_routes.py: the browser's event loop and pytest-asyncio's do not mix)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.ui.conftest import Stack

pytestmark = pytest.mark.browser


def _api_json(stack: Stack, path: str) -> Any:
    r = httpx.get(f"{stack.api}{path}", headers=stack.auth, timeout=10)
    r.raise_for_status()
    return r.json()


def _pipeline_run(stack: Stack) -> dict[str, Any]:
    """A settled run of the whole desk pipeline: model steps and a tool step. The oldest:
    one of the sample stream the stack began with (other tests add runs with dead letters,
    redrives and forks of their own)."""
    for run in reversed(stack.runs(status="completed")):
        if "research" in run["agents"] and run["llm_calls"] and run["tool_calls"]:
            return run
    raise AssertionError(f"no completed pipeline run among {stack.runs()}")


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
