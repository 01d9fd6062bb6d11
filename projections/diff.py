"""Where two runs differ: their steps, outputs and emitted events, and what each cost.

Activations are aligned by agent and ordinal (the k-th activation of an agent in
one run against the k-th of the same agent in the other, in commit order), then
their steps by number. A step is the same when it asked for the same thing
(request hash) and got the same answer (result and error, as canonical JSON); a
difference comes with a compact unified diff (of the model's answer text for a
model step, of the canonical JSON otherwise). Emitted events compare by type and
body (their ids always differ between runs). Nothing is written.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import msgspec

from projections.record import RecordedActivation, RunRecord, load_run
from runtime.events.builtin import StepRecorded
from runtime.events.model import RecordedEvent, UnknownEvent
from runtime.log.store import EventLog

_pretty = msgspec.json.Encoder(order="sorted")

#: Lines of a unified diff kept per difference, and characters per line.
MAX_DIFF_LINES = 24
MAX_LINE = 160


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    """What a run took: steps, model and tool calls, tokens, dollars and wall time."""

    steps: int
    model_calls: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    #: From its first event to its last (ms).
    duration_ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class StepDiff:
    """One step number of an aligned pair of activations where the runs differ."""

    #: The step's number within the activation.
    step: int
    #: Its run-level numbers in run A and run B (None where that run has no such step).
    run_step_a: int | None
    run_step_b: int | None
    #: ``"kind name"`` of each side (None where absent).
    call_a: str | None
    call_b: str | None
    same_request: bool
    same_result: bool
    #: A compact unified diff of what differs (the request when it differs, else the result).
    diff: list[str]
    cost_a: float
    cost_b: float


@dataclasses.dataclass(frozen=True, slots=True)
class ActivationDiff:
    """An aligned pair of activations (or one present in a single run) and where they differ."""

    agent: str
    #: Its ordinal among the agent's activations (0-based).
    ordinal: int
    activation_a: UUID | None
    activation_b: UUID | None
    trigger_type_a: str | None
    trigger_type_b: str | None
    outcome_a: str | None
    outcome_b: str | None
    steps: list[StepDiff]
    #: Differences among emitted events: ``index: type (A) != type (B)`` and a body diff.
    emitted: list[str]

    @property
    def only_in(self) -> str | None:
        if self.activation_a is None:
            return "b"
        if self.activation_b is None:
            return "a"
        return None

    @property
    def same(self) -> bool:
        return (
            self.only_in is None
            and not self.steps
            and not self.emitted
            and self.outcome_a == self.outcome_b
            and self.trigger_type_a == self.trigger_type_b
        )


@dataclasses.dataclass(frozen=True, slots=True)
class RunDiff:
    """What ``agentrt diff`` prints."""

    run_a: UUID
    run_b: UUID
    activations: list[ActivationDiff]
    totals_a: Totals
    totals_b: Totals

    @property
    def identical(self) -> bool:
        return all(a.same for a in self.activations)

    @property
    def first_difference(self) -> str | None:
        """The first place the runs part, in run A's order (a step, an event, an outcome)."""
        for a in self.activations:
            if a.same:
                continue
            if a.only_in is not None:
                return f"activation {a.ordinal + 1} of {a.agent} is only in run {a.only_in.upper()}"
            if a.trigger_type_a != a.trigger_type_b:
                return (
                    f"activation {a.ordinal + 1} of {a.agent}: triggered by "
                    f"{a.trigger_type_a} in A, {a.trigger_type_b} in B"
                )
            if a.steps:
                s = a.steps[0]
                what = "request" if not s.same_request else "result"
                where = s.run_step_a if s.run_step_a is not None else s.run_step_b
                return f"step {where} ({a.agent}, its step {s.step}): the {what} differs"
            if a.emitted:
                return f"{a.agent}: emitted events differ ({a.emitted[0]})"
            return f"{a.agent}: outcome {a.outcome_a} in A, {a.outcome_b} in B"
        return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(dataclasses.asdict(self))
        data["identical"] = self.identical
        data["first_difference"] = self.first_difference
        for entry, a in zip(data["activations"], self.activations, strict=True):
            entry["only_in"] = a.only_in
            entry["same"] = a.same
        return data


# -- comparing -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready: a body of a type this process does not know comes as its raw JSON."""
    if isinstance(value, UnknownEvent):
        return msgspec.json.decode(value.data)
    return msgspec.to_builtins(value)


def _canonical(value: Any) -> bytes:
    return _pretty.encode(_plain(value))


def _lines(value: Any) -> list[str]:
    """A value as lines to diff: text as is, anything else as indented canonical JSON."""
    if isinstance(value, str):
        return value.splitlines() or [""]
    text = msgspec.json.format(_canonical(value).decode(), indent=2)
    return text.splitlines()


def _answer(step: StepRecorded) -> Any:
    """What a step got back, in its most readable form: a model's answer text (and tool
    calls), a tool's result, or its error."""
    if step.error is not None:
        return {"error": msgspec.to_builtins(step.error)}
    result = step.result
    if step.kind == "llm" and isinstance(result, dict) and isinstance(result.get("content"), list):
        parts = []
        for block in result["content"]:
            if block.get("type") == "text":
                parts.append(block.get("text", ""))
            elif block.get("type") == "tool_use":
                parts.append(
                    f"[tool_use {block.get('name')} {_pretty.encode(block.get('input')).decode()}]"
                )
        return "\n".join(parts)
    return result


def unified(a: Any, b: Any, label_a: str = "A", label_b: str = "B") -> list[str]:
    """A compact unified diff of two values, truncated to :data:`MAX_DIFF_LINES` lines."""
    lines = list(difflib.unified_diff(_lines(a), _lines(b), label_a, label_b, lineterm="", n=1))
    lines = [ln if len(ln) <= MAX_LINE else ln[: MAX_LINE - 1] + "…" for ln in lines]
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"… {len(lines) - MAX_DIFF_LINES} more lines"]
    return lines


def _outcome(step: StepRecorded) -> bytes:
    """What a step's answer is, for comparing: a model's content and stop reason (not its
    message id or token counts, which differ between two identical answers), a tool's
    result, or the error."""
    result = step.result
    if step.kind == "llm" and isinstance(result, dict):
        result = {"content": result.get("content"), "stop_reason": result.get("stop_reason")}
    return _canonical([result, step.error])


def _cost(step: StepRecorded | None) -> float:
    return step.usage.cost_usd if step is not None and step.usage is not None else 0.0


def _step_diff(
    n: int, a: RecordedActivation | None, b: RecordedActivation | None
) -> StepDiff | None:
    sa = a.steps.get(n) if a is not None else None
    sb = b.steps.get(n) if b is not None else None
    call_a = f"{sa.kind} {sa.name}" if sa is not None else None
    call_b = f"{sb.kind} {sb.name}" if sb is not None else None
    same_request = (
        sa is not None and sb is not None and (call_a, sa.request_hash) == (call_b, sb.request_hash)
    )
    same_result = sa is not None and sb is not None and _outcome(sa) == _outcome(sb)
    if same_request and same_result:
        return None
    if sa is None or sb is None:
        diff = [f"only run {'A' if sb is None else 'B'} took step {n} ({call_a or call_b})"]
    elif not same_request:
        diff = unified(sa.request, sb.request)
    else:
        diff = unified(_answer(sa), _answer(sb))
    return StepDiff(
        step=n,
        run_step_a=a.first_step + n - 1 if a is not None and sa is not None else None,
        run_step_b=b.first_step + n - 1 if b is not None and sb is not None else None,
        call_a=call_a,
        call_b=call_b,
        same_request=same_request,
        same_result=same_result,
        diff=diff,
        cost_a=_cost(sa),
        cost_b=_cost(sb),
    )


def _emitted_diff(a: list[RecordedEvent], b: list[RecordedEvent]) -> list[str]:
    out: list[str] = []
    for i in range(max(len(a), len(b))):
        ea = a[i] if i < len(a) else None
        eb = b[i] if i < len(b) else None
        if ea is None or eb is None:
            present = ea or eb
            assert present is not None
            out.append(
                f"event {i + 1}: {present.event_type} only in run {'A' if eb is None else 'B'}"
            )
            continue
        if ea.event_type != eb.event_type:
            out.append(f"event {i + 1}: {ea.event_type} in A, {eb.event_type} in B")
        elif _canonical(ea.body) != _canonical(eb.body):
            out.append(f"event {i + 1}: {ea.event_type} bodies differ")
            out.extend(unified(_plain(ea.body), _plain(eb.body)))
    return out


def _aligned(
    a: RunRecord, b: RunRecord
) -> Iterator[tuple[str, int, RecordedActivation | None, RecordedActivation | None]]:
    """(agent, ordinal, activation of A, activation of B): A's order, then B's leftovers."""
    by_agent_b: dict[str, list[RecordedActivation]] = collections.defaultdict(list)
    for act in b.activations:
        by_agent_b[act.agent].append(act)
    ordinal: collections.Counter[str] = collections.Counter()
    for act in a.activations:
        k = ordinal[act.agent]
        ordinal[act.agent] += 1
        mine = by_agent_b.get(act.agent, [])
        yield act.agent, k, act, mine[k] if k < len(mine) else None
    for agent, acts in by_agent_b.items():
        for k in range(ordinal[agent], len(acts)):
            yield agent, k, None, acts[k]


def _activation_diff(
    agent: str, k: int, a: RecordedActivation | None, b: RecordedActivation | None
) -> ActivationDiff:
    numbers = sorted(set(a.steps if a else ()) | set(b.steps if b else ()))
    steps = [d for n in numbers if (d := _step_diff(n, a, b)) is not None] if a and b else []
    emitted = _emitted_diff(a.emitted, b.emitted) if a and b else []
    return ActivationDiff(
        agent=agent,
        ordinal=k,
        activation_a=a.activation_id if a else None,
        activation_b=b.activation_id if b else None,
        trigger_type_a=a.trigger.event_type if a else None,
        trigger_type_b=b.trigger.event_type if b else None,
        outcome_a=a.outcome if a else None,
        outcome_b=b.outcome if b else None,
        steps=steps,
        emitted=emitted,
    )


def totals(record: RunRecord) -> Totals:
    """A run's steps, calls, tokens and cost (from its ``step.recorded``) and wall time."""
    steps = model = tool = tin = tout = 0
    usd = 0.0
    for e in record.events:
        body = e.body
        if not isinstance(body, StepRecorded):
            continue
        steps += 1
        if body.kind == "llm":
            model += 1
        else:
            tool += 1
        if body.usage is not None:
            tin += body.usage.input_tokens
            tout += body.usage.output_tokens
            usd += body.usage.cost_usd
    times = [e.recorded_at for e in record.events]
    span = (max(times) - min(times)).total_seconds() * 1000 if times else 0.0
    return Totals(steps, model, tool, tin, tout, round(usd, 10), round(span, 3))


def diff_records(a: RunRecord, b: RunRecord) -> RunDiff:
    return RunDiff(
        run_a=a.run_id,
        run_b=b.run_id,
        activations=[_activation_diff(*row) for row in _aligned(a, b)],
        totals_a=totals(a),
        totals_b=totals(b),
    )


async def diff_runs(log: EventLog, run_a: UUID, run_b: UUID) -> RunDiff:
    """Compare two runs of the log (:class:`UnknownRun` for either id it lacks)."""
    return diff_records(await load_run(log, run_a), await load_run(log, run_b))
