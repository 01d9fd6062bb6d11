"""The offline model over HTTP: the FastAPI app, the embedded uvicorn server, the CLI.

The server (``create_app`` / ``OfflineServer`` / ``serve``):

- ``POST /v1/messages``: validates the body like the API (``400
  invalid_request_error`` naming the field, e.g. ``max_tokens: Field
  required``; tool_use / tool_result pairing is checked too), requires an
  ``x-api-key`` (any value) or ``authorization`` header (``401
  authentication_error``). ``stream: true`` is served as server-sent events
  (``message_start``, ``ping``, ``content_block_start`` / ``_delta`` /
  ``_stop``, ``message_delta``, ``message_stop``) that accumulate to the same
  message as the non-streaming answer.
- ``POST /v1/messages/count_tokens``: ``{"input_tokens": n}``.
- ``GET /healthz``.
- Errors use the API's shape ``{"type": "error", "error": {"type", "message"},
  "request_id"}`` with a ``request-id`` header.
- Fault injection, for tests: a queue consumed one fault per ``/v1/messages``
  request (a fault with ``model`` set waits for a request for that model), set
  in-process (``server.faults.push(Fault("rate_limit", retry_after=2))``) or
  over HTTP (``POST /_offline/faults`` with a JSON list or object,
  ``GET`` / ``DELETE /_offline/faults``). Kinds: ``rate_limit`` (429
  ``rate_limit_error`` with ``retry-after``, default 1 s), ``overloaded`` (529
  ``overloaded_error``), ``server_error`` (500 ``api_error``), ``conflict`` (409
  ``api_error``, which the SDK retries as a lock timeout), ``bad_request`` (400
  ``invalid_request_error``), each with ``x-should-retry`` when the fault's
  ``should_retry`` is set, ``slow`` (sleep
  ``seconds``, default 1, then answer; abandoned if the client disconnects),
  ``malformed_tool_input`` (a tool-use block whose input breaks the tool's
  schema: the first required property is left out, else the first property
  gets the wrong type; needs tools in the request, else the answer is normal).
  The auth check comes before faults; faults come before body validation.
- Every ``/v1/...`` request is recorded (``server.requests``, ``GET`` /
  ``DELETE /_offline/requests``) with its body, status and fault, so tests can
  count model calls.

The installed SDK maps statuses to exceptions as: 400 ``BadRequestError``, 401
``AuthenticationError``, 429 ``RateLimitError``, 500 ``InternalServerError``,
529 ``OverloadedError`` (a subclass of ``InternalServerError``), a read timeout
``APITimeoutError``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import httpx
import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.llm.offline.common import DEFAULT_PORT, JSON, OFFLINE_HEADER, _digest
from runtime.llm.offline.faults import Fault, FaultQueue, RecordedRequest, RequestLog
from runtime.llm.offline.model import OfflineModel, _canonical_json, count_input_tokens
from runtime.llm.offline.validation import InvalidRequestError, validate_request

__all__ = ["OfflineServer", "create_app", "main", "serve"]


_ENCODER = msgspec.json.Encoder()


def _headers(request_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {OFFLINE_HEADER: "true", "request-id": request_id, **(extra or {})}


#: The error faults other than ``rate_limit``: status, error type, default message.
_FAULT_ERRORS: dict[str, tuple[int, str, str]] = {
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server_error": (500, "api_error", "Internal server error"),
    "conflict": (409, "api_error", "Lock timeout"),
    "bad_request": (400, "invalid_request_error", "Bad request"),
}


def _error(
    status: int, kind: str, message: str, request_id: str, extra: Mapping[str, str] | None = None
) -> Response:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return Response(
        _ENCODER.encode(body), status, _headers(request_id, extra), media_type="application/json"
    )


def _json(value: Any, request_id: str = "", status: int = 200) -> Response:
    return Response(
        _ENCODER.encode(value),
        status,
        {OFFLINE_HEADER: "true", **({"request-id": request_id} if request_id else {})},
        media_type="application/json",
    )


def _sse(message: JSON) -> Iterator[bytes]:
    """The stream of events that accumulates to ``message``."""

    def event(kind: str, data: JSON) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + _ENCODER.encode(data) + b"\n\n"

    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 1},
    }
    yield event("message_start", {"type": "message_start", "message": start})
    yield event("ping", {"type": "ping"})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            empty: JSON = {"type": "text", "text": ""}
            pieces = re.findall(r"(?:\S+\s*){1,4}|\s+", block["text"])
            deltas = [{"type": "text_delta", "text": p} for p in pieces]
        else:
            empty = {**block, "input": {}}
            raw = _canonical_json(block["input"])
            half = len(raw) // 2
            deltas = [
                {"type": "input_json_delta", "partial_json": p} for p in (raw[:half], raw[half:])
            ]
        yield event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": empty},
        )
        for delta in deltas:
            yield event(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": message["stop_reason"],
                "stop_sequence": message["stop_sequence"],
            },
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        },
    )
    yield event("message_stop", {"type": "message_stop"})


def create_app(
    model: OfflineModel | None = None,
    faults: FaultQueue | None = None,
    requests: RequestLog | None = None,
    stopping: threading.Event | None = None,
) -> FastAPI:
    """The ASGI app of the offline model (routes in the module docstring)."""
    model = model or OfflineModel()
    faults = faults if faults is not None else FaultQueue()
    requests = requests if requests is not None else RequestLog()
    stopping = stopping or threading.Event()
    app = FastAPI(title="agentrt offline model", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.faults = faults
    app.state.requests = requests
    app.state.model = model

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(
            exc.status_code, kind, str(exc.detail), "req_offline_" + _digest(str(request.url))
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok", "offline": True})

    async def accept(request: Request) -> tuple[RecordedRequest, str, Any, Response | None]:
        raw = await request.body()
        body: Any = None
        problem: str | None = None
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError as exc:
            problem = f"Request body is not valid JSON: {exc}"
        record = requests.record(request.method, request.url.path, body)
        request_id = f"req_offline_{record.seq:06d}_{_digest(raw.decode(errors='replace'))[:12]}"
        if not (request.headers.get("x-api-key") or request.headers.get("authorization")):
            return (
                record,
                request_id,
                body,
                _error(401, "authentication_error", "x-api-key header is required", request_id),
            )
        if problem is not None:
            return (
                record,
                request_id,
                body,
                _error(400, "invalid_request_error", problem, request_id),
            )
        return record, request_id, body, None

    def finish(record: RecordedRequest, response: Response) -> Response:
        record.status = response.status_code
        return response

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        record, request_id, body, refused = await accept(request)
        if refused is not None and refused.status_code == 401:
            return finish(record, refused)
        fault = faults.take(record.model)
        malformed = False
        if fault is not None:
            record.fault = fault.kind
            extra: dict[str, str] = {}
            if fault.should_retry is not None:
                extra["x-should-retry"] = "true" if fault.should_retry else "false"
            if fault.kind == "rate_limit":
                after = fault.retry_after if fault.retry_after is not None else 1
                return finish(
                    record,
                    _error(
                        429,
                        "rate_limit_error",
                        fault.message
                        or "Number of requests has exceeded your rate limit (offline fault)",
                        request_id,
                        {**extra, "retry-after": f"{after:g}"},
                    ),
                )
            if fault.retry_after is not None:
                extra["retry-after"] = f"{fault.retry_after:g}"
            if fault.kind in _FAULT_ERRORS:
                status, kind, text = _FAULT_ERRORS[fault.kind]
                return finish(
                    record,
                    _error(
                        status,
                        kind,
                        fault.message or f"{text} (offline fault)",
                        request_id,
                        extra or None,
                    ),
                )
            if fault.kind == "slow":
                deadline = time.monotonic() + fault.seconds
                while (left := deadline - time.monotonic()) > 0:
                    await asyncio.sleep(min(0.05, left))
                    if stopping.is_set() or await request.is_disconnected():
                        return finish(
                            record, _error(499, "api_error", "client went away", request_id)
                        )
            malformed = fault.kind == "malformed_tool_input"
        if refused is not None:
            return finish(record, refused)
        try:
            message = model.respond(body, malformed_tool_input=malformed)
        except InvalidRequestError as exc:
            return finish(record, _error(400, "invalid_request_error", str(exc), request_id))
        if body.get("stream"):
            record.status = 200
            return StreamingResponse(
                _aiter(list(_sse(message))),
                media_type="text/event-stream",
                headers=_headers(request_id),
            )
        return finish(record, _json(message, request_id))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        record, request_id, body, refused = await accept(request)
        if refused is not None:
            return finish(record, refused)
        try:
            validate_request(body, count_tokens=True)
        except InvalidRequestError as exc:
            return finish(record, _error(400, "invalid_request_error", str(exc), request_id))
        return finish(record, _json({"input_tokens": count_input_tokens(body)}, request_id))

    @app.get("/_offline/faults")
    async def list_faults() -> Response:
        return _json(msgspec.to_builtins(faults.pending()))

    @app.post("/_offline/faults")
    async def push_faults(request: Request) -> Response:
        raw = await request.body()
        try:
            value = msgspec.json.decode(raw, type=list[Fault] | Fault)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _error(400, "invalid_request_error", f"faults: {exc}", "req_offline_faults")
        new = value if isinstance(value, list) else [value]
        faults.extend(new)
        return _json({"queued": len(new), "pending": len(faults)})

    @app.delete("/_offline/faults")
    async def clear_faults() -> Response:
        return _json({"cleared": faults.clear()})

    @app.get("/_offline/requests")
    async def list_requests() -> Response:
        return _json(msgspec.to_builtins(requests.all()))

    @app.delete("/_offline/requests")
    async def clear_requests() -> Response:
        requests.clear()
        return _json({"cleared": True})

    return app


def _uvicorn_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        loop="asyncio",
        ws="none",
        lifespan="off",
        timeout_graceful_shutdown=2,
    )


class OfflineServer:
    """The offline model served by uvicorn on 127.0.0.1 in a background thread.

    Use as ``with OfflineServer() as server:`` or ``async with OfflineServer() as server:``;
    then point the SDK at ``server.base_url``. ``faults`` and ``requests`` are shared with
    the running app. Signal handlers are not installed (uvicorn only installs them on the
    main thread; the server runs on its own).
    """

    def __init__(
        self, model: OfflineModel | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.model = model or OfflineModel()
        self.host = host
        self.port = port
        self.faults = FaultQueue()
        self.requests = RequestLog()
        self._stopping = threading.Event()
        self.app = create_app(self.model, self.faults, self.requests, self._stopping)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Bind, serve in a thread, and return once ``/healthz`` answers."""
        if self._thread is not None:
            raise RuntimeError("the offline model server is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self._stopping.clear()
        self._failure = None
        server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port))
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # reported by start()/stop(), not lost in the thread
                self._failure = exc

        self._thread = threading.Thread(target=run, name=f"offline-model-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                failure = self._failure
                self.stop()
                raise RuntimeError(f"the offline model server did not start: {failure!r}")
            time.sleep(0.01)
        with httpx.Client(timeout=timeout) as client:
            client.get(f"{self.base_url}/healthz").raise_for_status()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end slow faults in flight, join the thread, close the socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> OfflineServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> OfflineServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def serve(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> None:
    """Serve the offline model in the foreground until interrupted (``agentrt offline-model``)."""
    server = uvicorn.Server(_uvicorn_config(create_app(), host, port))
    server.run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.llm.offline [--host H] [--port N]``."""
    parser = argparse.ArgumentParser(
        prog="agentrt offline-model",
        description="Serve the deterministic offline model (Anthropic Messages API).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    print(f"offline model (Anthropic Messages API) on http://{args.host}:{args.port}", flush=True)
    serve(args.port, args.host)
    return 0


async def _aiter(items: Sequence[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item
