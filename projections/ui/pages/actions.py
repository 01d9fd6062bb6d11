"""Replay, fork and diff from the run explorer: ``agentrt replay``, ``fork`` and ``diff`` as pages.

A replay calls nothing and writes nothing; a fork writes one new run (whole or not
at all, see :mod:`projections.fork`) and never the run it forks. Both run the
handlers of the agents this API process loaded (``agentrt api --app MODULE``), in
this process, under a time limit and at most :data:`AT_ONCE` at a time, so a long
one neither blocks other requests (they are async) nor runs unbounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode
from uuid import UUID

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData

from projections.errors import ReadSideError, StepOutOfRange, UnknownRun
from projections.record import RunRecord, load_run
from projections.ui.app import UI
from projections.ui.pages.actions_diff import activation_views, side_by_side
from runtime.errors import AgentrtError, ServiceUnavailable
from runtime.events.builtin import RunForked, StepRecorded

if TYPE_CHECKING:
    from projections.fork import ForkReport

#: Seconds a replay / a fork may take before it is stopped (a fork then writes nothing).
REPLAY_TIMEOUT = 120.0
FORK_TIMEOUT = 300.0
#: Replays and forks running at once in this process; more wait (within their time limit).
AT_ONCE = 2

NO_AGENTS = (
    "This API process has no agents loaded, so it cannot run their handlers: replay and "
    "fork need `agentrt api --app MODULE` (the module with your agents; `agentrt up` "
    "passes its --app), or the command line: `agentrt replay` / `agentrt fork`."
)
NO_REDIS = (
    "This API process has no Redis (REDIS_URL is not set), and a fork shares the tools' "
    "circuit breakers with the workers through it. Start the API with REDIS_URL set (as "
    "`agentrt up` does), or fork on the command line: `agentrt fork RUN --at N --app MODULE`."
)


async def _import(module: str) -> None:
    """Import a module (the model SDK comes with replay and fork: seconds) off the loop,
    so the first replay does not stall every other request of the process."""
    await asyncio.to_thread(importlib.import_module, module)


# -- the fork form ---------------------------------------------------------------------


@dataclasses.dataclass
class ForkForm:
    """The fork form's fields as typed (strings), re-shown with a message when refused."""

    at: str = ""
    tier: str = ""
    model: str = ""
    change_prompt: bool = False
    prompt: str = ""
    #: The prompt the form was filled with (an edit without the box ticked is refused).
    prompt_was: str = ""

    @classmethod
    def of(cls, form: FormData) -> ForkForm:
        def text(name: str) -> str:
            value = form.get(name)
            return value if isinstance(value, str) else ""

        return cls(text("at").strip(), text("tier").strip(), text("model").strip(),
                   bool(text("change_prompt")), text("prompt").replace("\r\n", "\n"),
                   text("prompt_was").replace("\r\n", "\n"))  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class StepOption:
    """A step of the run, as the form lists it."""

    number: int
    agent: str
    kind: str
    name: str
    model: bool


def _steps(record: RunRecord) -> list[StepOption]:
    return [
        StepOption(a.first_step + n - 1, a.agent, s.kind, s.name, s.kind == "llm")
        for a in record.activations
        for n, s in sorted(a.steps.items())
    ]


def _system_prompt(ui: UI, record: RunRecord, at: int | None) -> str:
    """The current system prompt of the agent that took step ``at`` (else the one its
    recorded request carried; "" when neither is known)."""
    try:
        activation, n = record.locate(at or 0)
    except StepOutOfRange:
        return ""
    for agent in ui.backend.agents:
        if agent.name == activation.agent and agent.system:
            return agent.system
    step = activation.steps.get(n)
    request = step.request if step is not None else None
    system = request.get("system") if isinstance(request, dict) else None
    return system if isinstance(system, str) else ""


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """A checked form: the step and what changes from it."""

    at: int
    model: str | None
    tier: str | None
    prompt: str | None


def _check(ui: UI, record: RunRecord, f: ForkForm) -> Change | str:
    """The form's change, or what is wrong with it (said on the form)."""
    try:
        at = int(f.at)
    except ValueError:
        return f"The step must be a whole number, not {f.at!r}." if f.at else "Choose a step."
    try:
        record.locate(at)
    except StepOutOfRange as exc:
        return exc.message
    if f.tier and f.model:
        return "Choose a model tier or type a model id, not both."
    models = ui.backend.settings.models
    if f.tier and f.tier not in models:
        return f"There is no model tier {f.tier!r} (the tiers: {', '.join(sorted(models))})."
    if f.model and (len(f.model) > 200 or any(c.isspace() for c in f.model)):
        return "A model id is one word without spaces, like claude-sonnet-5-5."
    if f.change_prompt and not f.prompt.strip():
        return "The system prompt is empty: write one, or untick “Replace the system prompt”."
    if not f.change_prompt and f.prompt.strip() != f.prompt_was.strip():
        return (
            "You edited the system prompt but did not tick “Replace the system prompt”: "
            "tick it to use your prompt, or undo the edit."
        )
    model = models[f.tier] if f.tier else f.model or None
    return Change(at, model, f.tier or None, f.prompt if f.change_prompt else None)


async def _fork(ui: UI, run_id: UUID, c: Change) -> ForkReport:
    """What ``agentrt fork`` does, with this process's log, settings and agents."""
    await _import("projections.fork")
    await _import("runtime.llm.client")
    from projections import fork as forking

    log = await ui.backend.log()
    # Every check before anything is written (or a model server started).
    plan = await forking.plan_fork(log, run_id, c.at, ui.backend.agents)
    change = forking.Change(model=c.model, tier=c.tier, prompt=c.prompt)
    return await forking.fork_live(log, plan, change, ui.backend.settings, redis_attempts=2)


def _offline(record: RunRecord) -> bool | None:
    """Whether the run's model steps were answered by the offline model (None: no model step)."""
    for e in record.events:
        if isinstance(e.body, StepRecorded) and (usage := e.body.usage or e.body.saved):
            return usage.offline
    return None


def _forked(record: RunRecord) -> RunForked | None:
    for e in record.events:
        if isinstance(e.body, RunForked):
            return e.body
    return None


# -- the routes ------------------------------------------------------------------------


def routes(r: APIRouter, ui: UI) -> None:
    at_once = asyncio.Semaphore(AT_ONCE)
    # For run_actions.html, included by the run page (whose context is the run's alone).
    ui.env.globals["actions_agents_loaded"] = lambda: bool(ui.backend.agents)

    @r.post("/runs/{run_id}/replay")
    async def replay(request: Request, run_id: UUID) -> Response:
        """Replay the run with the loaded agents' code: identical, or where it diverges."""

        def page(status: int, **ctx: Any) -> Response:
            ctx = {"report": None, "error": None, "divergences": {}, **ctx}
            return ui.render(request, "actions_replay.html", status, run_id=run_id, **ctx)

        if not ui.backend.agents:
            return page(409, error=NO_AGENTS)
        log = await ui.backend.log()
        await _import("projections.replay")
        from projections.replay import replay_run

        try:
            async with asyncio.timeout(REPLAY_TIMEOUT), at_once:
                report = await replay_run(
                    log, ui.backend.agents, run_id, settings=ui.backend.settings,
                    app="the app this API loaded (--app)",
                )  # fmt: skip
        except TimeoutError:
            return page(504, error=f"The replay did not finish within {REPLAY_TIMEOUT:.0f} s "
                        "and was stopped (it called and wrote nothing). `agentrt replay "
                        f"{run_id} --app MODULE` runs it without this limit.")  # fmt: skip
        except UnknownRun:
            raise  # the error page: 404
        except ReadSideError as exc:  # an agent of the run that the app no longer defines
            return page(exc.status, error=exc.message)
        divergences = {
            a.activation_id: side_by_side(a.divergence.diff.splitlines())
            for a in report.activations
            if a.divergence is not None
        }
        return page(200, report=report, divergences=divergences)

    async def fork_form(
        request: Request, record: RunRecord, f: ForkForm, error: str | None, status: int
    ) -> Response:
        run = None
        if request.method == "GET":
            try:  # the replay button and the parent link, once the projector has the run
                run = await (await ui.models()).run(record.run_id)
            except UnknownRun:
                run = None
        # An htmx POST swaps the form alone; a page load (or a form without htmx) the page.
        htmx = request.headers.get("hx-request") == "true" and request.method == "POST"
        return ui.render(
            request, "actions_fork_form.html" if htmx else "actions_fork.html", status,
            run_id=record.run_id, run=run, form=f, error=error, steps=_steps(record),
            tiers=sorted(ui.backend.settings.models.items()),
            on_fork_page=True, offline=not ui.backend.settings.anthropic_api_key,
        )  # fmt: skip

    @r.get("/runs/{run_id}/fork")
    async def fork_page(request: Request, run_id: UUID, at: str | None = None) -> Response:
        """The fork form, at step ``at`` (a link from a step of the run page) or the
        run's first model step."""
        record = await load_run(await ui.backend.log(), run_id)
        steps = _steps(record)
        default = next((s.number for s in steps if s.model), steps[0].number if steps else 1)
        f = ForkForm(at=(at or "").strip() or str(default))
        checked = _check(ui, record, f)
        error = checked if isinstance(checked, str) else None
        f.prompt = f.prompt_was = _system_prompt(ui, record, None if error else int(f.at))
        if error is None and not ui.backend.agents:
            error = NO_AGENTS
        elif error is None and ui.backend.settings.redis_url is None:
            error = NO_REDIS
        return await fork_form(request, record, f, error, 422 if isinstance(checked, str) else 200)

    @r.post("/runs/{run_id}/fork")
    async def fork_post(request: Request, run_id: UUID) -> Response:
        """Fork the run (``agentrt fork``), then show it beside its parent."""
        f = ForkForm.of(await request.form())
        log = await ui.backend.log()
        record = await load_run(log, run_id)  # only this run: the id in the URL
        checked = _check(ui, record, f)
        if isinstance(checked, str):
            return await fork_form(request, record, f, checked, 422)
        if not ui.backend.agents:
            return await fork_form(request, record, f, NO_AGENTS, 409)
        if ui.backend.settings.redis_url is None:
            return await fork_form(request, record, f, NO_REDIS, 503)
        try:
            async with asyncio.timeout(FORK_TIMEOUT), at_once:
                report = await _fork(ui, run_id, checked)
        except TimeoutError:
            message = (f"The fork did not finish within {FORK_TIMEOUT:.0f} s and was stopped; "
                       "nothing was written (a fork commits whole or not at all).")  # fmt: skip
            return await fork_form(request, record, f, message, 504)
        except ServiceUnavailable as exc:  # its message has the server's URL: not shown
            message = f"{exc.service} could not be reached, so nothing was forked."
            return await fork_form(request, record, f, message, 503)
        except AgentrtError as exc:  # the plan's checks (agents, steps), settings
            status = exc.status if isinstance(exc, ReadSideError) else 422
            return await fork_form(request, record, f, exc.message, status)
        target = f"/ui/diff?{urlencode({'a': str(run_id), 'b': str(report.run_id)})}"
        if request.headers.get("hx-request") == "true":
            return Response(status_code=200, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    @r.get("/diff")
    async def diff_page(request: Request, a: UUID, b: UUID) -> Response:
        """Two runs side by side: where they part, and what each cost."""
        from projections.diff import diff_records

        log = await ui.backend.log()
        record_a, record_b = await load_run(log, a), await load_run(log, b)
        d = diff_records(record_a, record_b)
        return ui.render(request, "diff_page.html", d=d, views=activation_views(d),
                         forked_a=_forked(record_a), forked_b=_forked(record_b),
                         offline_a=_offline(record_a), offline_b=_offline(record_b))  # fmt: skip
