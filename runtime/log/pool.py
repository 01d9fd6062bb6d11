"""PostgreSQL connections: pools that ping and retry, URLs for the owner and runtime roles."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import structlog

from runtime.errors import ServiceUnavailable
from runtime.settings import Settings

log = structlog.get_logger(__name__)


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def with_user(url: str, user: str, password: str | None) -> str:
    """``url`` with its user (and password) replaced."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


def runtime_url(settings: Settings) -> str:
    """The URL the runtime connects with: the app role's unless given explicitly."""
    if settings.runtime_database_url is not None:
        return settings.runtime_database_url
    return with_user(settings.require_database_url(), settings.app_role, settings.app_password)


async def connect(url: str, *, attempts: int = 5, **kwargs: Any) -> asyncpg.Connection:
    """One connection, retried with backoff while the server is starting."""
    return await _retry(url, lambda: asyncpg.connect(url, **kwargs), attempts)


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, attempts: int = 5, **kwargs: Any
) -> asyncpg.Pool:
    """A pool whose first connection has been made (so a bad URL fails here, by name)."""
    server_settings = {"application_name": "agentrt", **kwargs.pop("server_settings", {})}

    async def make() -> asyncpg.Pool:
        return await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            server_settings=server_settings,
            **kwargs,
        )

    return await _retry(url, make, attempts)


async def _retry(url: str, make: Any, attempts: int) -> Any:
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            return await make()
        except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as exc:
            if attempt == attempts:
                raise ServiceUnavailable(
                    "PostgreSQL", redact(url), str(exc) or type(exc).__name__
                ) from exc
            log.debug("postgres.retry", url=redact(url), attempt=attempt, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


async def _keep_session(conn: asyncpg.Connection) -> None:
    return None


async def open_runtime_pool(settings: Settings, **kwargs: Any) -> asyncpg.Pool:
    """The runtime's pool, connected as the app role (INSERT and SELECT on the log).

    Where ``db migrate`` could not create that role, the runtime falls back to
    the owner's URL and says so: the triggers still refuse UPDATE, DELETE and
    TRUNCATE, but the connecting role could disable them (``agentrt db status``).
    """
    url = runtime_url(settings)
    # The runtime never leaves session state behind (SET LOCAL only; listeners
    # are removed by their owners), so skip asyncpg's reset query: one round
    # trip saved on every release.
    kwargs.setdefault("reset", _keep_session)
    if not settings.log_notify:
        # Read by the log's notify trigger: appends from this pool wake nobody.
        kwargs["server_settings"] = {**kwargs.get("server_settings", {}), "agentrt.notify": "off"}
    try:
        return await create_pool(url, **kwargs)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        if settings.runtime_database_url is not None or "does not exist" not in str(exc):
            raise
        log.warning(
            "runtime.role_missing",
            role=settings.app_role,
            fallback=redact(settings.require_database_url()),
            hint="run `agentrt db migrate` with a role that can CREATE ROLE, or set "
            "AGENTRT_RUNTIME_DATABASE_URL to a role with only INSERT and SELECT on the log",
        )
        return await create_pool(settings.require_database_url(), **kwargs)
