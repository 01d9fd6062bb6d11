"""Fault injection and the request log the offline server keeps (both thread-safe)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import msgspec

__all__ = ["Fault", "FaultKind", "FaultQueue", "RecordedRequest", "RequestLog"]


FaultKind = Literal[
    "rate_limit",
    "overloaded",
    "server_error",
    "conflict",
    "bad_request",
    "slow",
    "malformed_tool_input",
]


class Fault(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One injected fault, consumed by one ``/v1/messages`` request.

    ``model`` restricts it to requests for that model; ``retry_after`` (seconds) sets the
    ``retry-after`` header (default 1 for ``rate_limit``); ``seconds`` is the delay of
    ``slow``; ``message`` overrides the error message; ``should_retry`` sets the
    ``x-should-retry`` header (``true``/``false``) on an error fault's answer.
    """

    kind: FaultKind
    model: str | None = None
    retry_after: float | None = None
    seconds: float = 1.0
    message: str | None = None
    should_retry: bool | None = None


class FaultQueue:
    """A thread-safe FIFO of faults; ``take(model)`` pops the first one that applies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def push(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def extend(self, faults: Sequence[Fault]) -> None:
        self.push(*faults)

    def take(self, model: str | None) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.model is None or fault.model == model:
                    return self._faults.pop(i)
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> int:
        with self._lock:
            count = len(self._faults)
            self._faults.clear()
            return count

    def __len__(self) -> int:
        with self._lock:
            return len(self._faults)


class RecordedRequest(msgspec.Struct):
    """A request the server received: ``status`` is 0 until it is answered."""

    seq: int
    method: str
    path: str
    model: str | None
    body: Any
    status: int = 0
    fault: str | None = None
    #: Wall-clock time (``time.time()``) it arrived.
    received_at: float = 0.0


class RequestLog:
    """Every ``/v1/...`` request received, in order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[RecordedRequest] = []
        self._seq = 0

    def record(self, method: str, path: str, body: Any) -> RecordedRequest:
        model = body.get("model") if isinstance(body, dict) else None
        with self._lock:
            self._seq += 1
            item = RecordedRequest(
                self._seq,
                method,
                path,
                model if isinstance(model, str) else None,
                body,
                received_at=time.time(),
            )
            self._items.append(item)
            return item

    def all(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._items)

    def messages(self) -> list[RecordedRequest]:
        """Only the ``POST /v1/messages`` calls (the model calls)."""
        return [r for r in self.all() if r.path == "/v1/messages"]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __iter__(self) -> Iterator[RecordedRequest]:
        return iter(self.all())

    def __getitem__(self, index: int) -> RecordedRequest:
        with self._lock:
            return self._items[index]
