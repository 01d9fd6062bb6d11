"""The read side's errors: each a stable code (and, for the query API, an HTTP status).

All derive from :class:`runtime.errors.AgentrtError`, so the CLI prints them as
``error [code] message`` with exit 1, and the API renders them as the ingress
does: ``{"code": ..., "message": ...}`` with ``status``.
"""

from __future__ import annotations

from runtime.errors import AgentrtError


class ReadSideError(AgentrtError):
    """Base of the read side's errors; ``status`` is the HTTP status the API answers with."""

    status: int = 400
    code: str = "bad_request"


class UnknownRun(ReadSideError):
    status = 404
    code = "run_not_found"


class UnknownProjection(ReadSideError):
    status = 404
    code = "projection_not_found"


class StepOutOfRange(ReadSideError):
    """A step (or position) past the run's end, or before its start."""

    status = 422
    code = "step_out_of_range"


class AgentMissing(ReadSideError):
    """The run needs an agent the loaded app does not define (renamed or removed)."""

    status = 422
    code = "agent_not_found"


class ImportRefused(ReadSideError):
    """An export file that does not verify: altered (hash chain mismatch) or malformed."""

    status = 422
    code = "import_refused"


class InvalidQuery(ReadSideError):
    """A query parameter that cannot be used (a bad cursor, time range or position)."""

    status = 422
    code = "invalid_query"


class Unauthorized(ReadSideError):
    status = 401
    code = "unauthorized"


class ProjectionBusy(ReadSideError):
    """Another process is rebuilding this projection."""

    status = 409
    code = "projection_busy"


class InvalidInput(ReadSideError):
    """A body given for a run's trigger (``agentrt fork --input-file``) that does not decode."""

    status = 422
    code = "invalid_input"


class ApprovalMissing(ReadSideError):
    """No approval with this id waits in this run."""

    status = 404
    code = "approval_not_found"


class ApprovalConflict(ReadSideError):
    """The approval has a decision already (a person's, or its deadline's default)."""

    status = 409
    code = "approval_already_decided"


class InvalidBody(ReadSideError):
    """A request body that does not decode as the route's type."""

    status = 422
    code = "invalid_request"
