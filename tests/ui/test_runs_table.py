"""The runs table in a real browser: filters, opening a run, live updates."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.ui.conftest import Stack

pytestmark = pytest.mark.browser


def test_runs_table_lists_filters_and_opens_a_run(page: Any, stack: Stack) -> None:
    runs = stack.runs()
    rows = page.locator("table.runs tbody tr")
    expect(rows).to_have_count(len(runs))
    waiting = [r for r in runs if r["status"] == "waiting_for_approval"]
    assert waiting, runs
    page.get_by_label("Status").select_option("waiting_for_approval")
    expect(rows).to_have_count(len(waiting))
    expect(page).to_have_url(re.compile(r"status=waiting_for_approval"))
    # A filter that does not parse is said beside the form, not a server error.
    page.get_by_label("Cost from ($)").fill("cheap")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("alert")).to_contain_text("min cost: a number of dollars")
    page.get_by_label("Cost from ($)").fill("")
    page.get_by_role("button", name="Filter").click()
    first = waiting[0]["run_id"]
    page.get_by_role("link", name=f"Run {first}").click()
    expect(page).to_have_url(re.compile(f"/ui/runs/{first}"))


def test_runs_table_updates_live(page: Any, stack: Stack) -> None:
    before = len(stack.runs())
    rows = page.locator("table.runs tbody tr")
    expect(rows).to_have_count(before)
    stack.post_samples([6])  # the spam: a one-agent run
    # No reload: the server-sent event from the log's tail refreshes the table.
    expect(rows).to_have_count(before + 1, timeout=30_000)
