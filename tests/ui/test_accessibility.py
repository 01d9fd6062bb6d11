"""Accessibility of every page of the run explorer: axe-core's WCAG 2 A/AA rules (labels,
names, contrast, structure) in a real browser, and the runs table by keyboard alone.

axe-core is vendored under tests/ui/vendor/ (test-only). It is injected into the page,
which the pages' Content-Security-Policy (script-src 'self') would refuse: the axe test
uses a browser context of its own that bypasses CSP; nothing else does."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.ui.conftest import Stack, sign_in

pytestmark = pytest.mark.browser

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
#: The rules checked: WCAG 2.0/2.1 levels A and AA.
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]

#: The pages, by name: a path (with {done}, {waiting}: a completed run, one waiting for
#: approval) and whether it is seen signed in.
PAGES: dict[str, tuple[str, bool]] = {
    "sign-in": ("/ui/login", False),
    "runs table": ("/ui/", True),
    "runs table, filtered": ("/ui/?status=completed", True),
    "runs table, bad filter": ("/ui/?min_cost=cheap", True),
    "run page": ("/ui/runs/{done}", True),
    "run page, waiting for approval": ("/ui/runs/{waiting}", True),
    "fork page": ("/ui/runs/{done}/fork", True),
    "diff page": ("/ui/diff?a={done}&b={waiting}", True),
    "approvals": ("/ui/approvals", True),
    "audit": ("/ui/audit", True),
    "usage": ("/ui/usage", True),
    "dead letters": ("/ui/dead-letters", True),
    "circuits": ("/ui/circuits", True),
    "error page": ("/ui/runs/00000000-0000-0000-0000-000000000000", True),
}


def describe(violations: list[dict[str, Any]]) -> str:
    """axe's findings as lines a person can act on."""
    lines = []
    for v in violations:
        lines.append(f"- {v['id']} ({v.get('impact')}): {v['help']} [{v['helpUrl']}]")
        for node in v["nodes"][:8]:
            summary = " ".join((node.get("failureSummary") or "").split())
            lines.append(f"    at {' '.join(map(str, node['target']))}: {summary[:300]}")
        if len(v["nodes"]) > 8:
            lines.append(f"    ... and {len(v['nodes']) - 8} more")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def axe_contexts(browser: Any, stack: Stack) -> Iterator[dict[bool, Any]]:
    """Two CSP-bypassing contexts (axe is injected): signed in, and not."""
    made = {}
    for signed_in in (True, False):
        context = browser.new_context(base_url=stack.api, bypass_csp=True,
                                      viewport={"width": 1400, "height": 900})  # fmt: skip
        context.set_default_timeout(15_000)
        if signed_in:
            pg = context.new_page()
            sign_in(pg, stack)
            pg.wait_for_url("**/ui/")
            pg.close()
        made[signed_in] = context
    try:
        yield made
    finally:
        for context in made.values():
            context.close()


@pytest.fixture(scope="module")
def run_ids(stack: Stack) -> dict[str, str]:
    runs = stack.runs()
    done = next(r["run_id"] for r in runs if r["status"] == "completed")
    waiting = next(r["run_id"] for r in runs if r["status"] == "waiting_for_approval")
    return {"done": done, "waiting": waiting}


@pytest.mark.parametrize("name", list(PAGES))
def test_page_has_no_wcag_a_or_aa_violations(
    axe_contexts: dict[bool, Any], run_ids: dict[str, str], name: str
) -> None:
    path, signed_in = PAGES[name]
    pg = axe_contexts[signed_in].new_page()
    try:
        response = pg.goto(path.format(**run_ids))
        assert response is not None
        # A filter that does not parse is a 422 page saying so beside the form.
        expected = {"error page": 404, "runs table, bad filter": 422}.get(name, 200)
        assert response.status == expected, (
            f"{name}: {path} answered {response.status}, not {expected} "
            f"(is the page missing?): {response.text()[:300]}"
        )
        assert "text/html" in response.headers.get("content-type", ""), response.headers
        pg.wait_for_function("document.readyState === 'complete'")
        pg.add_script_tag(path=str(AXE))
        result = pg.evaluate(
            "tags => axe.run(document, {runOnly: {type: 'tag', values: tags},"
            " resultTypes: ['violations']})",
            TAGS,
        )
        assert result["passes"] or result["violations"] or result["incomplete"], result
        violations = result["violations"]
        assert not violations, f"{name} ({path}):\n{describe(violations)}"
    finally:
        pg.close()


def _focused(page: Any) -> dict[str, str]:
    found: dict[str, str] = page.evaluate(
        """() => { const e = document.activeElement;
        return {tag: e.tagName.toLowerCase(), id: e.id || '', cls: e.className || '',
                text: (e.getAttribute('aria-label') || e.textContent || '').trim().slice(0, 60),
                href: e.getAttribute('href') || '',
                nav: e.closest('nav[aria-label="Sections"]') ? 'yes' : '',
                form: e.closest('form#filters') ? 'yes' : ''}; }"""
    )
    return found


def test_runs_table_by_keyboard(page: Any, stack: Stack) -> None:
    """From the top of the runs table: Tab reaches the skip link first, then the sections'
    navigation, the filters, and a run's link; Enter on it opens the run."""
    page.goto("/ui/")
    expect(page.locator("table.runs tbody tr").first).to_be_visible()
    order: list[dict[str, str]] = []
    for _ in range(60):
        page.keyboard.press("Tab")
        now = _focused(page)
        order.append(now)
        if now["href"].startswith("/ui/runs/"):
            break
    assert order[0]["cls"] == "skip" and order[0]["href"] == "#main", order[0]
    first_nav = next(i for i, f in enumerate(order) if f["nav"])
    first_filter = next(i for i, f in enumerate(order) if f["form"])
    run_link = len(order) - 1
    assert order[run_link]["href"].startswith("/ui/runs/"), order
    assert 0 < first_nav < first_filter < run_link, order
    assert order[first_filter]["id"] == "f-status", order  # the first filter: status
    run_id = order[run_link]["href"].rsplit("/", 1)[1]
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(f"/ui/runs/{run_id}$"))


def test_skip_link_moves_focus_to_the_content(page: Any, stack: Stack) -> None:
    page.goto("/ui/")
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()  # visible once focused, not only to screen readers
    page.keyboard.press("Enter")
    expect(page.locator("main#main")).to_be_focused()
