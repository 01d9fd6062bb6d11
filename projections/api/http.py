"""The API's answers: msgspec-encoded JSON, and errors in the ingress's shape.

Errors are rendered by the routes themselves (:class:`ReadRoute`), not by handlers
registered on an app, so the router answers the same way in ``agentrt api`` and mounted
in any other app (the ingress, a user's): ``{"code": ..., "message": ...}`` with
``field`` on a 422, ``WWW-Authenticate: Bearer`` on a 401.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import msgspec
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from projections.errors import ReadSideError, Unauthorized

JSON = "application/json"


class ErrorBody(msgspec.Struct, kw_only=True):
    """An error: a stable code, a message for people, and for a 422 the offending field."""

    code: str
    message: str
    field: str | None = None


class Unavailable(ReadSideError):
    """PostgreSQL is not configured or not reachable: retry later."""

    status = 503
    code = "unavailable"


_encoder = msgspec.json.Encoder()


def json_response(
    value: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type=JSON, headers=headers)


def error_response(exc: ReadSideError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return json_response(ErrorBody(code=exc.code, message=exc.message), exc.status, headers)


def validation_response(exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {}
    field = ".".join(str(p) for p in first.get("loc", ())) or None
    body = ErrorBody(
        code="invalid_request", message=str(first.get("msg", "invalid request")), field=field
    )
    return json_response(body, 422)


def nul_parameter(request: Request) -> Response | None:
    """A 422 for a query parameter holding a NUL character (valid in a URL and in the
    schema's strings, but PostgreSQL text cannot hold it: it must not become a 500)."""
    for name, value in request.query_params.multi_items():
        if "\x00" in value:
            body = ErrorBody(
                code="invalid_request",
                message="a query parameter cannot hold a NUL character",
                field=f"query.{name}",
            )
            return json_response(body, 422)
    return None


class ReadRoute(APIRoute):
    """A route that renders the read side's errors and validation errors itself."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            refused = nul_parameter(request)
            if refused is not None:
                return refused
            try:
                return await handler(request)
            except ReadSideError as exc:
                return error_response(exc)
            except RequestValidationError as exc:
                return validation_response(exc)
            except asyncpg.DataError as exc:
                # SQLSTATE class 22 or a parameter asyncpg cannot encode: every value in the
                # queries is a parameter, so this is a value the client sent (a cursor
                # number past 64 bits...), not a fault of ours.
                body = ErrorBody(code="invalid_query", message=f"a value is out of range: {exc}")
                return json_response(body, 422)

        return guarded


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


#: The error answers every route documents.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        **_error("Missing or wrong bearer token (code `unauthorized`)"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    },
    404: _error(
        "No such run (code `run_not_found`), or its read model is not built yet "
        "(`projection_not_found`: run `agentrt projector`)"
    ),
    422: _error("A parameter that does not validate or cannot be used; `field` names it"),
    503: _error("PostgreSQL unreachable or not configured (code `unavailable`)"),
}


def ok(schema: dict[str, Any], description: str) -> dict[int | str, dict[str, Any]]:
    """A route's documented answers: ``schema`` on 200, and the errors."""
    return {200: {"description": description, "content": {JSON: {"schema": schema}}}, **ERRORS}
