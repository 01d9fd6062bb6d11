"""The model layer: the Anthropic client, model calls as durable steps, tools, reflection, budgets.

Every model call is one durable step (kind ``llm``, named by the model id,
the request being the JSON body sent to the Messages API), so a retried or
replayed activation gets the recorded answer back and never calls twice. The
SDK's own retries are off (``max_retries=0``): :func:`runtime.retry.run_with_retries`
retries what the SDK would (408, 409, 429, 5xx, connection errors and timeouts, and
whatever the server marks ``x-should-retry: true``; never what it marks ``false``: see
:func:`runtime.effects.retry.classify`), and each failed attempt is
kept in the step's ``attempts``. A final failure (retries exhausted, a 400) is
recorded too, so a retried activation raises it again without calling.

Around the calls, :meth:`LLM.call` runs the tool-use loop (each tool call a
step of its own, invalid tool input sent back as an ``is_error`` result),
validates structured output against a msgspec type and feeds validation
errors back to the model (reflection), checks the run's token and dollar
budget *before* a call is made, and applies a :class:`ContextPolicy` when the
conversation grows past a limit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Generic, Protocol, cast
from uuid import UUID

import anthropic
import asyncpg
import msgspec
import structlog
from opentelemetry import trace
from typing_extensions import TypeVar

from runtime.effects.budget import Budget
from runtime.effects.retry import RetryPolicy, run_with_retries
from runtime.effects.steps import StepCall, StepOutput, Steps, raise_if_failed
from runtime.effects.tools import Tool
from runtime.errors import (
    BudgetExceeded,
    OutputInvalid,
    RetriesExhausted,
    StepFailed,
    ToolInputError,
)
from runtime.events.builtin import RunBudgetExceeded, StepRecorded
from runtime.events.values import AttemptRecord, StepError, StepRef, Usage
from runtime.llm.cache import Cache, CacheIndex, Hit, Probe
from runtime.llm.client import model_for
from runtime.llm.prices import cost_usd, usage_of
from runtime.llm.tokens import estimate_request_tokens, message_tokens
from runtime.ops import metrics
from runtime.settings import Settings

__all__ = [
    "LLM",
    "ContextPolicy",
    "KeepRecent",
    "LLMResult",
    "Summarize",
    "output_schema",
]

log = structlog.get_logger(__name__)

JSON = dict[str, Any]
T = TypeVar("T", default=Any)

_encoder = msgspec.json.Encoder()


# -- what a call needs from its caller ---------------------------------------------


class AgentProfile(Protocol):
    """The calling agent's defaults: an :class:`runtime.Agent` is one."""

    @property
    def name(self) -> str: ...
    @property
    def system(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def tools(self) -> Sequence[Tool[..., Any]]: ...
    @property
    def budget(self) -> Budget | None: ...


class Caller(Protocol):
    """What a model call needs from the activation making it: a handler's ``ctx`` is one.

    The model layer sits below the agent API: it knows the steps and the
    budget of the caller, not the caller's class.
    """

    @property
    def agent(self) -> AgentProfile: ...
    @property
    def steps(self) -> Steps: ...
    @property
    def activation_id(self) -> UUID: ...
    async def run_spend(self) -> tuple[int, float]: ...
    async def tool_step(
        self, t: Tool[..., Any], request: Any, *, wait_for_circuit: float | None = None
    ) -> Any: ...


def output_schema(t: Any) -> JSON:
    """The JSON schema asked of the model for type ``t``, objects closed as the API requires."""

    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: close(v) for k, v in node.items()}
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
        elif isinstance(node, list):
            node = [close(v) for v in node]
        return node

    return cast(JSON, close(msgspec.json.schema(t)))


# -- results -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LLMResult(Generic[T]):
    """What :meth:`LLM.call` returns: the final answer and what it took to get it."""

    #: The text blocks of the final message, joined (offline text keeps its ``[offline]`` label).
    text: str
    #: The decoded structured output (``output=``), else None.
    output: T | None
    #: The final Messages API response, as JSON.
    message: JSON
    #: Totals over every model step of this call (``model`` is the final one's).
    usage: Usage
    #: The step numbers this call took (model and tool steps).
    steps: tuple[int, ...]
    stop_reason: str | None
    offline: bool
    #: The conversation, ending with the final assistant message (to continue it).
    messages: list[JSON]
    #: The model steps the agent's response cache answered (their ``usage`` is not in
    #: ``usage``: they cost nothing; the step's ``saved`` says what they would have).
    cached: tuple[int, ...] = ()


def _text(message: Mapping[str, Any]) -> str:
    return "".join(b.get("text", "") for b in message.get("content", []) if b["type"] == "text")


def _echo(message: Mapping[str, Any]) -> JSON:
    """The response as the next request's assistant turn (blocks without null fields)."""
    blocks = [{k: v for k, v in b.items() if v is not None} for b in message["content"]]
    return {"role": "assistant", "content": blocks}


def _json_text(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text


# -- context policies ----------------------------------------------------------------


class ContextPolicy(Protocol):
    """Shortens a conversation before a model call; the result must still be a valid request."""

    async def apply(self, messages: list[JSON], *, llm: LLM, ctx: Caller) -> list[JSON]: ...


def _cuts(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Where a kept tail may start: an assistant turn after the first answer.

    ``[first user message] + messages[cut:]`` still alternates user/assistant,
    and every ``tool_result`` in the tail answers a ``tool_use`` in the tail.
    """
    return [i for i in range(2, len(messages)) if messages[i].get("role") == "assistant"]


@dataclasses.dataclass(frozen=True, slots=True)
class KeepRecent:
    """Drop the oldest turns (the first user message stays) until the history fits."""

    max_tokens: int

    async def apply(self, messages: list[JSON], *, llm: LLM, ctx: Caller) -> list[JSON]:
        if message_tokens(messages) <= self.max_tokens:
            return messages
        cuts = _cuts(messages)
        if not cuts:
            return messages
        chosen = next(
            (c for c in cuts if message_tokens([messages[0], *messages[c:]]) <= self.max_tokens),
            cuts[-1],
        )
        log.info("llm.context_pruned", dropped=chosen - 1, kept=len(messages) - chosen + 1)
        return [messages[0], *messages[chosen:]]


SUMMARY_SYSTEM = (
    "Summarize the conversation below for the assistant that continues it: the user's goal, "
    "facts learned (tool results included), decisions made and what is still open. "
    "Be brief and factual."
)
SUMMARY_LABEL = "Summary of the earlier conversation: "


@dataclasses.dataclass(frozen=True, slots=True)
class Summarize:
    """Replace older turns with a summary (one extra model step on ``tier``), keeping the last few.

    The summary goes into the first user message, which stays; the kept tail
    holds at least ``keep_last`` messages.
    """

    max_tokens: int
    keep_last: int = 4
    tier: str = "fast"
    summary_tokens: int = 512

    async def apply(self, messages: list[JSON], *, llm: LLM, ctx: Caller) -> list[JSON]:
        if message_tokens(messages) <= self.max_tokens:
            return messages
        cuts = _cuts(messages)
        if not cuts:
            return messages
        target = len(messages) - self.keep_last
        fitting = [c for c in cuts if c <= target]
        chosen = fitting[-1] if fitting else cuts[0]
        request: JSON = {
            "model": model_for(llm.settings, self.tier),
            "max_tokens": self.summary_tokens,
            "system": SUMMARY_SYSTEM,
            "messages": [{"role": "user", "content": _transcript(messages[:chosen])}],
        }
        record = await llm.step(ctx, request)
        first = messages[0]
        content = first["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        blocks.append({"type": "text", "text": SUMMARY_LABEL + _text(record.result)})
        log.info("llm.context_summarized", summarized=chosen - 1, step=record.step)
        return [{**first, "content": blocks}, *messages[chosen:]]


def _transcript(messages: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for m in messages:
        content = m["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for b in blocks:
            if b.get("type") == "text":
                lines.append(f"{m['role']}: {b['text']}")
            elif b.get("type") == "tool_use":
                lines.append(f"{m['role']} called {b['name']} with {_json(b.get('input'))}")
            elif b.get("type") == "tool_result":
                error = " (error)" if b.get("is_error") else ""
                lines.append(f"tool result{error}: {_json(b.get('content'))}")
    return "\n".join(lines)


def _json(value: Any) -> str:
    return value if isinstance(value, str) else _encoder.encode(value).decode()


# -- the model layer -------------------------------------------------------------------


class LLM:
    """Model calls for agents' contexts (``ctx.llm(...)``); one per worker, for all activations."""

    def __init__(
        self,
        client: anthropic.AsyncAnthropic,
        settings: Settings,
        *,
        policy: RetryPolicy | None = None,
        offline: bool,
    ) -> None:
        self.client = client
        self.settings = settings
        self.policy = policy or RetryPolicy(max_attempts=settings.llm_max_attempts)
        self.offline = offline

    async def call(
        self,
        ctx: Caller,
        prompt: str | list[JSON] | None = None,
        /,
        *,
        output: type[T] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        system: str | list[JSON] | None = None,
        tier: str | None = None,
        model: str | None = None,
        tools: Sequence[Tool[..., Any]] | None = None,
        tool_choice: Mapping[str, Any] | None = None,
        max_tokens: int = 1024,
        max_turns: int = 8,
        reflections: int = 2,
        temperature: float | None = None,
        stop_sequences: Sequence[str] | None = None,
        context_policy: ContextPolicy | None = None,
    ) -> LLMResult[T]:
        """Ask the model; run the tools it calls; return its final (validated) answer.

        ``prompt`` becomes a user message (after ``messages``, when both are
        given). The model is ``model``, else the tier's (``tier``, else the
        agent's); ``system`` and ``tools`` default to the agent's. With
        ``output`` the answer must decode as that type (a JSON schema is sent
        as ``output_config``); a validation error is fed back up to
        ``reflections`` times, then :class:`OutputInvalid` is raised. The tool
        loop stops after ``max_turns`` model calls that asked for tools (the
        result then has ``stop_reason == "tool_use"``; with ``output``,
        :class:`OutputInvalid`). Raises :class:`StepFailed` for a recorded
        model error and :class:`BudgetExceeded` instead of a call over budget.
        """
        model_id = model or model_for(self.settings, tier or ctx.agent.tier)
        offered = list(ctx.agent.tools if tools is None else tools)
        by_name = {t.name: t for t in offered}
        convo: list[JSON] = msgspec.to_builtins(list(messages or []))
        if prompt is not None:
            convo.append({"role": "user", "content": prompt})
        if not convo:
            raise ValueError("ctx.llm() needs a prompt or messages")
        base: JSON = {"model": model_id, "max_tokens": max_tokens}
        system = (ctx.agent.system or None) if system is None else system
        if system:
            base["system"] = system
        if offered:
            base["tools"] = [t.to_anthropic() for t in offered]
        if tool_choice is not None:
            base["tool_choice"] = dict(tool_choice)
        if output is not None:
            base["output_config"] = {
                "format": {"type": "json_schema", "schema": output_schema(output)}
            }
        if temperature is not None:
            base["temperature"] = temperature
        if stop_sequences:
            base["stop_sequences"] = list(stop_sequences)
        base = msgspec.to_builtins(base)
        policy = context_policy or getattr(ctx.agent, "context_policy", None)
        type_name = getattr(output, "__name__", repr(output))

        first = ctx.steps.next_step
        turns = reflected = 0
        while True:
            if policy is not None:
                convo = await policy.apply(convo, llm=self, ctx=ctx)
            record = await self.step(ctx, {**base, "messages": list(convo)})
            message: JSON = record.result
            convo = [*convo, _echo(message)]
            uses = [b for b in message["content"] if b["type"] == "tool_use"]
            if message.get("stop_reason") == "tool_use" and uses:
                turns += 1
                if turns >= max_turns:
                    log.warning("llm.max_turns", max_turns=max_turns, step=record.step)
                    if output is not None:
                        problem = f"the model was still calling tools after {max_turns} turns"
                        raise OutputInvalid(type_name, problem, reflected + 1)
                    break
                results = [await self._tool_result(ctx, by_name, b) for b in uses]
                convo.append({"role": "user", "content": results})
                continue
            if output is None:
                break
            try:
                value = msgspec.json.decode(_json_text(_text(message)), type=output)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                if reflected >= reflections:
                    raise OutputInvalid(type_name, str(exc), reflected + 1) from None
                reflected += 1
                log.info("llm.reflection", step=record.step, type=type_name, problem=str(exc))
                convo.append({"role": "user", "content": _reflection(type_name, exc)})
                continue
            return self._result(ctx, first, message, convo, value)
        return self._result(ctx, first, message, convo, None)

    async def step(self, ctx: Caller, request: JSON) -> StepRecorded:
        """One model call as a durable step: from the log, from the agent's response cache
        (recorded as a step of its own), or budget-checked and made now."""
        steps = ctx.steps
        await steps.ensure_loaded()
        call: StepCall = lambda: self._create(request)  # noqa: E731
        cache: Cache | None = getattr(ctx.agent, "cache", None)
        index: CacheIndex | None = None
        probe: Probe | None = None
        hit: Hit | None = None
        if steps.next_step not in steps.recorded:
            # The cache is consulted only for a step the record lacks (a replay or a
            # retry takes a hit back from the record), and only with a log to look in.
            if cache is not None and steps.log is not None:
                index = CacheIndex(steps.log)
                probe, hit = await index.lookup(cache, ctx.agent.name, request)
            if hit is not None:
                output = hit.output
                call = lambda: _answered(output)  # noqa: E731
            else:
                await self._check_budget(ctx, request)
        before = steps.reused
        record = await steps.run("llm", request["model"], request, call)
        if hit is not None and record.cached_from is not None:
            metrics.LLM_CACHE_HITS.labels(record.name, hit.kind).inc()
        elif (
            cache is not None
            and index is not None
            and probe is not None
            and record.cached_from is None
            and record.error is None
            and steps.executed[-1:] == [record.step]
        ):
            ref = StepRef(activation_id=steps.activation_id, step=record.step)
            await self._index(index, cache, probe, ref, record.result)
        log.info(
            "llm.step",
            step=record.step,
            model=record.name,
            reused=steps.reused > before,
            cached=None if hit is None else hit.kind,
            attempts=len(record.attempts) + 1,
            tokens=record.usage.tokens if record.usage else 0,
            failed=record.error is not None,
        )
        raise_if_failed(record)
        return record

    async def _index(
        self, index: CacheIndex, cache: Cache, probe: Probe, ref: StepRef, result: JSON
    ) -> None:
        """Add a fresh answer to the cache's index. The step is in the log already; an
        index row lost here (the database went away meanwhile) only costs a later hit,
        so it does not fail the handler."""
        try:
            await index.add(cache, probe, ref, result)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("llm.cache_index_failed", step=ref.step, error=error)

    async def _create(self, request: JSON) -> StepOutput:
        failed: list[AttemptRecord] = []

        async def on_attempt(a: AttemptRecord) -> None:
            failed.append(a)
            if a.will_retry:
                metrics.RETRIES.labels("llm", a.reason or "error").inc()
            log.warning(
                "llm.attempt_failed",
                attempt=a.attempt,
                reason=a.reason,
                error_type=a.error_type,
                error=a.error,
                retry_in=a.delay,
            )

        async def create() -> anthropic.types.Message:
            return await self.client.messages.create(**request)

        model = request["model"]
        # The step's span (Steps.run started it): the GenAI conventions' attributes. The
        # SDK's own span of the API call nests under it.
        span = trace.get_current_span()
        span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                             "gen_ai.request.model": model,
                             "gen_ai.request.max_tokens": request["max_tokens"]})  # fmt: skip
        started = time.perf_counter()
        try:
            outcome = await run_with_retries(create, self.policy, on_attempt=on_attempt)
        except RetriesExhausted as exc:
            error = StepError(type="RetriesExhausted", message=str(exc), code=str(exc.code))
            return StepOutput(error=error, attempts=exc.attempts)
        except anthropic.APIError as exc:  # not retryable (400, 401, ...): the call's answer
            status = getattr(exc, "status_code", None)
            error = StepError(type=type(exc).__name__, message=str(exc), code=str(status or ""))
            return StepOutput(error=error, attempts=tuple(failed))
        finally:
            metrics.LLM_SECONDS.labels(model).observe(time.perf_counter() - started)
        message = outcome.value
        usage = usage_of(self.settings, model, message.usage, offline=self.offline)
        metrics.LLM_TOKENS.labels(model, "input").inc(
            usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
        )
        metrics.LLM_TOKENS.labels(model, "output").inc(usage.output_tokens)
        metrics.LLM_COST.labels(model).inc(usage.cost_usd)
        span.set_attributes({"gen_ai.response.id": message.id,
                             "gen_ai.response.model": message.model,
                             "gen_ai.usage.input_tokens": usage.input_tokens,
                             "gen_ai.usage.output_tokens": usage.output_tokens,
                             "agentrt.llm.cost_usd": usage.cost_usd,
                             "agentrt.llm.offline": self.offline})  # fmt: skip
        return StepOutput(
            result=message.model_dump(mode="json"), attempts=outcome.attempts, usage=usage
        )

    async def _check_budget(self, ctx: Caller, request: JSON) -> None:
        budget = ctx.agent.budget or Budget(
            tokens=self.settings.run_budget_tokens, usd=self.settings.run_budget_usd
        )
        if budget.tokens is None and budget.usd is None:
            return
        spent_tokens, spent_usd = await ctx.run_spend()
        for n in range(1, ctx.steps.count + 1):
            usage = getattr(ctx.steps.recorded.get(n), "usage", None)
            if usage is not None:
                spent_tokens += usage.tokens
                spent_usd += usage.cost_usd
        input_tokens = estimate_request_tokens(request)
        want_tokens = input_tokens + request["max_tokens"]
        want_usd = (
            0.0
            if self.offline
            else cost_usd(self.settings, request["model"], input_tokens, request["max_tokens"])
        )
        if (budget.tokens is not None and spent_tokens + want_tokens > budget.tokens) or (
            budget.usd is not None and spent_usd + want_usd > budget.usd
        ):
            event = RunBudgetExceeded(
                agent=ctx.agent.name,
                activation_id=ctx.activation_id,
                step=ctx.steps.next_step,
                spent_tokens=spent_tokens,
                spent_usd=round(spent_usd, 10),
                requested_tokens=want_tokens,
                requested_usd=want_usd,
                budget_tokens=budget.tokens,
                budget_usd=budget.usd,
            )
            log.warning("llm.budget_exceeded", **msgspec.to_builtins(event))
            raise BudgetExceeded(event)

    async def _tool_result(
        self, ctx: Caller, by_name: Mapping[str, Tool[..., Any]], block: JSON
    ) -> JSON:
        """Run one ``tool_use`` block; its ``tool_result`` (``is_error``: the model reflects)."""
        answer: JSON = {"type": "tool_result", "tool_use_id": block["id"]}
        t = by_name.get(block["name"])
        if t is None:
            known = ", ".join(sorted(by_name)) or "none"
            problem = f"no tool named {block['name']!r}; available tools: {known}"
            return {**answer, "is_error": True, "content": problem}
        try:
            params = t.parse_input(block["input"])
        except ToolInputError as exc:
            problem = f"{exc}. Call {t.name} again with corrected input."
            return {**answer, "is_error": True, "content": problem}
        try:
            value = await ctx.tool_step(t, msgspec.to_builtins(params, str_keys=True))
        except StepFailed as exc:
            return {**answer, "is_error": True, "content": f"{exc.error_type}: {exc.error}"}
        return {**answer, "content": _json(msgspec.to_builtins(value, str_keys=True))}

    def _result(
        self, ctx: Caller, first: int, message: JSON, convo: list[JSON], value: Any
    ) -> LLMResult[Any]:
        taken = tuple(range(first, ctx.steps.count + 1))
        records = [r for n in taken if (r := ctx.steps.recorded.get(n)) is not None]
        usages = [r.usage for r in records if r.usage is not None]
        cached = tuple(r.step for r in records if r.cached_from is not None)
        # A cached answer is the offline model's when the call it repeats was.
        saved_offline = any(r.saved.offline for r in records if r.saved is not None)
        total = Usage(
            model=message.get("model", ""),
            input_tokens=sum(u.input_tokens for u in usages),
            output_tokens=sum(u.output_tokens for u in usages),
            cache_creation_input_tokens=sum(u.cache_creation_input_tokens for u in usages),
            cache_read_input_tokens=sum(u.cache_read_input_tokens for u in usages),
            cost_usd=round(sum(u.cost_usd for u in usages), 10),
            offline=any(u.offline for u in usages) or saved_offline,
        )
        return LLMResult(
            text=_text(message),
            output=value,
            message=message,
            usage=total,
            steps=taken,
            stop_reason=message.get("stop_reason"),
            offline=total.offline,
            messages=convo,
            cached=cached,
        )


async def _answered(output: StepOutput) -> StepOutput:
    return output


def _reflection(type_name: str, exc: Exception) -> str:
    return (
        f"Your reply is not a valid {type_name}: {exc}. "
        "Reply again with only the corrected JSON, nothing else."
    )
