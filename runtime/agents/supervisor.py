"""Supervisor-worker: plan a request into typed subtasks, assign them, gather, give up, synthesise.

A :class:`Supervisor` handles a request event in four moves, each an
activation of its own, so a crash anywhere repeats nothing (steps are
recorded) and loses nothing (events commit with the inbox marker):

1. **plan**: ``plan()`` (by default a model call with structured output,
   ``ctx.llm(..., output=Plan)``) splits the request into :class:`Subtask`\\ s:
   worker, description, priority, timeout;
2. **assign**: one ``task.assigned`` per subtask, which the relay delivers to
   the named :class:`Specialist` only, and one durable timer per subtask
   (``ctx.sleep_until``: a ``timer.scheduled`` in the log, kept by the relay in
   Redis, so it fires even if every worker restarts meanwhile);
3. **gather**: each ``task.completed`` / ``task.failed`` / timeout
   ``timer.fired`` comes back to the supervisor; its run state (``evolve``
   over the run's events) says which subtasks are still outstanding. The first
   outcome of a subtask in log order stands: a result arriving after its
   timeout, or a timer firing after its result, changes nothing;
4. **synthesise**: the activation whose event settles the last outstanding
   subtask calls ``synthesise()`` and emits ``supervision.finished`` with every
   subtask's outcome: completed, failed and timed out are reported, not hidden.

Which activation synthesises is decided by the log alone (the state before its
trigger had an open subtask, the state after has none), so exactly one does,
however many workers race.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, Any, ClassVar

import asyncpg
import msgspec
from redis.exceptions import RedisError

from runtime.agents.agent import Agent, _tag
from runtime.errors import ClaimLost, OutputInvalid, StepDivergence, StepFailed
from runtime.events.builtin import (
    SupervisionFinished,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    TaskOutcome,
    TimerFired,
    TimerScheduled,
)
from runtime.events.model import Event, RecordedEvent

__all__ = ["TIMEOUT_TIMER", "Plan", "Specialist", "Subtask", "Supervision", "Supervisor"]

#: The name of the durable timer that gives a subtask up.
TIMEOUT_TIMER = "task.timeout"

#: Errors of the servers, not of the subtask: they propagate, so the activation is
#: retried (its recorded steps reused) instead of reporting the subtask failed.
_TRANSIENT = (OSError, RedisError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
              ClaimLost, StepDivergence)  # fmt: skip


class Subtask(msgspec.Struct, kw_only=True):
    """One piece of a plan: who does it, what it is, how urgent, how long to wait for it."""

    #: The name of a specialist agent among the supervisor's ``workers``.
    worker: str
    description: Annotated[str, msgspec.Meta(min_length=1)]
    #: 1 is the most urgent; subtasks are assigned (and reported) in this order.
    priority: Annotated[int, msgspec.Meta(ge=1, le=5)]
    #: Seconds to wait for the result before the subtask is given up (timed out).
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)]


class Plan(msgspec.Struct, kw_only=True):
    """The structured output asked of the model: the request split into subtasks.

    Subclass it to bound the plan differently (``subtasks`` with another
    ``min_length`` / ``max_length``) and set ``Supervisor.plan_type``.
    """

    subtasks: Annotated[list[Subtask], msgspec.Meta(min_length=1, max_length=16)]


class Supervision(msgspec.Struct, kw_only=True):
    """A supervisor's run state: the request and each subtask's outcome so far."""

    request: str | None = None
    tasks: dict[str, TaskOutcome] = msgspec.field(default_factory=dict)
    finished: bool = False

    @property
    def started(self) -> bool:
        return self.request is not None

    @property
    def outstanding(self) -> list[TaskOutcome]:
        return [t for t in self.tasks.values() if t.status == "pending"]

    @property
    def outcomes(self) -> list[TaskOutcome]:
        """Every subtask, most urgent first (then in the plan's order)."""
        return sorted(self.tasks.values(), key=lambda t: t.priority)


class Supervisor(Agent):
    """Plans a request into subtasks for its ``workers``, gathers them, synthesises.

    ::

        class Support(Supervisor):
            name = "support"
            subscribes = (EmailReceived,)
            workers = (Researcher, Writer)

            def request(self, event: EmailReceived) -> str:
                return event.text

            async def synthesise(self, supervision: Supervision, ctx: Context) -> Any:
                done = [t.result for t in supervision.outcomes if t.status == "completed"]
                return (await ctx.llm(f"Combine: {done}")).text

    ``subscribes`` lists the request events; the supervisor also subscribes to
    ``task.completed``, ``task.failed`` and ``timer.fired`` (its own timeouts).
    Override :meth:`plan` to plan without a model, :meth:`synthesise` to
    combine the results. Do not override ``handle``.
    """

    #: The specialists this supervisor may assign to (classes or names).
    workers: ClassVar[Sequence[type[Agent] | str]] = ()
    #: The structured output the default :meth:`plan` asks the model for.
    plan_type: ClassVar[type[Plan]] = Plan
    state_type: ClassVar[Any] = Supervision

    def initial_state(self) -> Supervision:
        return Supervision()

    def subscribed_types(self) -> frozenset[str]:
        own = (TaskCompleted, TaskFailed, TimerFired)
        return frozenset(_tag(t) for t in (*self.subscribes, *own))

    def worker_names(self) -> list[str]:
        return [w if isinstance(w, str) else w.name for w in self.workers]

    # -- hooks ----------------------------------------------------------------

    def request(self, event: Event) -> str:
        """The request's text, from the event that starts it (default: the body as JSON)."""
        return msgspec.json.encode(event).decode()

    def plan_system(self) -> str:
        """The system prompt of the default :meth:`plan`."""
        names = ", ".join(self.worker_names())
        lines = [self.system] if self.system else []
        lines.append(
            f"Split the request into subtasks. Each names one worker (one of: {names}), "
            "says what to do, its priority (1 most urgent to 5) and how many seconds "
            "to wait for it."
        )
        return "\n".join(lines)

    async def plan(self, request: str, ctx: Any) -> Plan:
        """The subtasks for ``request`` (default: the model's structured answer)."""
        answer = await ctx.llm(request, output=self.plan_type, system=self.plan_system())
        plan: Plan = answer.output
        return plan

    async def synthesise(self, supervision: Supervision, ctx: Any) -> Any:
        """What the outcomes add up to (default: a model's summary of the results, with the
        subtasks that failed or timed out named as such)."""
        outcomes = supervision.outcomes
        counts = ", ".join(
            f"{sum(t.status == s for t in outcomes)} {s.replace('_', ' ')}"
            for s in ("completed", "failed", "timed_out")
        )
        lines = [f"Summarise the results of {len(outcomes)} subtasks ({counts}), saying "
                 "what is missing."]  # fmt: skip
        for t in outcomes:
            if t.status == "completed":
                lines.append(f"- {t.worker} ({t.description}): {t.result}")
            else:
                lines.append(f"- {t.worker} ({t.description}): {t.status} ({t.error})")
        lines.append(f"The request was: {supervision.request}")
        answer = await ctx.llm("\n".join(lines))
        return answer.text

    # -- the fold -------------------------------------------------------------

    def evolve(self, state: Supervision, event: RecordedEvent) -> Supervision:
        return self.apply(state, event.body)

    def apply(self, state: Supervision, body: Event) -> Supervision:
        """``state`` after ``body`` (pure: the state given is not changed)."""
        match body:
            case TaskAssigned(supervisor=who) if who == self.name:
                if state.request is None:
                    state = msgspec.structs.replace(state, request=body.request)
                outcome = TaskOutcome(task_id=body.task_id, worker=body.worker,
                                      description=body.description, priority=body.priority,
                                      timeout=body.timeout)  # fmt: skip
                return _with(state, outcome)
            case TaskCompleted(supervisor=who) if who == self.name:
                return _settle(state, body.task_id, "completed", result=body.result)
            case TaskFailed(supervisor=who) if who == self.name:
                return _settle(state, body.task_id, "failed", error=body.error)
            case TimerScheduled(agent=who, name=name) if who == self.name and name == TIMEOUT_TIMER:
                payload = body.payload if isinstance(body.payload, dict) else {}
                current = state.tasks.get(str(payload.get("task_id")))
                if current is None:
                    return state
                return _with(state, msgspec.structs.replace(current, timer_id=body.timer_id))
            case TimerFired(agent=who, name=name) if who == self.name and name == TIMEOUT_TIMER:
                payload = body.payload if isinstance(body.payload, dict) else {}
                task_id = uuid.UUID(str(payload.get("task_id")))
                waited = payload.get("timeout")
                within = f"{waited:g} s" if isinstance(waited, int | float) else "its timeout"
                return _settle(state, task_id, "timed_out", error=f"no result within {within}")
            case SupervisionFinished(supervisor=who) if who == self.name:
                return msgspec.structs.replace(state, finished=True)
        return state

    # -- the handler ----------------------------------------------------------

    async def handle(self, event: Any, ctx: Any) -> None:
        before: Supervision = ctx.state
        if isinstance(event, TaskCompleted | TaskFailed | TimerFired):
            after = self.apply(before, event)
            if before.outstanding and not after.outstanding and not after.finished:
                await self._finish(after, ctx)
            return
        if before.started:
            ctx.log.warning("supervisor.already_started", supervisor=self.name)
            return
        await self._start(event, ctx)

    async def _start(self, event: Event, ctx: Any) -> None:
        request = self.request(event)
        try:
            plan = await self.plan(request, ctx)
        except (OutputInvalid, StepFailed) as exc:
            # No plan, no subtasks: the request ends here, and says why.
            ctx.log.warning("supervisor.plan_failed", error=str(exc))
            ctx.emit(SupervisionFinished(supervisor=self.name, request=request, outcomes=[],
                                         error=f"no plan: {exc}"))  # fmt: skip
            return
        known = set(self.worker_names())
        now = await ctx.now()  # a step: a retry or replay sets the same deadlines
        state = Supervision(request=request)
        ordered = sorted(enumerate(plan.subtasks), key=lambda p: (p[1].priority, p[0]))
        unknown: list[TaskFailed] = []
        for i, sub in ordered:
            task_id = uuid.uuid5(ctx.activation_id, f"task/{i}")
            assigned = TaskAssigned(task_id=task_id, supervisor=self.name, worker=sub.worker,
                                    description=sub.description, priority=sub.priority,
                                    timeout=sub.timeout, request=request)  # fmt: skip
            ctx.emit(assigned)
            state = self.apply(state, assigned)
            if sub.worker not in known:
                # The model named a worker there is none of: a failure of this
                # subtask, reported like any other (it comes back as an event).
                error = f"no worker named {sub.worker!r} (workers: {', '.join(sorted(known))})"
                unknown.append(TaskFailed(task_id=task_id, supervisor=self.name,
                                          worker=sub.worker, error=error,
                                          error_type="UnknownWorker"))  # fmt: skip
                continue
            payload = {"task_id": str(task_id), "timeout": sub.timeout}
            timer = ctx.sleep_until(now + timedelta(seconds=sub.timeout), TIMEOUT_TIMER,
                                    payload=payload)  # fmt: skip
            state = _with(state, msgspec.structs.replace(state.tasks[str(task_id)],
                                                         timer_id=timer))  # fmt: skip
        # After every assignment: each failure's activation then folds a state that holds
        # all the subtasks, so only the last failure's can find none outstanding (two
        # failures among the assignments would each have closed the plan, twice).
        for failed in unknown:
            ctx.emit(failed)
        if not state.outstanding:
            await self._finish(state, ctx)

    async def _finish(self, state: Supervision, ctx: Any) -> None:
        result = await self.synthesise(state, ctx)
        outcomes = state.outcomes
        for t in outcomes:
            if t.timer_id is not None and t.status != "timed_out":
                # Settled before its timeout: the timer is moot (and the run would
                # wait for it).
                ctx.cancel_timer(t.timer_id)
        ctx.emit(
            SupervisionFinished(
                supervisor=self.name,
                request=state.request or "",
                outcomes=outcomes,
                result=msgspec.to_builtins(result, str_keys=True),
                completed=sum(t.status == "completed" for t in outcomes),
                failed=sum(t.status == "failed" for t in outcomes),
                timed_out=sum(t.status == "timed_out" for t in outcomes),
            )
        )


def _with(state: Supervision, outcome: TaskOutcome) -> Supervision:
    return msgspec.structs.replace(state, tasks={**state.tasks, str(outcome.task_id): outcome})


def _settle(state: Supervision, task_id: uuid.UUID, status: str, **fields: Any) -> Supervision:
    """The subtask's outcome, if it is still pending (the first outcome stands)."""
    current = state.tasks.get(str(task_id))
    if current is None or current.status != "pending":
        return state
    return _with(state, msgspec.structs.replace(current, status=status, **fields))


class Specialist(Agent):
    """A worker agent of a :class:`Supervisor`: does the subtasks addressed to it.

    Give it its own ``system`` prompt and ``tools``; override :meth:`perform`
    (default: one ``ctx.llm`` call on the description, tools included). Its
    return value is the ``task.completed`` result (anything msgspec encodes);
    an exception raised by the work is the ``task.failed`` (a server error is
    not: the activation is retried, its recorded steps reused).
    """

    subscribes: ClassVar[Sequence[type[Event] | str]] = (TaskAssigned,)
    #: Tasks come on its own stream, not from the webhooks.
    reads_ingress: ClassVar[bool] = False

    async def perform(self, task: TaskAssigned, ctx: Any) -> Any:
        """Do the subtask; its result."""
        return (await ctx.llm(task.description)).text

    async def handle(self, event: Any, ctx: Any) -> None:
        if not isinstance(event, TaskAssigned) or event.worker != self.name:
            return  # not ours (the relay delivers tasks to their worker only)
        try:
            result = await self.perform(event, ctx)
        except _TRANSIENT:
            raise
        except Exception as exc:  # the subtask's failure is its outcome, reported
            ctx.log.warning("task.failed", task_id=str(event.task_id), error=str(exc))
            ctx.emit(TaskFailed(task_id=event.task_id, supervisor=event.supervisor,
                                worker=self.name, error=str(exc) or type(exc).__name__,
                                error_type=type(exc).__name__))  # fmt: skip
            return
        ctx.emit(TaskCompleted(task_id=event.task_id, supervisor=event.supervisor,
                               worker=self.name,
                               result=msgspec.to_builtins(result, str_keys=True)))  # fmt: skip
