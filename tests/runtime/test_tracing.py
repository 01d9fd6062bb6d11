"""One run, one trace: webhook span -> activation spans -> step spans, carried through the
stream entries and the log's ``trace`` column; and the OTLP set-up of a process."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from runtime import Agent, Context, Event, ToolContext, tool
from runtime.events.model import RecordedEvent
from runtime.llm.calls import LLM
from runtime.llm.client import model_client
from runtime.log.queries import LogQueries
from runtime.log.store import EventLog
from runtime.ops.tracing import ROOT, parent_from
from runtime.settings import Settings
from runtime.streams.keys import ingress_stream
from runtime.worker.delivery import Delivery
from runtime.worker.relay import Relay
from runtime.worker.worker import Worker
from tests.support.runtime import db_url, fast_options, wait_for
from tests.support.servers import Servers
from tests.support.webhooks import SECRET, ingress, standard_headers
from webhooks.config import IngressConfig, SourceConfig, WebhooksConfig
from webhooks.events import EmailReceived

PARTITIONS = 2


class _Gate(SimpleSpanProcessor):
    """Exports only while a test of this module listens: the provider is process-wide and
    outlives the module (OpenTelemetry sets it once), the other tests' spans are dropped."""

    active = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            super().on_end(span)


_EXPORTER = InMemorySpanExporter()
_GATE = _Gate(_EXPORTER)


def _install() -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if _GATE not in provider._active_span_processor._span_processors:
        provider.add_span_processor(_GATE)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK with an in-memory exporter, listening for this test."""
    _install()
    _EXPORTER.clear()
    _GATE.active = True
    try:
        yield _EXPORTER
    finally:
        _GATE.active = False
        _EXPORTER.clear()


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[LLM]:
    async with model_client(settings) as mc:
        assert mc.offline
        yield LLM(mc.client, settings, offline=True)


def _config() -> WebhooksConfig:
    source = {"format": "postmark", "auth": "standard", "secrets": [SECRET]}
    return WebhooksConfig(
        ingress=IngressConfig(partitions=PARTITIONS),
        sources={"support": msgspec.convert(source, SourceConfig)},
    )


def _email() -> bytes:
    """A Postmark inbound webhook, as Postmark posts it (a message id of its own)."""
    sender, text = "ada@example.com", "My card was charged twice for invoice 1042."
    return msgspec.json.encode({
        "FromName": "Ada Lovelace", "From": sender,
        "FromFull": {"Email": sender, "Name": "Ada Lovelace", "MailboxHash": ""},
        "To": "support@agentrt.example",
        "ToFull": [{"Email": "support@agentrt.example", "Name": "", "MailboxHash": ""}],
        "Subject": "Invoice 1042 charged twice?", "MessageID": f"trace-{uuid.uuid4()}",
        "Date": "Sun, 29 Nov 2026 10:00:00 +0000", "TextBody": text, "HtmlBody": "",
        "Headers": [], "Attachments": [],
    })  # fmt: skip


# A model step and a tool step, then an event that starts the second agent (via the relay).


class Classified(Event, tag="trace_test.classified"):
    message_id: str
    label: str
    plan: str


class Replied(Event, tag="trace_test.replied"):
    message_id: str
    text: str


@tool
async def lookup_plan(ctx: ToolContext, email: str) -> str:
    """The customer's plan (a stand-in for a CRM call)."""
    return "business" if email.endswith("@example.com") else "none"


class Reader(Agent):
    name = "reader"
    subscribes = (EmailReceived,)
    tier = "fast"
    tools = (lookup_plan,)

    async def handle(self, event: EmailReceived, ctx: Context) -> None:
        answer = await ctx.llm(f"Subject: {event.subject}\n\n{event.text}", tools=[])
        plan = await ctx.tool(lookup_plan, email=event.sender.email)
        ctx.emit(Classified(message_id=event.message_id, label=answer.text[:40], plan=plan))


class Replier(Agent):
    name = "replier"
    subscribes = (Classified,)
    reads_ingress = False
    tier = "smart"

    async def handle(self, event: Classified, ctx: Context) -> None:
        draft = await ctx.llm(f"Reply to a {event.plan} customer about: {event.label}")
        ctx.emit(Replied(message_id=event.message_id, text=draft.text[:200]))


AGENTS: Sequence[Agent] = (Reader(), Replier())


class FreshRootWorker(Worker):
    """BROKEN on purpose: each activation starts a trace of its own instead of continuing
    the one its event carries."""

    @staticmethod
    def _trace_parent(d: Delivery) -> TraceContext:
        return ROOT


@contextlib.asynccontextmanager
async def _pipeline(
    redis_url: str, redis: aioredis.Redis, log: EventLog, llm: LLM, worker_class: type[Worker]
) -> AsyncIterator[httpx.AsyncClient]:
    """The ingress (in this process), a worker of ``worker_class`` and the relay."""
    agents = AGENTS
    worker = worker_class(agents, redis=redis, log=log, llm=llm,
                          options=fast_options(partitions=PARTITIONS))  # fmt: skip
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(worker.run(stop)),
        asyncio.create_task(Relay(log, redis, agents, poll_interval=0.05).run(stop)),
    ]
    try:
        await worker.setup()
        async with ingress(redis_url, _config()) as client:
            yield client
    finally:
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result


async def _run_one(
    servers: Servers,
    redis: aioredis.Redis,
    log: EventLog,
    llm: LLM,
    spans: InMemorySpanExporter,
    worker_class: type[Worker] = Worker,
) -> tuple[uuid.UUID, list[RecordedEvent]]:
    """Post one signed email; wait for reader and replier to commit and their spans to end."""
    async with _pipeline(db_url(servers.redis_url), redis, log, llm, worker_class) as client:
        body = _email()
        response = await client.post("/webhooks/support", content=body,
                                     headers=standard_headers(body))  # fmt: skip
        assert response.status_code == 202, response.text
        run_id = uuid.UUID(response.json()["event_id"])
        queries = LogQueries(log)

        async def handled() -> bool:
            return await queries.activations_handled([run_id]) >= 2

        def activation_spans() -> list[ReadableSpan]:
            return [s for s in spans.get_finished_spans() if s.name.startswith("activation ")]

        async def spans_ended() -> bool:
            return len(activation_spans()) >= 2

        await wait_for(handled, 60, "reader and replier to commit")
        await wait_for(spans_ended, 30, "both activation spans to end")
    return run_id, await log.read_run(run_id)


def local_root(span: ReadableSpan, finished: Sequence[ReadableSpan]) -> ReadableSpan:
    """The first span of ``span``'s ancestry that this process recorded."""
    by_id = {s.context.span_id: s for s in finished}
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
    return span


def check_tree(finished: Sequence[ReadableSpan], events: Sequence[RecordedEvent]) -> None:
    """The run is one trace, shaped webhook -> activations -> steps; its events name its spans."""
    by_id = {s.context.span_id: s for s in finished}

    def parent(s: ReadableSpan) -> ReadableSpan | None:
        return by_id.get(s.parent.span_id) if s.parent is not None else None

    trace_ids = {s.context.trace_id for s in finished}
    assert len(trace_ids) == 1, f"one trace for the whole run, not {len(trace_ids)}"
    (root,) = [s for s in finished if s.parent is None]
    (webhook,) = [s for s in finished if s.name == "webhook support"]
    assert local_root(webhook, finished) is root, "the webhook's span begins the run's trace"
    if webhook is not root:  # then under the server's span of the request (FastAPI's)
        assert root.kind == SpanKind.SERVER
        assert root.attributes and root.attributes["http.route"] == "/webhooks/{source}"
    trace_id = root.context.trace_id

    (reader,) = [s for s in finished if s.name == "activation reader"]
    (replier,) = [s for s in finished if s.name == "activation replier"]
    assert parent(reader) is webhook
    assert parent(replier) is reader, "the emitted event carried the trace to the next agent"

    steps = [s for s in finished if s.attributes and "agentrt.step" in s.attributes]
    under = {
        a.name: sorted(str(s.attributes["agentrt.step.kind"]) for s in steps if parent(s) is a)
        for a in (reader, replier)
    }
    assert under == {"activation reader": ["llm", "tool"], "activation replier": ["llm"]}
    assert all(parent(s) in (reader, replier) for s in steps)
    model_steps = [s for s in steps if s.attributes["agentrt.step.kind"] == "llm"]
    assert all(s.attributes["gen_ai.usage.output_tokens"] for s in model_steps)
    # The model SDK's own spans (one per API call) nest under their step's.
    calls = [s for s in finished if s.kind == SpanKind.CLIENT]
    assert calls, "the Anthropic SDK made no span"
    assert sorted(id(parent(c)) for c in calls) == sorted(id(s) for s in model_steps)

    # The log: every event of the run names a span of this trace, the one that produced it.
    spans_of = {s.context.span_id: s for s in finished}
    assert events
    for e in events:
        assert e.trace is not None, f"{e.event_type} has no trace"
        ctx = trace.get_current_span(parent_from(e.trace)).get_span_context()
        assert ctx.is_valid and ctx.trace_id == trace_id, f"{e.event_type}: {e.trace}"
        producer = spans_of.get(ctx.span_id)
        assert producer is not None, f"{e.event_type} names no span of the run"
        if e.event_type == "email.received":
            assert producer is webhook
        elif e.event_type == "step.recorded":
            assert producer in steps
            assert producer.attributes["agentrt.step"] == e.body.step
        else:  # emitted, activation.completed: the activation's
            assert producer is (reader if e.producer == "reader" else replier), e.event_type


async def test_a_run_is_one_trace_from_webhook_to_the_next_agent(
    servers: Servers,
    redis: aioredis.Redis,
    log: EventLog,
    llm: LLM,
    spans: InMemorySpanExporter,
) -> None:
    _, events = await _run_one(servers, redis, log, llm, spans)
    assert {e.event_type for e in events} >= {
        "email.received", "step.recorded", "trace_test.classified", "trace_test.replied",
        "activation.completed",
    }  # fmt: skip
    check_tree(spans.get_finished_spans(), events)


async def test_a_worker_that_drops_the_context_fails_the_tree(
    servers: Servers,
    redis: aioredis.Redis,
    log: EventLog,
    llm: LLM,
    spans: InMemorySpanExporter,
) -> None:
    _, events = await _run_one(servers, redis, log, llm, spans, FreshRootWorker)
    with pytest.raises(AssertionError, match="one trace for the whole run"):
        check_tree(spans.get_finished_spans(), events)


# -- the ingress: a sender's trace context ----------------------------------------------

SENDER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SENDER_SPAN = "00f067aa0ba902b7"


def _ids(traceparent: str) -> tuple[int, int]:
    """The trace and span ids a traceparent names (it must name some)."""
    ctx = trace.get_current_span(parent_from(traceparent)).get_span_context()
    assert ctx.is_valid, traceparent
    return ctx.trace_id, ctx.span_id


async def _post_with(redis: aioredis.Redis, servers: Servers, headers: dict[str, str]) -> str:
    """Post one email with extra headers; the traceparent on its stream entry."""
    async with ingress(db_url(servers.redis_url), _config()) as client:
        body = _email()
        response = await client.post("/webhooks/support", content=body,
                                     headers={**standard_headers(body), **headers})  # fmt: skip
        assert response.status_code == 202, response.text
    entries = [f for p in range(PARTITIONS) for _, f in await redis.xrange(ingress_stream(p))]
    (entry,) = entries
    return str(entry[b"traceparent"].decode())


async def test_a_webhook_with_a_traceparent_continues_that_trace(
    servers: Servers, redis: aioredis.Redis, spans: InMemorySpanExporter
) -> None:
    sent = f"00-{SENDER_TRACE}-{SENDER_SPAN}-01"
    on_entry = await _post_with(redis, servers, {"traceparent": sent})
    finished = spans.get_finished_spans()
    (webhook,) = [s for s in finished if s.name == "webhook support"]
    assert {format(s.context.trace_id, "032x") for s in finished} == {SENDER_TRACE}
    first = local_root(webhook, finished)  # FastAPI's span of the request, or the webhook's
    assert first.parent is not None and format(first.parent.span_id, "016x") == SENDER_SPAN
    assert first.parent.is_remote
    # The entry names the webhook's span, in the sender's trace.
    assert _ids(on_entry) == (int(SENDER_TRACE, 16), webhook.context.span_id)


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        f"00-{'0' * 32}-{SENDER_SPAN}-01",  # the all-zero trace id is invalid
        f"00-{SENDER_TRACE}-{'0' * 16}-01",  # so is the all-zero span id
        f"ff-{SENDER_TRACE}-{SENDER_SPAN}-01",  # version ff is forbidden
        f"00-{SENDER_TRACE[:-1]}-{SENDER_SPAN}-01",
    ],
)
async def test_a_malformed_traceparent_is_ignored_and_starts_a_trace(
    servers: Servers, redis: aioredis.Redis, spans: InMemorySpanExporter, bad: str
) -> None:
    on_entry = await _post_with(redis, servers, {"traceparent": bad})
    finished = spans.get_finished_spans()
    (webhook,) = [s for s in finished if s.name == "webhook support"]
    assert local_root(webhook, finished).parent is None
    trace_id = format(webhook.context.trace_id, "032x")
    assert trace_id != SENDER_TRACE and trace_id != "0" * 32
    assert _ids(on_entry) == (webhook.context.trace_id, webhook.context.span_id)


# -- a process's set-up -----------------------------------------------------------------


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def test_without_the_endpoint_tracing_stays_off_and_passes_a_trace_through() -> None:
    """No SDK set up: the API's no-op tracer, which keeps an incoming trace context (so an
    event relayed by a process without tracing still continues its trace) and makes none."""
    result = _python(
        f"""
        from opentelemetry import trace
        from runtime.ops.tracing import ROOT, configure_tracing, current_traceparent, parent_from
        from runtime.ops.tracing import span, tracer
        assert configure_tracing("agentrt-test") is False
        assert not type(trace.get_tracer_provider()).__module__.startswith("opentelemetry.sdk")
        sent = "00-{SENDER_TRACE}-{SENDER_SPAN}-01"
        # span() without a provider (what the runtime uses) does what the API's no-op
        # tracer does, cheaper: the incoming context passes through, nothing is made.
        for start in (span, tracer.start_as_current_span):
            with start("activation", context=parent_from(sent)):
                with start("step") as inner:
                    assert not inner.is_recording()
                    assert current_traceparent() == sent, current_traceparent()
            assert current_traceparent() is None
            with start("activation", context=ROOT):
                assert current_traceparent() is None
        print("ok")
        """,
        _clean_env(),
    )
    assert result.stdout.strip() == "ok"


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length", "0"))
        self.received.append((self.path, self.rfile.read(size)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_with_the_endpoint_spans_are_exported_over_otlp() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT set: configure_tracing exports (here to a collector of
    the test's own on loopback); the batch is flushed when the process exits."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            **_clean_env(),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        }
        _python(
            """
            from runtime.ops.tracing import configure_tracing, current_traceparent, tracer
            assert configure_tracing("agentrt-probe-service") is True
            assert configure_tracing("agentrt-probe-service") is True  # once is enough
            with tracer.start_as_current_span("probe-span"):
                assert current_traceparent() is not None
            """,
            env,
        )
        deadline = time.monotonic() + 10
        while not _Collector.received and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()
    ((path, payload),) = _Collector.received
    assert path == "/v1/traces"
    assert b"agentrt-probe-service" in payload and b"probe-span" in payload
