"""The ingress's errors: each an HTTP status and a stable code, rendered as JSON; and the
sources file's. All derive from :class:`runtime.errors.AgentrtError`."""

from __future__ import annotations

from runtime.errors import AgentrtError


class ConfigError(AgentrtError):
    """The sources file is missing, unreadable or wrong; the message names where."""

    code = "webhooks_config_invalid"


class IngressError(AgentrtError):
    """A request the ingress refuses: ``status`` is its HTTP status, ``code`` its stable code."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.field = field
        self.retry_after = retry_after

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field is not None:
            doc["field"] = self.field
        return doc


class Unauthorized(IngressError):
    status = 401
    code = "unauthorized"


class UnknownSource(IngressError):
    status = 404
    code = "unknown_source"


class PayloadTooLarge(IngressError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(IngressError):
    status = 415
    code = "unsupported_media_type"


class InvalidPayload(IngressError):
    """The body does not decode into the source's format; ``field`` names where."""

    status = 422
    code = "invalid_payload"


class Unavailable(IngressError):
    """Redis is unreachable or the backlog is over its limit: retry later."""

    status = 503
    code = "unavailable"
