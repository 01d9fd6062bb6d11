"""structlog set-up: context variables on every line, console or JSON output, stdlib included."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from runtime.ops.tracing import add_trace_ids


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    """Route structlog and stdlib logging to stderr at ``level``, rendered alike.

    Every line carries the context bound with
    ``structlog.contextvars.bound_contextvars`` (run id, event id, causation
    id while an event is handled) and, inside an OpenTelemetry span, its
    ``trace_id`` and ``span_id``. The stdlib's records (uvicorn's, the
    libraries') go through the same processors and renderer, by a
    ``ProcessorFormatter`` on the root logger's one handler: with ``json``
    every line is one JSON object. Libraries' own records below WARNING are
    left out, except those of loggers given a level of their own (uvicorn's
    startup and access lines follow the level ``agentrt serve`` gives them).
    """
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # The console renderer formats tracebacks itself; JSON needs them as text.
                *([structlog.processors.format_exc_info] if json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))


def uvicorn_logging(level: str, *, access_log: bool = False) -> dict[str, Any]:
    """uvicorn's logging options for agentrt's servers (``serve``, ``api``): no handlers
    or formatters of its own (``log_config`` None), so its lines reach the root logger
    and are rendered like every other line (:func:`configure_logging`, JSON with
    AGENTRT_LOG_JSON), at ``level``; each request's line only with ``access_log``."""
    return {"log_config": None, "log_level": level, "access_log": access_log}
