"""The offline model: a local, deterministic server speaking the Anthropic Messages API.

With no ``ANTHROPIC_API_KEY`` the runtime points the real ``anthropic`` SDK at this
server (``base_url``), so the production code path runs unchanged in demos and
tests: the SDK builds real HTTP requests, this server answers with real Messages
API bodies, and the SDK parses them, retries them and raises its own exceptions.
It is a small rule-based model, not a mock: nothing is scripted per test, the
same request always gets the byte-identical answer, and every answer is visibly
labelled offline.

The package, by concern (each module documents its part):

- ``model``: ``OfflineModel``, the answer rules, output limits and offline marks;
- ``schemas``: tool inputs and JSON instances generated from a JSON schema;
- ``validation``: ``validate_request``, the API's 400 ``invalid_request_error`` checks;
- ``faults``: ``Fault`` / ``FaultQueue`` injection and the ``RequestLog``;
- ``server``: ``create_app`` (FastAPI), ``OfflineServer`` (embedded uvicorn), ``serve``
  and ``main`` (``python -m runtime.llm.offline [--host H] [--port N]``);
- ``common``: the constants and text helpers they share.

``server`` (FastAPI, uvicorn) is imported on first use of one of its names, so the
model, its rules and the constants load without the web stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtime.llm.offline.common import (
    DEFAULT_PORT,
    OFFLINE_HEADER,
    OFFLINE_MESSAGE_PREFIX,
    OFFLINE_TEXT_PREFIX,
    OFFLINE_TOOL_USE_PREFIX,
    is_offline_message,
    strip_offline_marker,
)
from runtime.llm.offline.faults import Fault, FaultKind, FaultQueue, RecordedRequest, RequestLog
from runtime.llm.offline.model import OfflineModel, count_input_tokens
from runtime.llm.offline.schemas import instance_for_schema
from runtime.llm.offline.validation import InvalidRequestError, validate_request
from runtime.llm.tokens import CHARS_PER_TOKEN, estimate_tokens

if TYPE_CHECKING:
    from runtime.llm.offline.server import OfflineServer, create_app, main, serve

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_PORT",
    "OFFLINE_HEADER",
    "OFFLINE_MESSAGE_PREFIX",
    "OFFLINE_TEXT_PREFIX",
    "OFFLINE_TOOL_USE_PREFIX",
    "Fault",
    "FaultKind",
    "FaultQueue",
    "InvalidRequestError",
    "OfflineModel",
    "OfflineServer",
    "RecordedRequest",
    "RequestLog",
    "count_input_tokens",
    "create_app",
    "estimate_tokens",
    "instance_for_schema",
    "is_offline_message",
    "main",
    "serve",
    "strip_offline_marker",
    "validate_request",
]

# Served by ``server``, which imports FastAPI and uvicorn: loaded on first access.
_SERVER_NAMES = frozenset({"OfflineServer", "create_app", "main", "serve"})


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        value = getattr(importlib.import_module("runtime.llm.offline.server"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SERVER_NAMES)
