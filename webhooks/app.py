"""The HTTP ingress: POST /webhooks/{source}, health, readiness and metrics."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from redis.exceptions import RedisClusterException, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.log.pool import create_pool
from runtime.ops import metrics as ops_metrics
from runtime.ops.process import settle_gc
from runtime.ops.tracing import request_parent, span
from runtime.settings import Settings
from runtime.streams.durability import (
    RedisDurability,
    check_redis_durability,
    ensure_durable_redis,
)
from runtime.streams.keys import ingress_stream, redis_client
from webhooks import auth
from webhooks.config import ResolvedSource, WebhooksConfig
from webhooks.errors import (
    IngressError,
    InvalidPayload,
    PayloadTooLarge,
    Unauthorized,
    UnknownSource,
)
from webhooks.formats import Decoded, Format
from webhooks.ingest import Ingestor

log = structlog.get_logger(__name__)

#: Packages add routes to the ingress app through this group (``projections`` adds the
#: query API): ``name = "pkg.module:mount"``, called as ``mount(app, settings)``.
ROUTES_GROUP = "agentrt.routes"


def formats() -> dict[str, Format]:
    from webhooks.formats.changes import decode_debezium, decode_supabase
    from webhooks.formats.email import decode_mailgun, decode_mime, decode_postmark, decode_sendgrid
    from webhooks.formats.generic import decode_generic

    return {
        "postmark": decode_postmark,
        "mailgun": decode_mailgun,
        "sendgrid": decode_sendgrid,
        "mime": decode_mime,
        "debezium": decode_debezium,
        "supabase": decode_supabase,
        "generic": decode_generic,
    }


class AcceptedBody(BaseModel):
    """The webhook is durably in the ingress stream."""

    event_id: str = Field(description="The event's id; a redelivery gets the same one")
    duplicate: bool = Field(description="True when this delivery was seen before")


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable reason")
    message: str
    field: str | None = Field(None, description="The offending field path, for 422")


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorBody,
        "description": "Missing, malformed or wrong signature/credentials, "
        "stale or future timestamp, replayed token",
    },
    404: {"model": ErrorBody, "description": "No such source"},
    413: {"model": ErrorBody, "description": "Body over the source's limit"},
    415: {"model": ErrorBody, "description": "Content type the source's format does not take"},
    422: {"model": ErrorBody, "description": "Body does not decode; `field` names where"},
    503: {
        "model": ErrorBody,
        "description": "Redis unreachable or backlog full; see Retry-After",
        "headers": {
            "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}
        },
    },
}
_BODY_TYPES = {
    "application/json": {"schema": {"type": "object"}},
    "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
    "multipart/form-data": {"schema": {"type": "object"}},
    "message/rfc822": {"schema": {"type": "string", "format": "binary"}},
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "agentrt_webhook_requests",
            "Webhook requests by source and outcome",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "agentrt_webhook_seconds",
            "Webhook handling time",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        # Read from Redis at scrape time: with several processes, the latest reading of
        # a live one is the value (see runtime.ops.metrics).
        self.stream_length = Gauge(
            "agentrt_ingress_stream_length",
            "Entries in each ingress stream",
            ["stream"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.group_lag = Gauge(
            "agentrt_consumer_group_lag",
            "Entries not yet delivered to a consumer group (pending ones on Redis < 7)",
            ["stream", "group"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )


def create_app(
    settings: Settings,
    config: WebhooksConfig,
    sources: dict[str, ResolvedSource],
    *,
    routes: bool = True,
) -> FastAPI:
    """The ingress app. Nothing connects until the lifespan starts.

    ``routes``: also mount the routes of the ``agentrt.routes`` group (the query API).
    """
    decoders = formats()
    metrics = Metrics()
    for name, src in sources.items():
        if src.config.auth == "none":
            log.warning(
                "webhooks.unauthenticated_source",
                source=name,
                hint="anyone who can reach this server can post to it",
            )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A plain or a cluster client (``redis+cluster://``): the ingress's one
        # script keeps to one slot (the partition's hash tag).
        redis = redis_client(
            settings.require_redis_url(),
            socket_connect_timeout=2,
            socket_timeout=5,
        )
        pool: asyncpg.Pool | None = None
        if settings.database_url is not None:
            pool = await create_pool(settings.database_url, min_size=0, max_size=2)
        app.state.redis = redis
        app.state.pg = pool
        app.state.ingestor = Ingestor(redis, config.ingress)
        try:
            # Promise 1: a 202 is only as safe as Redis's fsync. Warn, or refuse to start.
            # (Unreachable: /readyz says so.)
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await ensure_durable_redis(redis, settings, component="agentrt serve")
            settle_gc()
            ops_metrics.process_started("ingress")
            yield
        finally:
            ops_metrics.process_stopping()
            await redis.aclose()
            if pool is not None:
                await pool.close()

    app = FastAPI(
        title="agentrt ingress",
        version="0.1.0",
        description="Signed, typed, deduplicated webhooks into Redis Streams.",
        lifespan=lifespan,
    )

    @app.exception_handler(IngressError)
    async def ingress_error(request: Request, exc: IngressError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            {
                "code": "invalid_request",
                "message": first.get("msg", "invalid request"),
                "field": field or None,
            },
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"code": code, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.post(
        "/webhooks/{source}",
        status_code=202,
        response_model=AcceptedBody,
        responses=_ERRORS,
        openapi_extra={"requestBody": {"required": True, "content": _BODY_TYPES}},
        summary="Deliver a webhook",
        description="Verifies the source's authentication, decodes the provider's format into "
        "a typed event, deduplicates by delivery id and appends it to the ingress stream. "
        "202 is sent only after Redis acknowledged the append.",
    )
    async def receive(source: str, request: Request) -> JSONResponse:
        started = time.perf_counter()
        outcome = "error"
        # The run's first span: under the request's (FastAPI's), or the sender's
        # (`traceparent`; a malformed one is ignored), or a trace's root. Its context
        # rides on the stream entry (Ingestor).
        parent = request_parent(request.headers)
        with span(
            f"webhook {source if source in sources else '(unknown)'}",
            context=parent,
            kind=SpanKind.SERVER if parent is not None else SpanKind.INTERNAL,
            attributes={"http.request.method": "POST", "http.route": "/webhooks/{source}",
                        "url.path": request.url.path, "agentrt.webhook.source": source},
            record_exception=False,
            set_status_on_exception=False,
        ) as webhook_span:  # fmt: skip
            try:
                src = sources.get(source)
                if src is None:
                    raise UnknownSource(f"no source named {source!r} is configured")
                body = await read_limited(request, src.config.max_body_bytes)
                content_type = request.headers.get("content-type", "")
                accepted = await handle(request, src, body, content_type)
                outcome = "duplicate" if accepted["duplicate"] else "accepted"
                webhook_span.set_attributes({"http.response.status_code": 202,
                                     "agentrt.event_id": accepted["event_id"],
                                     "agentrt.duplicate": accepted["duplicate"]})  # fmt: skip
                return JSONResponse(accepted, status_code=202)
            except IngressError as exc:
                outcome = exc.code
                webhook_span.set_attributes({"http.response.status_code": exc.status,
                                     "error.type": exc.code})  # fmt: skip
                if exc.status >= 500:  # a client's mistake (4xx) is no server error
                    webhook_span.set_status(StatusCode.ERROR, exc.message)
                raise
            except Exception as exc:
                webhook_span.record_exception(exc)
                webhook_span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                label = source if source in sources else "(unknown)"
                metrics.requests.labels(label, outcome).inc()
                metrics.latency.labels(label).observe(time.perf_counter() - started)

    async def handle(
        request: Request, src: ResolvedSource, body: bytes, content_type: str
    ) -> dict[str, Any]:
        cfg = src.config
        delivery: str | None = None
        if cfg.auth == "standard":
            delivery = auth.verify_standard(src.keys, request.headers, body)
        elif cfg.auth == "basic":
            assert src.username is not None and src.password is not None
            auth.verify_basic(request.headers.get("authorization"), src.username, src.password)
        token: str | None = None
        if cfg.auth == "mailgun":
            decoded, token = self_signed_form(src, body, content_type)
        else:
            decoded = decoders[cfg.format](body, content_type, src.name)
        # The provider's own id first (a Debezium change's source position, an
        # email's Message-ID): it survives a sender that re-sends the same
        # change under a new webhook-id; then webhook-id; then the body itself.
        delivery = decoded.delivery_id or delivery or "sha256:" + hashlib.sha256(body).hexdigest()
        partition = partition_key(cfg.partition_key, decoded)
        ingestor: Ingestor = request.app.state.ingestor
        # Mailgun's token is bound to this delivery in the ingestor, not used up
        # here: its retry of the same delivery (after a 503 or a crash) must pass.
        accepted = await ingestor.ingest(
            source=src.name,
            decoded=decoded,
            delivery_key=delivery,
            partition_key=partition,
            raw=body,
            content_type=content_type,
            replay_token=token,
        )
        return {"event_id": str(accepted.event_id), "duplicate": accepted.duplicate}

    def self_signed_form(
        src: ResolvedSource, body: bytes, content_type: str
    ) -> tuple[Decoded, str]:
        """Mailgun signs inside the form: parse it once, verify, then decode it."""
        from webhooks.formats.email import (
            decode_mailgun_form,
            mailgun_auth_fields_from_form,
            parse_form,
        )

        form = parse_form(body, content_type)
        try:
            stamp, token, signature = mailgun_auth_fields_from_form(form)
        except InvalidPayload as exc:
            raise Unauthorized(exc.message, code="signature_missing") from None
        assert src.signing_key is not None
        auth.verify_mailgun(src.signing_key, stamp, token, signature)
        if src.config.format == "mailgun":
            return decode_mailgun_form(form, src.name), token
        return decoders[src.config.format](body, content_type, src.name), token

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Redis and PostgreSQL are reachable; whether Redis fsyncs every write",
        description="`redis_durability` reports Redis's `appendonly` and `appendfsync` and "
        "whether they keep every acknowledged webhook (`appendonly yes`, `appendfsync always`); "
        "not durable fails readiness only when `require_durable_redis` is set.",
        responses={503: {"model": ErrorBody}},
    )
    async def readyz(request: Request) -> JSONResponse:
        checks: dict[str, str] = {}
        durability: RedisDurability | None = None
        try:
            await request.app.state.redis.ping()
            checks["redis"] = "ok"
            durability = await check_redis_durability(request.app.state.redis)
        except (RedisError, RedisClusterException, OSError) as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        pool: asyncpg.Pool | None = request.app.state.pg
        if pool is None:
            checks["postgres"] = "not configured"
        else:
            try:
                await pool.fetchval("SELECT 1", timeout=2)
                checks["postgres"] = "ok"
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                checks["postgres"] = f"unreachable: {type(exc).__name__}"
        extra = {"redis_durability": durability.as_json()} if durability is not None else {}
        ok = all(v in ("ok", "not configured") for v in checks.values())
        if ok and settings.require_durable_redis and durability and not durability.durable:
            return JSONResponse(
                {
                    "code": "not_ready",
                    "message": "Redis is not durable and require_durable_redis is set: "
                    f"{durability.problem}",
                    **checks,
                    **extra,
                },
                status_code=503,
            )
        if ok:
            return JSONResponse({"status": "ready", **checks, **extra})
        return JSONResponse(
            {"code": "not_ready", "message": "a dependency is unreachable", **checks, **extra},
            status_code=503,
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint(request: Request) -> Response:
        redis: aioredis.Redis = request.app.state.redis
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await observe_streams(redis, config.ingress.partitions, metrics)
        # Several processes (serve --workers N, a supervisor's children): all of them,
        # summed, from the shared directory; one process: its own registry.
        shared = ops_metrics.multiprocess_dir()
        registry = metrics.registry if shared is None else ops_metrics.scrape_registry(shared)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics
    if routes:
        mount_routes(app, settings)
    return app


def mount_routes(
    app: FastAPI, settings: Settings, eps: Iterable[EntryPoint] | None = None
) -> list[str]:
    """Call each ``agentrt.routes`` entry point with the app; one that fails is logged
    and skipped, so a broken plugin never takes the ingress down."""
    mounted: list[str] = []
    for ep in eps if eps is not None else entry_points(group=ROUTES_GROUP):
        try:
            ep.load()(app, settings)
        except Exception as exc:  # a plugin's bug is its own, not the ingress's
            log.warning("webhooks.routes_failed", plugin=ep.name, target=ep.value, error=str(exc))
            continue
        mounted.append(ep.name)
    return mounted


def partition_key(setting: str, decoded: Decoded) -> str:
    if setting == "none":
        return ""
    if setting == "auto":
        return decoded.partition_key
    payload = getattr(decoded.body, "payload", None)
    value: Any = payload
    for part in setting.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list) and part.isascii() and part.isdigit() and int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            raise InvalidPayload(
                f"the partition key {setting} is not in the body",
                field=setting.lstrip("/").replace("/", "."),
            )
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (chunked too)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit} byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def observe_streams(redis: aioredis.Redis, partitions: int, metrics: Metrics) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(partitions):
            pipe.xlen(ingress_stream(p))
        lengths = await pipe.execute()
    for p, length in enumerate(lengths):
        stream = ingress_stream(p)
        metrics.stream_length.labels(stream).set(length)
        if not length:
            continue
        for group in await redis.xinfo_groups(stream):
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            lag = group.get("lag")
            metrics.group_lag.labels(stream, name).set(
                lag if isinstance(lag, int) else group.get("pending", 0)
            )


def app_from_env() -> FastAPI:
    """The factory ``agentrt serve`` hands uvicorn (one per worker process)."""
    from runtime.ops.logconfig import configure_logging
    from runtime.ops.tracing import configure_tracing
    from webhooks.config import load

    settings = Settings.from_env()
    configure_logging(settings.log_level, json=settings.log_json)
    configure_tracing("agentrt-ingress")
    config, sources = load(settings.webhooks_config)
    return create_app(settings, config, sources)
