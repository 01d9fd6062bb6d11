"""The run page's routes over HTTP (a real server, no browser): they never show another run's
data, number steps as `agentrt fork --at` does, and answer bad input with 4xx pages."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from projections.api import create_api
from projections.queries import CircuitTransitionRow, TimelineEntry
from projections.record import load_run
from projections.ui.pages.run_view import Block, circuit_view, model_view, waterfall
from runtime.events.builtin import StepRecorded
from runtime.events.ids import run_stream
from runtime.events.model import NewEvent, new_event_id
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.projections import test_api as api_tests
from tests.projections.test_api import TOKEN, Tallier, serving, with_token
from tests.support.apps.mailpair import Responder, Triage

#: The query API tests' fixtures: two runs of the mailpair app, made by real workers.
llm = api_tests.llm
two_runs = api_tests.two_runs


@pytest.fixture
async def ui_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The query API with the run explorer on a real server (a thread), signed in."""
    app = create_api(with_token(settings), agents=[Triage(), Responder(), Tallier()])
    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await _sign_in(client)
            yield client


async def _sign_in(client: httpx.AsyncClient) -> None:
    form = await client.get("/ui/login")
    nonce = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert nonce is not None, form.text
    data = {"token": TOKEN, "csrf": nonce[1], "next": "/ui/"}
    signed = await client.post("/ui/login", data=data)
    assert signed.status_code == 303, signed.text


async def _fragment(client: httpx.AsyncClient, path: str, **params: Any) -> httpx.Response:
    return await client.get(path, params=params, headers={"hx-request": "true"})


async def test_step_event_and_state_routes_never_show_another_run(
    ui_client: httpx.AsyncClient, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_runs
    mine, theirs = await log.read_run(a), await log.read_run(b)
    page = await ui_client.get(f"/ui/runs/{a}")
    assert page.status_code == 200 and str(b) not in page.text
    assert page.text.count('<svg class="wf"') == len(mine)
    # Its own steps show their data: the prompt with Ada's email.
    first = next(e for e in mine if isinstance(e.body, StepRecorded) and e.body.kind == "llm")
    own = await _fragment(ui_client, f"/ui/runs/{a}/steps/{first.position}")
    assert own.status_code == 200 and "Prompt" in own.text and "invoice 1" in own.text
    secrets = ("grace@example.com", "invoice 2", *(str(e.event_id) for e in theirs))
    for e in theirs:
        for path, status in ((f"/ui/runs/{a}/steps/{e.position}", 404),
                             (f"/ui/runs/{a}/events/{e.position}", 404)):  # fmt: skip
            r = await _fragment(ui_client, path)
            assert r.status_code == status, (path, r.text)
            assert not any(s in r.text for s in secrets), r.text
        r = await _fragment(ui_client, f"/ui/runs/{a}/state", at=e.position)
        assert r.status_code == 422 and "is not an event of run" in r.text
        assert not any(s in r.text for s in secrets), r.text
    # A position of this run that is not a step is not served as one.
    [root] = [e for e in mine if e.event_id == a]
    assert (await _fragment(ui_client, f"/ui/runs/{a}/steps/{root.position}")).status_code == 404
    event = await _fragment(ui_client, f"/ui/runs/{a}/events/{root.position}")
    assert event.status_code == 200 and "invoice 1" in event.text
    # Time travel folds this run's events only: after its first event, one event.
    state = await _fragment(ui_client, f"/ui/runs/{a}/state", i=0)
    assert state.status_code == 200 and f"Event 1 of {len(mine)}" in state.text
    assert "&#34;events&#34;: 1," in state.text


async def test_fork_links_number_steps_as_agentrt_fork_does(
    ui_client: httpx.AsyncClient, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, _ = two_runs
    record = await load_run(log, a)
    steps = [e for e in record.events if isinstance(e.body, StepRecorded)]
    assert len(steps) >= 2
    for e in steps:
        assert isinstance(e.body, StepRecorded)
        r = await _fragment(ui_client, f"/ui/runs/{a}/steps/{e.position}")
        found = re.search(rf"/ui/runs/{a}/fork\?at=(\d+)", r.text)
        assert found is not None, r.text
        activation, n = record.locate(int(found[1]))
        assert (activation.activation_id, n) == (e.body.activation_id, e.body.step)


async def test_bad_ids_and_unknown_runs_get_4xx_pages(
    ui_client: httpx.AsyncClient, log: EventLog, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, _ = two_runs
    missing = uuid.uuid4()
    # In the log, not yet in the read models: the page says so.
    fresh = new_event_id()
    body = api_tests.email(3, "lin@example.com")
    await log.append(run_stream(fresh), [NewEvent(body=body, event_id=fresh, run_id=fresh)])
    r = await ui_client.get(f"/ui/runs/{fresh}")
    assert r.status_code == 404 and "is not projected yet" in r.text, r.text
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
        r = await ui_client.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("text/html") and text in r.text, (path, r.text)
    # Signed out, nothing: the page redirects to the sign-in form.
    async with httpx.AsyncClient(base_url=str(ui_client.base_url)) as anonymous:
        r = await anonymous.get(f"/ui/runs/{a}/steps/1")
        assert r.status_code == 303 and "/ui/login" in r.headers["location"]


async def test_without_the_agents_time_travel_shows_the_current_state_and_says_why(
    settings: Settings, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    app = create_api(with_token(settings))
    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await _sign_in(client)
            r = await _fragment(client, f"/ui/runs/{two_runs[0]}/state", i=0)
            page = await client.get(f"/ui/runs/{two_runs[0]}")
    assert page.status_code == 200 and "without the agents' code" in page.text
    assert r.status_code == 200 and "agentrt api --app" in r.text
    assert "Event 1 of" in r.text


def test_the_waterfall_escapes_what_the_log_holds_and_scales_its_bars() -> None:
    run_id, t0 = uuid.uuid4(), datetime(2026, 1, 1, tzinfo=UTC)

    def entry(n: int, ms: float | None, text: str) -> TimelineEntry:
        return TimelineEntry(
            run_id=run_id, position=n, tx=1, event_id=uuid.uuid4(), event_type="x<y>",
            stream_id="s", causation_id=None, parent=None, depth=n, agent='a"b',
            activation_id=None, step=None, kind=None, name=None, model=None, duration_ms=ms,
            input_tokens=None, output_tokens=None, cost_usd=None,
            recorded_at=t0 + timedelta(milliseconds=100 * n), summary=text,
        )  # fmt: skip

    fall = waterfall(run_id, [entry(0, None, "<script>alert(1)</script>"),
                              entry(1, 50.0, "a & b"), entry(30, 100.0, "late")], t0)  # fmt: skip
    html = str(fall.rows)
    assert "<script>" not in html and "&lt;script&gt;" in html and "a &amp; b" in html
    assert "a&quot;b" in html and "x&lt;y&gt;" in html
    assert fall.span_ms == 3000.0
    # The second entry ran from 50 to 100 ms of 3 s: x 16.7, width 16.7 of 1000; the
    # third ends the run; the depth past the deepest indentation is capped.
    assert 'x="16.7" y="1" width="16.7"' in html
    assert 'x="966.7" y="1" width="33.3"' in html and 'class="tree i16"' in html


def test_a_model_step_shows_its_prompt_response_and_the_tool_calls_it_asked_for() -> None:
    step = StepRecorded(
        activation_id=uuid.uuid4(), agent="a", step=2, kind="llm", name="m", request_hash="h",
        request={"model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "be brief"}],
                 "tools": [{"name": "find_orders", "input_schema": {}}],
                 "messages": [
                     {"role": "user", "content": "hello"},
                     {"role": "assistant", "content": [
                         {"type": "tool_use", "id": "t1", "name": "find_orders",
                          "input": {"q": 1}}]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": "t1", "content": "none",
                          "is_error": True}]},
                 ]},
        result={"content": [{"type": "text", "text": "let me look"},
                            {"type": "tool_use", "id": "t2", "name": "refund", "input": {"n": 2}}],
                "stop_reason": "tool_use"},
    )  # fmt: skip
    view = model_view(step)
    assert [b.text for b in view.system] == ["be brief"] and view.tools == ["find_orders"]
    assert view.settings == {"model": "m", "max_tokens": 9} and view.options == ""
    assert [m.role for m in view.messages] == ["user", "assistant", "user"]
    assert view.messages[1].blocks[0].label == "find_orders"
    assert view.messages[2].blocks[0] == Block("tool_result", "none", "t1", True)
    assert [b.label for b in view.tool_calls] == ["refund"] and view.stop_reason == "tool_use"
    assert '"n": 2' in view.tool_calls[0].text


def test_the_circuit_around_a_call_is_the_state_before_it_and_the_changes_during_it() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)

    def moved(seconds: float, to: str) -> CircuitTransitionRow:
        return CircuitTransitionRow(
            position=int(seconds), tx=1, event_id=uuid.uuid4(), name="crm", from_state="x",
            to_state=to, failures=3, reason="", at=t + timedelta(seconds=seconds), run_id=None,
        )  # fmt: skip

    newest_first = [moved(11, "open"), moved(5, "half_open"), moved(1, "open")]
    view = circuit_view(newest_first, t + timedelta(seconds=10), t + timedelta(seconds=12),
                        complete=True)  # fmt: skip
    assert view.before == "half_open" and [d.to_state for d in view.during] == ["open"]
    assert circuit_view([], t, t, complete=True).before == "closed"
    assert circuit_view([moved(1, "open")], t, t + timedelta(seconds=2),
                        complete=False).before == "unknown"  # fmt: skip


async def test_a_live_refresh_is_204_until_the_runs_row_moves(
    ui_client: httpx.AsyncClient, two_runs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """A live run page refreshes when the projector folds new events, of any run: it names
    the row's position it shows, and gets 204 (nothing to swap) while that is current."""
    a, _ = two_runs
    page = await ui_client.get(f"/ui/runs/{a}")
    since = re.search(r'id="run-since" name="since" value="([^"]+)"', page.text)
    assert since is not None, page.text[:2000]
    same = await _fragment(ui_client, f"/ui/runs/{a}", part="body", since=since[1])
    assert same.status_code == 204 and same.content == b""
    moved = await _fragment(ui_client, f"/ui/runs/{a}", part="body", since="0:0")
    assert moved.status_code == 200 and 'id="run-body"' in moved.text
