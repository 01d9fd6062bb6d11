"""The Anthropic client a worker owns: the production SDK with a key, else the SDK aimed
at a local offline model (started here, on demand: FastAPI and uvicorn load only then)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anthropic
import structlog

from runtime.errors import SettingsError
from runtime.settings import Settings

if TYPE_CHECKING:
    from runtime.llm.offline import OfflineServer

log = structlog.get_logger(__name__)


@dataclasses.dataclass(eq=False)
class ModelClient:
    """The SDK client a worker owns, and the offline server behind it when there is no key."""

    client: anthropic.AsyncAnthropic
    offline: bool
    server: OfflineServer | None = None
    _closed: bool = dataclasses.field(default=False, init=False)

    async def aclose(self) -> None:
        """Close the client, then stop the offline server; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.client.close()
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)


async def open_client(settings: Settings) -> ModelClient:
    """The production client with ``ANTHROPIC_API_KEY``, else one aimed at a local offline model."""
    if settings.anthropic_api_key:
        client = anthropic.AsyncAnthropic(
            api_key=settings.anthropic_api_key, max_retries=0, timeout=settings.llm_timeout
        )
        log.info("llm.client", mode="anthropic", base_url=str(client.base_url))
        return ModelClient(client, offline=False)
    from runtime.llm.offline import OfflineServer

    server = OfflineServer()
    await asyncio.to_thread(server.start)
    client = anthropic.AsyncAnthropic(
        api_key="offline", base_url=server.base_url, max_retries=0, timeout=settings.llm_timeout
    )
    log.warning(
        "llm.client",
        mode="offline",
        base_url=server.base_url,
        note="no ANTHROPIC_API_KEY: answers come from the deterministic offline model",
    )
    return ModelClient(client, offline=True, server=server)


@asynccontextmanager
async def model_client(settings: Settings) -> AsyncIterator[ModelClient]:
    """``async with model_client(settings) as mc: LLM(mc.client, settings, offline=mc.offline)``."""
    mc = await open_client(settings)
    try:
        yield mc
    finally:
        await mc.aclose()


def model_for(settings: Settings, tier: str) -> str:
    """The model id of a tier (``fast``, ``smart``, ...)."""
    try:
        return settings.models[tier]
    except KeyError:
        raise SettingsError(
            "AGENTRT_MODELS", f"no model for tier {tier!r} (tiers: {sorted(settings.models)})"
        ) from None
