"""OpenTelemetry spans, and the W3C trace context that makes one run one trace.

A run's trace goes: the webhook's span (``webhook <source>``), its
``traceparent`` on the ingress stream entry and in the ``trace`` column of the
trigger event, the activation's span (its child), the spans of the steps the
activation executes, and through an emitted event (its ``trace`` in the log,
then the ``traceparent`` field the relay writes on the subscriber's stream
entry) the next agent's activation.

Spans go through the OpenTelemetry API only. Without a configured SDK nothing
is recorded and :func:`span` only makes its parent context current (about a
microsecond), so a ``traceparent`` that came in is passed on unchanged: a trace
started upstream survives a process without the SDK.
:func:`configure_tracing` sets the SDK up, once per process, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the ``otel`` extra is installed.

The trace context is read and written with OpenTelemetry's W3C propagator, not
parsed here: a malformed ``traceparent`` (a sender's, a hand-written stream
entry's) is ignored and its span starts a trace of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

__all__ = [
    "ROOT",
    "add_trace_ids",
    "configure_tracing",
    "current_traceparent",
    "parent_from",
    "request_parent",
    "span",
    "traceparent_in",
    "tracer",
]

log = structlog.get_logger(__name__)

#: agentrt's tracer. A proxy: spans go to the provider set when they start (by
#: :func:`configure_tracing`, or a test's), else to the API's no-op tracer.
tracer = trace.get_tracer("agentrt")

#: The parent of a span that begins a trace of its own, whatever span the
#: calling task happens to be in (a worker's tasks inherit their starter's context).
ROOT = Context()

#: The stream field and the log column hold exactly a W3C ``traceparent``
#: (whatever OTEL_PROPAGATORS says), so they are read and written with this one.
_W3C = TraceContextTextMapPropagator()

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_configured: str | None = None


def span(
    name: str,
    *,
    context: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes = None,
    record_exception: bool = True,
    set_status_on_exception: bool = True,
) -> AbstractContextManager[Span]:
    """``tracer.start_as_current_span(...)``; with no tracer provider set, only ``context``
    made current (what the no-op tracer does too: an incoming trace passes through), at
    a tenth of its cost: a no-op span is two generator context managers deep."""
    if isinstance(trace.get_tracer_provider(), _OFF):
        return _Passthrough(context)
    return tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=attributes,
        record_exception=record_exception, set_status_on_exception=set_status_on_exception,
    )  # fmt: skip


_OFF = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


class _Passthrough:
    """A span that is not one: ``context`` (if given) is current inside, as the no-op
    tracer's span would make it; the span inside is the one that context holds."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: Context | None) -> None:
        self._context = context
        self._token: object = None

    def __enter__(self) -> Span:
        if self._context is None:
            return trace.get_current_span()
        self._token = otel_context.attach(self._context)
        return trace.get_current_span(self._context)

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span; None when there is no trace."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def traceparent_in(context: Context) -> str | None:
    """The W3C ``traceparent`` of the span ``context`` holds; None when it holds none
    (so a malformed ``traceparent`` read through :func:`parent_from` comes back None)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier.get("traceparent")


def parent_from(traceparent: str | bytes | None) -> Context:
    """The context a span continuing ``traceparent`` starts in; :data:`ROOT` (a trace of
    its own) for none or a malformed one."""
    if not traceparent:
        return ROOT
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    return _W3C.extract({"traceparent": traceparent}, context=ROOT)


def request_parent(headers: Mapping[str, str]) -> Context | None:
    """Where a request's own span goes: under the server's span of the request when the
    web framework made one (FastAPI does, from its headers); else under the context the
    headers carry (the configured propagators, W3C ``traceparent`` by default), or at the
    root of a trace when they carry none, or a malformed one. None: the current context."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    return propagate.extract(headers, context=ROOT)


def add_trace_ids(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` on lines written inside a span."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def configure_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Export this process's spans over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

    Called at the start of ``agentrt serve`` (each uvicorn worker), ``worker`` and
    ``relay`` (so in ``agentrt up``'s children too). Sets a ``TracerProvider`` (resource from
    ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, else ``service_name``)
    with a ``BatchSpanProcessor`` and the OTLP/HTTP exporter, which reads the
    standard ``OTEL_EXPORTER_OTLP_*`` variables itself. The libraries that trace
    through the global provider then export too: the Anthropic SDK's span of each
    API call (under its model step's span) and FastAPI's span of each request
    (the parent of the webhook's span).

    A no-op returning False without the variable, with ``OTEL_SDK_DISABLED=true``,
    or without the ``otel`` extra (a warning names it). A second call does nothing.
    """
    global _configured
    env = os.environ if environ is None else environ
    endpoint = next((env[v] for v in _ENDPOINT_VARS if env.get(v)), None)
    if endpoint is None or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if _configured is not None:
        return True
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "tracing.sdk_missing",
            error=str(exc),
            hint="OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not "
            "installed: pip install 'agentrt[otel]'",
        )
        return False
    # Resource.create lets explicit attributes win over the environment's: name the
    # service only when the environment does not.
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = service_name
    log.info("tracing.enabled", service=service_name, endpoint=endpoint)
    return True
