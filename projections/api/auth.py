"""The query API's bearer token: where it comes from, and the check every route makes.

The token is ``settings.api_token`` (``AGENTRT_API_TOKEN``); without one, ``agentrt api``
makes one and keeps it in ``<state_dir>/api-token`` (mode 0600), which the API (and an
ingress that mounts it on the same machine) then reads. With no token at all every data
route answers 401: an API left without a secret is closed, never open.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from projections.errors import Unauthorized
from runtime.settings import Settings

TOKEN_FILE = "api-token"

#: The security scheme every route declares (OpenAPI: ``bearer``). ``auto_error=False``:
#: a missing header is answered by :func:`bearer_check` in the API's own error shape.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`Authorization: Bearer <token>`: settings.api_token (AGENTRT_API_TOKEN), "
    "or the token `agentrt api` keeps in <state_dir>/api-token.",
)


def token_path(settings: Settings) -> Path:
    return settings.state_dir / TOKEN_FILE


def configured_token(settings: Settings) -> str | None:
    """The token from the settings, else the one kept in the state directory, else None."""
    if settings.api_token:
        return settings.api_token
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return token_path(settings).read_text().strip() or None
    return None


def ensure_token(settings: Settings) -> tuple[str, Path | None]:
    """The token to serve with, and the file it is kept in (None: it came from settings).

    Made once with :func:`secrets.token_urlsafe` and written with mode 0600 (created
    exclusively, so two ``agentrt api`` starting at once agree on one token).
    """
    if settings.api_token:
        return settings.api_token, None
    path = token_path(settings)
    existing = configured_token(settings)
    if existing is not None:
        return existing, path
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first (or left it empty)
        kept = path.read_text().strip()
        if kept:
            return kept, path
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, path


def bearer_check(
    token: str | None,
) -> Callable[[HTTPAuthorizationCredentials | None], Awaitable[None]]:
    """The dependency that guards every route: the header's token against ``token``,
    compared in constant time (a byte-by-byte compare would leak its prefix by timing)."""
    expected = token.encode() if token else None

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if expected is None:
            raise Unauthorized(
                "the query API has no token configured: set AGENTRT_API_TOKEN, "
                "or run `agentrt api` once to create <state_dir>/api-token"
            )
        if credentials is None:
            raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise Unauthorized("wrong bearer token")

    return check
