"""Replay (promise 7): re-run a past run's activations with the agents' current code.

Every activation of the run is run again, in the order the log committed them,
through :func:`runtime.worker.activation.activate` (the worker's own function),
with its recorded steps fed back (``Steps(None, recorded=...)``). What the
handler asks for (each step's kind, name and request), what it emits (type and
body; ids differ by nature) and how it ends are compared with the record, and
the first difference is reported with a readable diff.

A replay calls no model and no tool and writes nothing: a step the record does
not have is a divergence, never executed (:class:`ReplaySteps`), and the
services it runs with refuse every call (:class:`ReplayServices`). It reads
the run once (:func:`~projections.record.load_run`).
"""

from __future__ import annotations

import asyncio
import difflib
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal
from uuid import UUID

import anthropic
import httpx2
import msgspec

from projections.errors import AgentMissing
from projections.fork import Change
from projections.record import RecordedActivation, RunRecord, load_run
from runtime.agents.agent import Agent
from runtime.agents.context import FROM_START, Trigger
from runtime.effects.breaker import CircuitBreaker, Transition
from runtime.effects.steps import StepCall, Steps, request_hash
from runtime.errors import StepDivergence
from runtime.events.builtin import RunForked, StepRecorded
from runtime.events.ids import activation_stream
from runtime.events.model import Event, NewEvent, RecordedEvent, event_type_of
from runtime.llm.calls import LLM
from runtime.log.snapshots import SnapshotStore
from runtime.log.store import EventLog
from runtime.settings import Settings
from runtime.worker.activation import activate

_canonical = msgspec.json.Encoder(order="sorted")
#: A replayed handler that runs longer than its agent's timeout (or this) is cut off.
_DEFAULT_TIMEOUT = 300.0


# -- the report ---------------------------------------------------------------------


class Divergence(msgspec.Struct, frozen=True, kw_only=True):
    """The first thing a replayed activation did differently from the record.

    ``kind``: ``step`` (a step asked for something else, was not in the record, or
    was no longer taken), ``emit`` (an emitted event differs, is extra or missing),
    ``outcome`` (completed / budget_exceeded / dead-lettered differ) or ``error``
    (the handler raised where the record has it complete).
    """

    kind: Literal["step", "emit", "outcome", "error"]
    #: One line that says what differs.
    message: str
    #: ``step``: the step's number within the activation and within the run.
    step: int | None = None
    run_step: int | None = None
    #: ``emit``: the index (0-based) of the emitted event.
    index: int | None = None
    #: What the record holds and what the replay did (``llm 'model'``, an event type,
    #: an outcome); None for "nothing".
    recorded: str | None = None
    replayed: str | None = None
    #: A unified diff (recorded -> replayed) of the two requests or event bodies, as
    #: pretty-printed canonical JSON; or the traceback's last frame for ``error``.
    diff: str = ""

    @property
    def where(self) -> str:
        """``at step 3 (run step 5)``, ``at emitted event 1``, ``in outcome``, ``with an error``."""
        if self.kind == "step":
            return f"at step {self.step} (run step {self.run_step})"
        if self.kind == "emit":
            return f"at emitted event {self.index}"
        return "in outcome" if self.kind == "outcome" else "with an error"


class ActivationReplay(msgspec.Struct, frozen=True, kw_only=True):
    """One activation's replay: identical, or its first divergence."""

    agent: str
    activation_id: UUID
    trigger_id: UUID
    trigger_type: str
    #: Steps the record holds / the replayed handler took.
    steps: int
    replayed_steps: int
    #: The recorded outcome: completed, budget_exceeded or dead_lettered.
    outcome: str
    emitted: int
    divergence: Divergence | None = None
    #: Why the outcome was not compared (a dead letter the handler did not cause).
    note: str = ""

    @property
    def identical(self) -> bool:
        return self.divergence is None


class RunReplay(msgspec.Struct, frozen=True, kw_only=True):
    """A run's replay: each of its activations, in the order they committed."""

    run_id: UUID
    activations: list[ActivationReplay]

    @property
    def identical(self) -> bool:
        return all(a.identical for a in self.activations)

    @property
    def divergent(self) -> list[ActivationReplay]:
        return [a for a in self.activations if not a.identical]


# -- running without calling anything ----------------------------------------------


class ReplayDiverged(StepDivergence):
    """Raised into the handler where a replay stops: a step the record does not match."""


class ReplaySteps(Steps):
    """Steps answered only from the record; anything else is a divergence, never a call.

    The first divergence is kept in ``divergence`` too: a handler that catches the
    exception (``except Exception``) and goes on is still reported at that step.
    """

    def __init__(self, record: RecordedActivation) -> None:
        super().__init__(
            None,
            activation_id=record.activation_id,
            run_id=record.trigger.run_id or record.trigger.event_id,
            agent=record.agent,
            trigger_id=record.trigger.event_id,
            recorded=record.steps,
        )
        self._first_step = record.first_step
        self.divergence: Divergence | None = None

    def run_step(self, n: int) -> int:
        """The run-level number of this activation's step ``n``."""
        return self._first_step + n - 1

    async def run(self, kind: str, name: str, request: Any, call: StepCall) -> StepRecorded:
        n = self.count + 1
        recorded = self.recorded.get(n)
        if recorded is None:
            self.count = n
            self._diverge(Divergence(
                kind="step", step=n, run_step=self._run_step(n), replayed=f"{kind} {name!r}",
                message=f"the handler asked for step {n}: {kind} {name!r} "
                        "which the record does not have",
                diff=_diff(None, request, f"step {n}"),
            ))  # fmt: skip
            raise ReplayDiverged(self.activation_id, n, recorded="nothing",
                                 requested=f"{kind} {name!r}", same_call=False)  # fmt: skip
        if (recorded.kind, recorded.name, recorded.request_hash) != (
            kind, name, request_hash(kind, name, request)
        ):  # fmt: skip
            self.count = n
            was, now = f"{recorded.kind} {recorded.name!r}", f"{kind} {name!r}"
            same = (recorded.kind, recorded.name) == (kind, name)
            what = "with a different request" if same else f"but the handler asked for {now}"
            self._diverge(Divergence(
                kind="step", step=n, run_step=self._run_step(n), recorded=was, replayed=now,
                message=f"the record holds {was} at step {n} {what}",
                diff=_diff(recorded.request, request, f"step {n}"),
            ))  # fmt: skip
            raise ReplayDiverged(self.activation_id, n, recorded=was, requested=now,
                                 same_call=same)  # fmt: skip
        return await super().run(kind, name, request, _never)

    def check_complete(self) -> None:
        extra = sorted(k for k in self.recorded if k > self.count)
        if extra:
            step = self.recorded[extra[0]]
            was = f"{step.kind} {step.name!r}"
            self._diverge(Divergence(
                kind="step", step=step.step, run_step=self._run_step(step.step), recorded=was,
                message=f"the record holds step {step.step}: {was} the handler no longer takes",
                diff=_diff(step.request, None, f"step {step.step}"),
            ))  # fmt: skip
        super().check_complete()

    def _run_step(self, n: int) -> int:
        return self._first_step + n - 1

    def _diverge(self, divergence: Divergence) -> None:
        if self.divergence is None:
            self.divergence = divergence


async def _never() -> Any:
    raise AssertionError("a replay never executes a step")  # ReplaySteps answers or diverges


class ReplayRefused(RuntimeError):
    """Something tried to reach the world during a replay (a bug: nothing ever should)."""


class _RefuseTransport(httpx2.AsyncBaseTransport):
    """The model client's transport: every request is refused, and counted."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.requests += 1
        raise ReplayRefused(f"a replay made a model request: {request.method} {request.url}")


class _ForkedLLM(LLM):
    """The model layer of a forked run's replay: from the fork step on, requests carry the
    fork's recorded change (``run.forked``: model, prompt), as they did when it ran, so a
    fork replays identical under the code that made it."""

    def __init__(self, base: LLM, at: int, change: Change) -> None:
        super().__init__(base.client, base.settings, offline=base.offline)
        self.at = at
        self.change = change

    async def step(self, ctx: Any, request: Any) -> StepRecorded:
        steps = ctx.steps
        if isinstance(steps, ReplaySteps) and steps.run_step(steps.next_step) >= self.at:
            request = self.change.rewrite(request)
        return await super().step(ctx, request)


def _fork_change(record: RunRecord) -> tuple[int, Change] | None:
    """The recorded change of a forked run (None for any other run)."""
    for e in record.events:
        b = e.body
        if isinstance(b, RunForked) and (b.model is not None or b.prompt is not None):
            return b.at_step, Change(model=b.model, tier=b.tier, prompt=b.prompt)
    return None


class ReplayServices:
    """What a replayed context borrows: a real :class:`LLM` whose client refuses every
    request, and breakers and transitions that raise (nothing executes, so neither is
    ever needed)."""

    def __init__(self, settings: Settings, *, offline: bool) -> None:
        self.transport = _RefuseTransport()
        self._http = httpx2.AsyncClient(transport=self.transport)
        client = anthropic.AsyncAnthropic(
            api_key="replay", base_url="http://replay.invalid", max_retries=0,
            http_client=self._http,
        )  # fmt: skip
        self._llm = LLM(client, settings, offline=offline)

    @property
    def llm(self) -> LLM:
        return self._llm

    def breaker(self, name: str) -> CircuitBreaker:
        raise ReplayRefused(f"a replay asked for the circuit breaker of tool {name!r}")

    async def record_transition(self, transition: Transition, *, run_id: UUID | None) -> None:
        raise ReplayRefused(f"a replay tried to record a transition of {transition.name!r}")

    async def aclose(self) -> None:
        await self._http.aclose()


# -- comparing ----------------------------------------------------------------------


def _pretty(value: Any) -> list[str]:
    data = msgspec.json.format(_canonical.encode(msgspec.to_builtins(value)), indent=2)
    return data.decode().splitlines()


def _diff(recorded: Any, replayed: Any, what: str) -> str:
    """A unified diff of two values as pretty-printed canonical JSON (None: nothing)."""
    a = [] if recorded is None else _pretty(recorded)
    b = [] if replayed is None else _pretty(replayed)
    lines = difflib.unified_diff(a, b, f"recorded {what}", f"replayed {what}", lineterm="")
    return "\n".join(lines)


def _body(body: Event) -> tuple[str, bytes]:
    return event_type_of(body), _canonical.encode(body)


def compare_emitted(recorded: Sequence[Event], replayed: Sequence[Event]) -> Divergence | None:
    """The first emitted event that differs (type and canonical body), or is extra / missing."""
    for i in range(max(len(recorded), len(replayed))):
        was = recorded[i] if i < len(recorded) else None
        now = replayed[i] if i < len(replayed) else None
        if was is not None and now is not None and _body(was) == _body(now):
            continue
        diff = _diff(was, now, f"event {i}")
        if now is None:
            assert was is not None
            t = event_type_of(was)
            message = f"the record holds emitted event {i}: {t}, which the replay did not emit"
            return Divergence(kind="emit", index=i, recorded=t, message=message, diff=diff)
        t_now = event_type_of(now)
        if was is None:
            message = f"the replay emitted an extra event {i}: {t_now}"
            return Divergence(kind="emit", index=i, replayed=t_now, message=message, diff=diff)
        t_was = event_type_of(was)
        what = "with a different body" if t_was == t_now else f"but the replay emitted {t_now}"
        message = f"the record holds emitted event {i}: {t_was} {what}"
        return Divergence(
            kind="emit", index=i, recorded=t_was, replayed=t_now, message=message, diff=diff
        )
    return None


def _raised(exc: BaseException) -> Divergence:
    last = traceback.format_exception_only(exc)[-1].strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return Divergence(kind="error", replayed=type(exc).__name__, diff=where,
                      message=f"the handler raised {last}")  # fmt: skip


# -- the replay ---------------------------------------------------------------------


def _trigger(event: RecordedEvent, run_id: UUID) -> Trigger:
    """The trigger as the worker built it; the Redis stream and entry are gone, so the
    log's stream stands in for them."""
    return Trigger(
        event_id=event.event_id,
        type=event.event_type,
        run_id=event.run_id or run_id,
        causation_id=event.causation_id,
        producer=event.producer,
        body=event.body,
        stream=event.stream_id,
        entry_id="",
    )


def _spend(record: RunRecord, a: RecordedActivation) -> Callable[[], Awaitable[tuple[int, float]]]:
    """What the worker's budget check read (``LogQueries.run_spend``): the usage of the
    run's steps outside this activation, recorded before it committed. Computed only
    when a budget check asks (only for a step the record does not have)."""

    async def spend() -> tuple[int, float]:
        own, end = activation_stream(a.activation_id), a.end.log_position
        tokens, usd = 0, 0.0
        for e in record.events:
            if (
                isinstance(e.body, StepRecorded)
                and e.body.usage is not None
                and e.stream_id != own
                and e.log_position < end
            ):
                tokens += e.body.usage.tokens
                usd += e.body.usage.cost_usd
        return tokens, usd

    return spend


def _offline(record: RunRecord, settings: Settings) -> bool:
    """Whether the run was made with the offline model (its budget checks priced nothing)."""
    for e in record.events:
        if isinstance(e.body, StepRecorded):
            # A response-cache hit has no usage; the call it repeats (saved) tells.
            usage = e.body.usage or e.body.saved
            if usage is not None:
                return usage.offline
    return not settings.anthropic_api_key


async def _state(
    record: RunRecord, a: RecordedActivation, agent: Agent, snapshots: SnapshotStore | None
) -> tuple[Any, list[RecordedEvent]]:
    """What ``ctx.state`` starts from and the events folded on top, as the worker has
    it: the run's events before the trigger, from the nearest snapshot when there is one
    (a cache of the same fold: the answer is the same, only cheaper)."""
    if not agent.folds_state:
        return FROM_START, []
    history = record.history_before(a.trigger)
    if snapshots is None or not history:
        return FROM_START, history
    found = await snapshots.load(
        record.run_id, agent.name, agent.fold_version, agent.state_decode_type(),
        before=a.trigger.log_position,
    )  # fmt: skip
    if found is None:
        return FROM_START, history
    state, at = found
    return state, [e for e in history if e.log_position > at]


async def replay_activation(
    record: RunRecord,
    a: RecordedActivation,
    agent: Agent,
    services: ReplayServices,
    snapshots: SnapshotStore | None = None,
) -> ActivationReplay:
    """Run one recorded activation again and compare it with the record."""
    steps = ReplaySteps(a)
    state, history = await _state(record, a, agent, snapshots)
    error: BaseException | None = None
    outcome = "completed"
    emitted: list[NewEvent] = []
    try:
        async with asyncio.timeout(agent.timeout or _DEFAULT_TIMEOUT):
            result = await activate(
                agent,
                _trigger(a.trigger, record.run_id),
                activation_id=a.activation_id,
                steps=steps,
                services=services,
                history=history,
                spent=_spend(record, a),
                state=state,
            )
        outcome, emitted = result.outcome, result.emitted
    except Exception as exc:  # the handler's own failure: compared with the record below
        error, outcome = exc, "dead_lettered"
    note = _circumstantial(a)
    if note:
        # The record's ending was not the handler's verdict: only its steps compare.
        divergence = steps.divergence
    else:
        divergence = steps.divergence or _outcome(a, outcome, error)
        if divergence is None and error is None:
            divergence = compare_emitted([e.body for e in a.emitted], [e.body for e in emitted])
    return ActivationReplay(
        agent=a.agent,
        activation_id=a.activation_id,
        trigger_id=a.trigger.event_id,
        trigger_type=a.trigger.event_type,
        steps=a.step_count,
        replayed_steps=steps.count,
        outcome=a.outcome,
        emitted=len(a.emitted),
        divergence=divergence,
        note=note,
    )


def _circumstantial(a: RecordedActivation) -> str:
    """Why a dead letter says nothing about the handler, or "" when it does.

    A handler that ran past its timeout, or whose workers died under it until
    its deliveries ran out, was dead-lettered by circumstance: a replay, which
    calls nothing, cannot reproduce either, so only its steps are compared.
    """
    dead = a.dead_lettered
    if dead is None:
        return ""
    if dead.error_type == "HandlerTimeout":
        return f"dead-lettered by its timeout ({dead.error}): only its steps are compared"
    if dead.error_type == "RuntimeError" and "without completing" in dead.error:
        return f"dead-lettered after its workers died ({dead.error}): only its steps are compared"
    return ""


def _outcome(a: RecordedActivation, outcome: str, error: BaseException | None) -> Divergence | None:
    """The record's ending against the replay's: a dead letter must raise again (the
    recorded error type), a completion must not raise, and the outcomes must agree."""
    dead = a.dead_lettered
    if dead is not None:
        if error is not None and type(error).__name__ == dead.error_type:
            return None
        now = f"raised {type(error).__name__}" if error is not None else outcome
        return Divergence(
            kind="outcome", recorded=f"dead_lettered ({dead.error_type})",
            replayed="dead_lettered" if error is not None else outcome,
            message=f"the record dead-lettered this activation ({dead.error_type}: "
                    f"{dead.error}) but the handler {now}",
            diff="" if error is None else _raised(error).diff,
        )  # fmt: skip
    if error is not None:
        return _raised(error)
    if outcome != a.outcome:
        return Divergence(kind="outcome", recorded=a.outcome, replayed=outcome,
                          message=f"the record says {a.outcome}, the replay {outcome}")  # fmt: skip
    return None


def check_agents(record: RunRecord, agents: Sequence[Agent], app: str) -> dict[str, Agent]:
    """The run's agents by name; :class:`AgentMissing` for one the app does not define."""
    by_name = {agent.name: agent for agent in agents}
    for a in record.activations:
        if a.agent not in by_name:
            raise AgentMissing(
                f"run {record.run_id} needs agent {a.agent!r}, which {app} does not define "
                f"(it defines {', '.join(sorted(by_name)) or 'none'})"
            )
    return by_name


async def replay_record(
    record: RunRecord,
    agents: Sequence[Agent],
    *,
    settings: Settings | None = None,
    app: str = "the loaded app",
    snapshots: SnapshotStore | None = None,
) -> RunReplay:
    """Replay a loaded run (:func:`replay_run` without the read); ``snapshots``: where
    folding agents' ``ctx.state`` may start (None: folded from the run's start)."""
    by_name = check_agents(record, agents, app)
    settings = settings or Settings.from_env()
    services = ReplayServices(settings, offline=_offline(record, settings))
    forked = _fork_change(record)
    if forked is not None:
        services._llm = _ForkedLLM(services._llm, *forked)
    try:
        reports = [
            await replay_activation(record, a, by_name[a.agent], services, snapshots)
            for a in record.activations
        ]
    finally:
        await services.aclose()
    if services.transport.requests:  # never: every step is answered or diverges first
        raise ReplayRefused(f"replay of run {record.run_id} made model requests")
    return RunReplay(run_id=record.run_id, activations=reports)


async def replay_run(
    log: EventLog,
    agents: Sequence[Agent],
    run_id: UUID,
    *,
    settings: Settings | None = None,
    app: str = "the loaded app",
    snapshots: bool = True,
) -> RunReplay:
    """Re-run every activation of ``run_id`` with ``agents``' current code; compare.

    Raises :class:`~projections.errors.UnknownRun` for a run the log does not
    hold and :class:`~projections.errors.AgentMissing` for an agent of the run
    that ``agents`` lacks (``app`` names them in the message). ``settings``
    gives the model tiers and default budgets (the environment's by default).
    With ``snapshots``, a folding agent's ``ctx.state`` starts from the nearest
    snapshot before its trigger, as the worker's did.
    """
    record = await load_run(log, run_id)
    store = SnapshotStore(log.pool, log.schema) if snapshots else None
    return await replay_record(record, agents, settings=settings, app=app, snapshots=store)
