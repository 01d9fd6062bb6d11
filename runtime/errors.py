"""Every exception agentrt raises, in one place, each with a stable code."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from runtime.events.values import AttemptRecord


class ErrorCode(enum.StrEnum):
    SETTINGS = "settings_invalid"
    SERVICE_UNAVAILABLE = "service_unavailable"
    EMBEDDED_SERVER = "embedded_server_failed"
    MIGRATION = "migration_failed"
    CONCURRENCY_CONFLICT = "concurrency_conflict"
    DUPLICATE_MISMATCH = "duplicate_event_mismatch"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    EVENT_DECODE = "event_decode_failed"
    APPEND_ONLY = "append_only_violation"
    INVALID_APPEND = "invalid_append"
    RETRIES_EXHAUSTED = "retries_exhausted"
    CIRCUIT_OPEN = "circuit_open"
    TOOL_INPUT = "tool_input_invalid"
    TOOL_OUTPUT = "tool_output_invalid"
    TOOL_TIMEOUT = "tool_timeout"
    UNKNOWN_TOOL = "unknown_tool"
    STEP_DIVERGENCE = "step_divergence"
    STEP_FAILED = "step_failed"
    OUTPUT_INVALID = "output_invalid"
    INVALID_DELIVERY = "invalid_delivery"
    APP_LOAD = "app_load_failed"
    BUDGET_EXCEEDED = "budget_exceeded"
    DEAD_LETTER_NOT_FOUND = "dead_letter_not_found"
    APPROVAL_NOT_FOUND = "approval_not_found"
    APPROVAL_DECIDED = "approval_already_decided"
    LEASE_LOST = "lease_lost"
    OFFLINE_REQUEST = "invalid_request_error"
    REDIS_NOT_DURABLE = "redis_not_durable"
    CLAIM_LOST = "activation_claim_lost"
    HANDLER_TIMEOUT = "handler_timeout"
    REDRIVE_REFUSED = "redrive_refused"
    INVALID_TRANSITION = "invalid_transition"


class AgentrtError(Exception):
    """Base of agentrt's errors; ``code`` is stable and safe to show to users.

    The runtime's codes are :class:`ErrorCode` members; a package's own errors
    (``webhooks/errors.py``) derive from this class with codes of their own.
    """

    code: str

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SettingsError(AgentrtError):
    """A setting is missing or malformed; ``key`` names it as the user spells it."""

    code = ErrorCode.SETTINGS

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class ServiceUnavailable(AgentrtError):
    """Redis or PostgreSQL could not be reached after retrying."""

    code = ErrorCode.SERVICE_UNAVAILABLE

    def __init__(self, service: str, url: str, reason: str) -> None:
        super().__init__(f"{service} at {url} is unreachable: {reason}")
        self.service = service
        self.url = url
        self.reason = reason


class RedisNotDurable(AgentrtError):
    """Redis does not (or cannot be shown to) fsync every acknowledged write, and
    ``require_durable_redis`` is set."""

    code = ErrorCode.REDIS_NOT_DURABLE

    def __init__(self, component: str, problem: str, risk: str) -> None:
        super().__init__(
            f"{component} refuses to start: Redis is not durable ({problem}); {risk}. "
            "Run Redis with appendonly yes and appendfsync always, or unset "
            "AGENTRT_REQUIRE_DURABLE_REDIS to start with a warning"
        )
        self.component = component
        self.problem = problem


class EmbeddedServerError(AgentrtError):
    """An embedded Redis or PostgreSQL failed to start or stop."""

    code = ErrorCode.EMBEDDED_SERVER


class MigrationError(AgentrtError):
    """A schema migration could not be applied."""

    code = ErrorCode.MIGRATION


class InvalidAppend(AgentrtError):
    """An append request that can never succeed (empty batch, bad stream id, ...)."""

    code = ErrorCode.INVALID_APPEND


class ConcurrencyConflict(AgentrtError):
    """The stream's version was not the one the writer expected."""

    code = ErrorCode.CONCURRENCY_CONFLICT

    def __init__(self, stream_id: str, expected: int | None, actual: int | None) -> None:
        now = "another writer committed first" if actual is None else f"actual version {actual}"
        super().__init__(f"stream {stream_id!r}: expected version {expected}, {now}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventMismatch(AgentrtError):
    """An event id that is already in the log was re-appended in a different place.

    Re-appending the very same events is idempotent; re-using an event id for a
    different stream, version or batch is a bug in the writer and is refused.
    """

    code = ErrorCode.DUPLICATE_MISMATCH

    def __init__(self, event_id: UUID, detail: str) -> None:
        super().__init__(f"event {event_id} is already in the log: {detail}")
        self.event_id = event_id


class UnknownEventType(AgentrtError):
    """A stored event's type is not registered (and strict decoding was asked for)."""

    code = ErrorCode.UNKNOWN_EVENT_TYPE

    def __init__(self, event_type: str) -> None:
        super().__init__(f"no event type registered as {event_type!r}")
        self.event_type = event_type


class EventDecodeError(AgentrtError):
    """A stored event body does not decode into its registered type."""

    code = ErrorCode.EVENT_DECODE

    def __init__(self, event_type: str, schema_version: int, reason: str) -> None:
        super().__init__(f"cannot decode {event_type!r} v{schema_version}: {reason}")
        self.event_type = event_type
        self.schema_version = schema_version


class RetriesExhausted(AgentrtError):
    """Every attempt allowed by the retry policy failed with a retryable error."""

    code = ErrorCode.RETRIES_EXHAUSTED

    def __init__(self, attempts: tuple[AttemptRecord, ...], last_error: BaseException) -> None:
        last = attempts[-1]
        super().__init__(
            f"gave up after {len(attempts)} attempts ({last.reason}): "
            f"{last.error_type}: {last.error}"
        )
        self.attempts = attempts
        self.last_error = last_error


class CircuitOpen(AgentrtError):
    """The breaker refused the call; trying again sooner than ``retry_in`` is pointless."""

    code = ErrorCode.CIRCUIT_OPEN

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_in:.3f}s")
        self.name = name
        self.retry_in = retry_in


class ToolInputError(AgentrtError):
    """The model's input for a tool does not validate; ``str(err)`` is meant for the model.

    ``path`` is where in the input the problem is, as a JSON path (``$`` is the
    whole input, ``$.items[2].sku`` a nested field); ``problem`` says what is
    wrong there.
    """

    code = ErrorCode.TOOL_INPUT

    def __init__(self, tool: str, problem: str, path: str = "$") -> None:
        where = "" if path == "$" else f"field `{path.removeprefix('$.')}`: "
        super().__init__(f"invalid input for tool `{tool}`: {where}{problem}")
        self.tool = tool
        self.problem = problem
        self.path = path


class ToolOutputError(AgentrtError):
    """A tool returned something its return annotation does not describe (a bug in the tool)."""

    code = ErrorCode.TOOL_OUTPUT

    def __init__(self, tool: str, problem: str) -> None:
        super().__init__(f"tool `{tool}` returned an invalid result: {problem}")
        self.tool = tool
        self.problem = problem


class ToolTimeout(AgentrtError, TimeoutError):
    """A tool call outlived its timeout; it was cancelled.

    A ``TimeoutError`` too, so code that retries timeouts retries this one.
    """

    code = ErrorCode.TOOL_TIMEOUT

    def __init__(self, tool: str, seconds: float) -> None:
        super().__init__(f"tool `{tool}` timed out after {seconds:g}s")
        self.tool = tool
        self.seconds = seconds


class UnknownTool(AgentrtError):
    """No tool has this name; the message lists those that exist (for the model too)."""

    code = ErrorCode.UNKNOWN_TOOL

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = tuple(sorted(known))
        listed = ", ".join(f"`{k}`" for k in self.known) or "none"
        super().__init__(f"no tool named `{name}`; available tools: {listed}")


class StepDivergence(AgentrtError):
    """A retried or replayed handler asked for something else than the log recorded."""

    code = ErrorCode.STEP_DIVERGENCE

    def __init__(
        self, activation_id: object, step: int, *, recorded: str, requested: str, same_call: bool
    ) -> None:
        what = "with a different request" if same_call else f"but the handler asked for {requested}"
        super().__init__(
            f"activation {activation_id} diverged at step {step}: the log recorded {recorded} "
            f"{what}; a handler must make the same calls in the same order when it is retried "
            "(redrive the dead letter for a fresh activation)"
        )
        self.activation_id = activation_id
        self.step = step
        self.recorded = recorded
        self.requested = requested


class StepFailed(AgentrtError):
    """A step's final error, recorded in the log and raised again on every retry and replay."""

    code = ErrorCode.STEP_FAILED

    def __init__(
        self, step: int, kind: str, name: str, error_type: str, error: str, error_code: str | None
    ) -> None:
        super().__init__(f"step {step} ({kind} {name!r}) failed: {error_type}: {error}")
        self.step = step
        self.kind = kind
        self.name = name
        self.error_type = error_type
        self.error = error
        self.error_code = error_code


class OutputInvalid(AgentrtError):
    """The model's answer did not validate against the expected type, after reflection."""

    code = ErrorCode.OUTPUT_INVALID

    def __init__(self, type_name: str, problem: str, attempts: int) -> None:
        super().__init__(
            f"the model's output is not a valid {type_name} after {attempts} attempt(s): {problem}"
        )
        self.type_name = type_name
        self.problem = problem
        self.attempts = attempts


class InvalidDelivery(AgentrtError):
    """A stream entry an agent received cannot be turned into an event (poison)."""

    code = ErrorCode.INVALID_DELIVERY

    def __init__(self, stream: str, entry_id: str, problem: str) -> None:
        super().__init__(f"entry {entry_id} of {stream}: {problem}")
        self.stream = stream
        self.entry_id = entry_id
        self.problem = problem


class AppLoadError(AgentrtError):
    """``--app`` does not name a module with agents."""

    code = ErrorCode.APP_LOAD

    def __init__(self, target: str, problem: str) -> None:
        super().__init__(f"--app {target}: {problem}")
        self.target = target


class DeadLetterNotFound(AgentrtError):
    """No dead letter has this id (it was redriven, or never existed)."""

    code = ErrorCode.DEAD_LETTER_NOT_FOUND

    def __init__(self, dead_letter_id: str, stream: str) -> None:
        super().__init__(f"no dead letter {dead_letter_id!r} in {stream}")
        self.dead_letter_id = dead_letter_id


class ApprovalNotFound(AgentrtError):
    """No ``approval.requested`` has this approval id."""

    code = ErrorCode.APPROVAL_NOT_FOUND

    def __init__(self, approval_id: UUID) -> None:
        super().__init__(f"no approval.requested with approval_id {approval_id}")
        self.approval_id = approval_id


class AlreadyDecided(AgentrtError):
    """The approval has a decision already; the first one stands."""

    code = ErrorCode.APPROVAL_DECIDED

    def __init__(self, approval_id: UUID, *, approved: bool, by: str | None) -> None:
        verdict = "approved" if approved else "denied"
        who = f" by {by}" if by else ""
        super().__init__(f"approval {approval_id} was already {verdict}{who}")
        self.approval_id = approval_id
        self.approved = approved
        self.by = by


class LeaseLost(AgentrtError):
    """Another relay took over (this one stalled past its lease); it stops publishing."""

    code = ErrorCode.LEASE_LOST


class ClaimLost(AgentrtError):
    """This worker no longer holds the activation's claim (it stalled past its lease and
    another worker took the activation over): it executes no further step."""

    code = ErrorCode.CLAIM_LOST


class HandlerTimeout(AgentrtError):
    """A handler ran past its agent's timeout and was cancelled (a failed delivery)."""

    code = ErrorCode.HANDLER_TIMEOUT

    def __init__(self, agent: str, seconds: float) -> None:
        super().__init__(f"agent {agent!r}: the handler ran past its timeout of {seconds:g} s")
        self.agent = agent
        self.seconds = seconds


class RedriveRefused(AgentrtError):
    """The dead letter's event was handled (its activation committed) since it was
    dead-lettered: a redrive would run the handler a second time."""

    code = ErrorCode.REDRIVE_REFUSED


class InvalidTransition(AgentrtError):
    """``ctx.transition`` asked a state machine for a transition it does not declare.

    The refusal is recorded (``state.transition_refused``, in ``event``) and the
    run's state is unchanged. A handler may catch it and go on (the refusal
    commits with the rest of the activation); uncaught, it ends the activation
    with the outcome ``transition_refused``, committing the refusal alone.
    """

    code = ErrorCode.INVALID_TRANSITION

    def __init__(
        self,
        agent: str,
        from_state: str,
        to_state: str,
        allowed: Iterable[str],
        *,
        event: object = None,
    ) -> None:
        self.allowed = tuple(allowed)
        listed = ", ".join(self.allowed) or "nowhere (it is a final state)"
        super().__init__(
            f"agent {agent!r} refused the transition {from_state} -> {to_state}: "
            f"from {from_state} it may go to {listed}"
        )
        self.agent = agent
        self.from_state = from_state
        self.to_state = to_state
        self.event = event


class InvalidRequestError(AgentrtError, ValueError):
    """A request the offline model refuses as the Messages API would: 400
    ``invalid_request_error``, the message naming the field."""

    code = ErrorCode.OFFLINE_REQUEST


class BudgetExceeded(BaseException):
    """A model call would take the run past its budget: the run stops instead of calling.

    Raised out of the handler; the worker commits ``run.budget_exceeded`` and
    the inbox marker, so the event counts as handled. A ``BaseException``, like
    ``asyncio.CancelledError``: a handler's ``except Exception:`` cannot swallow
    the stop and go on spending.
    """

    code = ErrorCode.BUDGET_EXCEEDED

    def __init__(self, event: object) -> None:
        super().__init__(str(event))
        self.message = str(event)
        self.event = event
