"""Approvals, audit search, usage charts, dead letters and circuits in a real browser,
against `agentrt up` with the sample application."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.ui.conftest import Stack
from webhooks.config import load
from webhooks.demo.traffic import EMAILS, Email, postmark

pytestmark = pytest.mark.browser


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    """``check()``'s first truthy result, polled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def open_letters(stack: Stack) -> list[dict[str, Any]]:
    r = httpx.get(f"{stack.api}/dead-letters", params={"status": "open"}, headers=stack.auth,
                  timeout=10)  # fmt: skip
    r.raise_for_status()
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def status_of(stack: Stack, run_id: str) -> str | None:
    return next((r["status"] for r in stack.runs() if r["run_id"] == run_id), None)


def fresh_waiting(stack: Stack, n: int) -> list[str]:
    """``n`` runs of this test's own waiting for approval (other tests count the stack's)."""
    before = {r["run_id"] for r in stack.runs()}
    posted = stack.post_samples(list(range(len(EMAILS))))
    runs = stack.wait_runs(lambda rs: len(rs) >= len(before) + posted
                           and not any(r["status"] == "running" for r in rs))  # fmt: skip
    waiting = [r["run_id"] for r in runs
               if r["run_id"] not in before and r["status"] == "waiting_for_approval"]  # fmt: skip
    assert len(waiting) >= n, runs
    return waiting[:n]


def test_approve_and_deny_from_the_approvals_page(page: Any, stack: Stack) -> None:
    approve, deny = fresh_waiting(stack, 2)
    word = f"zebra{uuid.uuid4().hex[:6]}"
    page.get_by_role("link", name="Approvals").click()
    expect(page).to_have_url(re.compile(r"/ui/approvals$"))
    articles = page.locator("article.approval")
    mine = articles.filter(has=page.get_by_role("link", name=f"Run {approve}"))
    expect(mine).to_contain_text("Deadline")
    expect(mine).to_contain_text("Risk")
    mine.get_by_label("Comment (optional)").fill(f"fine by me {word}")
    mine.get_by_role("button", name="Approve").click()
    note = page.get_by_role("status").filter(has_text=approve)
    expect(note).to_contain_text("Approved")
    assert wait_for("the approved run to complete",
                    lambda: status_of(stack, approve) == "completed")  # fmt: skip

    other = articles.filter(has=page.get_by_role("link", name=f"Run {deny}"))
    other.get_by_role("button", name="Deny").click()
    expect(page.get_by_role("status").filter(has_text=deny)).to_contain_text("Denied")
    # The run completes; its ticket does not (the reviewer's state machine says failed).
    assert wait_for("the denied run to end", lambda: status_of(stack, deny) == "completed")
    [denied] = [r for r in stack.runs() if r["run_id"] == deny]
    assert denied["states"].get("reviewer") == "failed", denied

    # The decision is in the audit trail: found by the comment's word, and by the run.
    page.get_by_role("link", name="Audit").click()
    page.get_by_label(re.compile(r"^Text")).fill(word)
    page.get_by_role("button", name="Search").click()
    rows = page.locator("table.audit tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("approval.decided")
    expect(rows.first).to_contain_text(f"approved by ui: fine by me {word}")
    expect(page).to_have_url(re.compile(f"q={word}"))
    page.get_by_label(re.compile(r"^Text")).fill("")
    page.get_by_label("Run id").fill(approve)
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(f"run_id={approve}"))
    links = rows.locator("a[href^='/ui/runs/']")
    wait_for("the run's entries", lambda: links.count() >= 5)
    assert all(links.nth(i).get_attribute("href") == f"/ui/runs/{approve}"
               for i in range(links.count()))  # fmt: skip
    # A run id that does not parse is said beside the form.
    page.get_by_label("Run id").fill("not-a-run")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("alert")).to_contain_text("run id: a run id")


def test_usage_page_draws_charts_with_tables(page: Any, stack: Stack) -> None:
    page.get_by_role("link", name="Usage").click()
    # A range with no usage: empty charts saying so.
    page.get_by_label("First day").fill("2001-01-01")
    page.get_by_label("Last day").fill("2001-01-02")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_text("No model calls in this range.")).to_be_visible()
    expect(page.locator("svg.chart rect")).to_have_count(0)
    # Today's: the sample application's calls.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    page.get_by_label("First day").fill(today)
    page.get_by_label("Last day").fill(today)
    page.get_by_role("button", name="Show").click()
    charts = page.locator("svg.chart[role='img']")
    expect(charts).to_have_count(9)  # tokens, cost and savings by model, agent and day
    heading = page.get_by_role("heading", name="By agent")
    by_agent = page.locator("section.usage").filter(has=heading)
    expect(by_agent.locator("svg.chart > title").first).to_contain_text("Tokens")
    assert by_agent.locator("svg.chart rect.chart-bar").count() >= 3
    expect(by_agent.get_by_role("rowheader", name="triage")).to_be_visible()
    expect(by_agent.locator("svg.chart g.bar title", has_text="triage:").first).to_be_attached()
    by_day = page.locator("section.usage").filter(has=page.get_by_role("heading", name="By day"))
    expect(by_day.get_by_role("rowheader", name=today)).to_be_visible()


def test_circuits_page_renders(page: Any, stack: Stack) -> None:
    page.get_by_role("link", name="Circuits").click()
    expect(page.get_by_role("heading", name="Circuit breakers")).to_be_visible()
    expect(page.get_by_role("heading", name="Current state")).to_be_visible()
    page.get_by_label("Circuit (tool) name").fill("find_orders")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"name=find_orders"))
    expect(page.locator("table.circuits caption")).to_contain_text("newest first")


# -- dead letters -------------------------------------------------------------------------


def offline_models(stack: Stack) -> list[str]:
    """The offline model servers of the stack's workers (each says where, in its log)."""
    logs = sorted((stack.state / "logs").glob("worker*.log"))
    text = "".join(p.read_text(errors="replace") for p in logs)
    urls = sorted(set(re.findall(r"base_url=(http://127\.0\.0\.1:\d+)", text)))
    assert urls, "no offline model server in the log"
    return urls


def test_dead_letter_inspect_and_redrive(page: Any, stack: Stack) -> None:
    """A model that refuses the triage's request (a 400: no retry helps) dead-letters the
    email at once; once the model answers again, a redrive from the page completes it."""
    models = offline_models(stack)
    _, sources = load(stack.state / "webhooks.toml")
    # A new email (the triage's response cache would answer a known one without a model).
    tag = uuid.uuid4().hex[:8]
    email = Email("grace@example.com", "Grace Hopper", f"Password reset link {tag}",
                  f"Hello, the password reset link {tag} in your mail does not open. "
                  "Can you send another one? Thanks", "en", "technical")  # fmt: skip
    post = postmark(sources["postmark"], 900, email)
    before = {d["event_id"] for d in open_letters(stack)}
    try:
        for url in models:
            httpx.post(f"{url}/_offline/faults", json={"kind": "bad_request"},
                       headers={"x-api-key": "offline"}, timeout=10).raise_for_status()  # fmt: skip
        r = httpx.post(f"{stack.ingress}/webhooks/{post.source}", content=post.body,
                       headers=post.headers, timeout=10)  # fmt: skip
        assert r.status_code == 202, r.text
        run = wait_for(
            "the dead letter",
            lambda: next(
                (d["run_id"] for d in open_letters(stack) if d["event_id"] not in before), None
            ),
        )
    finally:
        for url in models:
            httpx.delete(f"{url}/_offline/faults", headers={"x-api-key": "offline"}, timeout=10)

    page.get_by_role("link", name="Dead letters", exact=True).click()
    page.get_by_label("Status").select_option("open")
    page.get_by_role("button", name="Filter").click()
    row = page.locator("table.dead-letters tbody tr").filter(
        has=page.locator(f"a[href='/ui/runs/{run}']"))  # fmt: skip
    expect(row).to_contain_text("triage")
    row.get_by_role("link", name=re.compile("^Inspect dead letter")).click()
    expect(page.get_by_role("heading", name=re.compile("^Dead letter"))).to_be_visible()
    expect(page.locator("pre").first).to_contain_text("400")
    expect(page.locator("pre").nth(1)).to_contain_text(tag)  # the trigger's body
    expect(page.get_by_role("link", name=f"Run {run}")).to_be_visible()
    expect(page.get_by_role("checkbox", name=re.compile("Force"))).not_to_be_checked()
    page.get_by_role("button", name="Redrive").click()
    expect(page.get_by_role("status")).to_contain_text("went back to triage")
    # A low-risk technical ticket: the reviewer lets the reply go out, the run completes.
    assert wait_for("the redriven run to complete", lambda: status_of(stack, run) == "completed")
    page.get_by_role("link", name="Dead letters", exact=True).click()
    page.get_by_label("Status").select_option("redriven")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("table.dead-letters tbody tr").filter(
        has=page.locator(f"a[href='/ui/runs/{run}']"))).to_contain_text("redriven")  # fmt: skip
