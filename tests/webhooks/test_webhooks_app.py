"""The ingress end to end: every format in, every bad input answered, nothing lost or doubled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import structlog

from runtime.events.model import registry
from runtime.ops.embedded import EmbeddedRedis
from runtime.settings import Settings
from tests.support.servers import Servers
from tests.support.webhooks import (
    SAMPLES,
    all_entries,
    basic_headers,
    ingress,
    mailgun_form,
    make_config,
    redis_url_for_tests,
    standard_headers,
)
from webhooks.app import create_app
from webhooks.config import resolve
from webhooks.events import EmailReceived, RowChanged, WebhookReceived


@pytest.fixture
async def redis_url(servers: Servers) -> str:
    url = redis_url_for_tests(servers.redis_url)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    return url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with ingress(redis_url) as c:
        yield c


def sample(*parts: str) -> bytes:
    return SAMPLES.joinpath(*parts).read_bytes()


def content_type(*parts: str) -> str:
    path = SAMPLES.joinpath(*parts)
    beside = path.with_name(path.name + ".content-type")
    return beside.read_text().strip() if beside.exists() else "application/json"


def decoded(entry: dict[bytes, bytes]) -> object:
    return registry.decode(entry[b"type"].decode(), int(entry[b"schema_version"]), entry[b"body"])


CASES = [
    ("postmark", ("email", "postmark.json"), "basic", EmailReceived),
    ("sendgrid", ("email", "sendgrid.multipart"), "basic", EmailReceived),
    ("mime", ("email", "message.eml"), "standard", EmailReceived),
    ("debezium", ("changes", "debezium-postgres-create.json"), "standard", RowChanged),
    ("debezium", ("changes", "debezium-postgres-update.json"), "standard", RowChanged),
    ("debezium", ("changes", "debezium-mysql-delete.json"), "standard", RowChanged),
    ("supabase", ("changes", "supabase-insert.json"), "basic", RowChanged),
    ("orders", ("generic", "order.json"), "standard", WebhookReceived),
]


@pytest.mark.parametrize(("source", "path", "scheme", "kind"), CASES)
async def test_every_format_is_accepted_and_appended(
    client: httpx.AsyncClient,
    redis: aioredis.Redis,
    source: str,
    path: tuple[str, str],
    scheme: str,
    kind: type,
) -> None:
    body = sample(*path)
    ctype = "message/rfc822" if path[1].endswith(".eml") else content_type(*path)
    headers = (
        standard_headers(body, content_type=ctype) if scheme == "standard" else basic_headers(ctype)
    )
    response = await client.post(f"/webhooks/{source}", content=body, headers=headers)
    assert response.status_code == 202, response.text
    reply = response.json()
    assert reply["duplicate"] is False
    (entry,) = await all_entries(redis)
    assert entry[b"event_id"].decode() == reply["event_id"]
    assert entry[b"source"].decode() == source
    assert entry[b"raw"] == body  # the raw payload is kept for audit
    event = decoded(entry)
    assert isinstance(event, kind)
    assert event.source == source  # type: ignore[attr-defined]


async def test_mailgun_is_verified_and_a_replayed_token_refused(
    client: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    body = mailgun_form(token="t" * 50)
    first = await client.post("/webhooks/mailgun", content=body, headers=headers)
    assert first.status_code == 202, first.text
    event = decoded((await all_entries(redis))[0])
    assert isinstance(event, EmailReceived)
    assert event.provider == "mailgun"
    # The same delivery again is Mailgun retrying one whose 202 it did not see:
    # answered as the duplicate it is (a replayer gains nothing by it).
    again = await client.post("/webhooks/mailgun", content=body, headers=headers)
    assert again.status_code == 202, again.text
    assert again.json() == {"event_id": first.json()["event_id"], "duplicate": True}
    # The signed token on another message (the signature covers only the
    # timestamp and the token) is a replay.
    other = body.replace(b"20241125104958.4f1c2a", b"20241125104958.other")
    assert other != body
    replay = await client.post("/webhooks/mailgun", content=other, headers=headers)
    assert replay.status_code == 401, replay.text
    assert replay.json()["code"] == "token_replayed"
    forged = body.replace(b"signature=", b"signature=00")
    bad = await client.post("/webhooks/mailgun", content=forged, headers=headers)
    assert bad.status_code == 401
    assert len(await all_entries(redis)) == 1


async def test_redelivery_gets_the_same_event_id_and_one_entry(
    client: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    body = sample("generic", "order.json")
    headers = standard_headers(body, msg_id="msg_fixed")
    first = await client.post("/webhooks/orders", content=body, headers=headers)
    again = await client.post(
        "/webhooks/orders", content=body, headers=standard_headers(body, msg_id="msg_fixed")
    )
    assert first.status_code == again.status_code == 202
    assert first.json()["event_id"] == again.json()["event_id"]
    assert again.json()["duplicate"] is True
    assert len(await all_entries(redis)) == 1


async def test_concurrent_identical_deliveries_append_once(
    client: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    body = json.dumps({"data": {"customer": {"id": "c-1"}}, "total": 12}).encode()
    responses = await asyncio.gather(
        *(
            client.post(
                "/webhooks/orders", content=body, headers=standard_headers(body, "msg_same")
            )
            for _ in range(20)
        )
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["event_id"] for r in responses}) == 1
    assert sum(not r.json()["duplicate"] for r in responses) == 1
    assert len(await all_entries(redis)) == 1


async def test_the_partition_key_keeps_related_events_together(
    client: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    for i in range(12):
        body = json.dumps({"data": {"customer": {"id": "same-customer"}}, "n": i}).encode()
        r = await client.post("/webhooks/orders", content=body, headers=standard_headers(body))
        assert r.status_code == 202
    lengths = [await redis.xlen(f"agentrt:in:{{p{p}}}") for p in range(4)]
    assert sorted(lengths) == [0, 0, 0, 12]
    body = json.dumps({"total": 1}).encode()
    missing = await client.post("/webhooks/orders", content=body, headers=standard_headers(body))
    assert missing.status_code == 422
    assert missing.json()["field"] == "data.customer.id"


ORDER = json.dumps({"data": {"customer": {"id": "c"}}}).encode()


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "code"),
    [
        ("/webhooks/nope", {"content-type": "application/json"}, b"{}", 404, "unknown_source"),
        ("/webhooks/orders", {"content-type": "application/json"}, ORDER, 401, "signature_missing"),
        (
            "/webhooks/orders",
            lambda: {**standard_headers(ORDER), "webhook-timestamp": "abc"},
            ORDER,
            401,
            "timestamp_invalid",
        ),
        (
            "/webhooks/orders",
            lambda: {**standard_headers(ORDER), "webhook-signature": "v1,%%%"},
            ORDER,
            401,
            "signature_malformed",
        ),
        (
            "/webhooks/orders",
            lambda: standard_headers(ORDER),
            ORDER + b" ",
            401,
            "signature_mismatch",
        ),
        ("/webhooks/postmark", {"content-type": "application/json"}, b"{}", 401, "auth_missing"),
        (
            "/webhooks/postmark",
            {**basic_headers("application/json"), "authorization": "Basic Zm9vOmJhcg=="},
            b"{}",
            401,
            "auth_mismatch",
        ),
        (
            "/webhooks/tiny",
            {"content-type": "application/json"},
            b"[" + b"1," * 40 + b"1]",
            413,
            "payload_too_large",
        ),
        ("/webhooks/open", {"content-type": "text/plain"}, b"hello", 415, "unsupported_media_type"),
        (
            "/webhooks/open",
            {"content-type": "application/json"},
            b"{not json",
            422,
            "invalid_payload",
        ),
        (
            "/webhooks/postmark",
            basic_headers("application/json"),
            b'{"Subject": 5}',
            422,
            "invalid_payload",
        ),
        (
            "/webhooks/debezium",
            lambda: standard_headers(b'{"op": "x"}'),
            b'{"op": "x"}',
            422,
            "invalid_payload",
        ),
    ],
)
async def test_bad_input_gets_a_clear_answer_and_appends_nothing(
    client: httpx.AsyncClient,
    redis: aioredis.Redis,
    path: str,
    headers: dict[str, str] | Callable[[], dict[str, str]],
    body: bytes,
    status: int,
    code: str,
) -> None:
    # Signed headers are made when the test runs: made at collection, their
    # timestamp goes stale on a slow machine before the test gets to them.
    sent = headers() if callable(headers) else headers
    response = await client.post(path, content=body, headers=sent)
    assert response.status_code == status, response.text
    doc = response.json()
    assert doc["code"] == code
    assert doc["message"]
    assert await all_entries(redis) == []


async def test_422_names_the_offending_field(client: httpx.AsyncClient) -> None:
    body = json.dumps({"FromFull": {"Email": 5}}).encode()
    response = await client.post(
        "/webhooks/postmark", content=body, headers=basic_headers("application/json")
    )
    assert response.status_code == 422
    assert response.json()["field"]


async def test_413_while_a_chunked_body_streams_in(
    client: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 10

    response = await client.post(
        "/webhooks/tiny", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert await all_entries(redis) == []


async def test_backlog_over_its_limit_is_503_with_retry_after(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingress(redis_url, make_config(partitions=1, max_backlog=3)) as c:
        statuses = []
        for i in range(5):
            body = json.dumps({"n": i}).encode()
            r = await c.post(
                "/webhooks/open", content=body, headers={"content-type": "application/json"}
            )
            statuses.append(r.status_code)
        assert statuses == [202, 202, 202, 503, 503]
        assert r.headers["retry-after"] == "7"
        assert r.json()["code"] == "backlog_full"
    assert len(await all_entries(redis, partitions=1)) == 3


async def test_redis_down_is_503_never_202_and_recovers(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    try:
        async with ingress(url) as c:
            body = b'{"a": 1}'
            headers = {"content-type": "application/json"}
            assert (
                await c.post("/webhooks/open", content=body, headers=headers)
            ).status_code == 202
            server.stop()
            down = await c.post("/webhooks/open", content=b'{"a": 2}', headers=headers)
            assert down.status_code == 503
            assert down.json()["code"] == "redis_unavailable"
            assert down.headers["retry-after"] == "7"
            ready = await c.get("/readyz")
            assert ready.status_code == 503
            server.start()
            back = await c.post("/webhooks/open", content=b'{"a": 2}', headers=headers)
            assert back.status_code == 202
            assert (await c.get("/readyz")).status_code == 200
        check = aioredis.Redis.from_url(url)
        try:
            assert len(await all_entries(check)) == 2
        finally:
            await check.aclose()
    finally:
        server.stop()


async def test_health_readiness_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] == "ok"
    await client.post("/webhooks/open", content=b"{}", headers={"content-type": "application/json"})
    await client.post("/webhooks/open", content=b"{", headers={"content-type": "application/json"})
    text = (await client.get("/metrics")).text
    assert 'agentrt_webhook_requests_total{outcome="accepted",source="open"} 1.0' in text
    assert 'agentrt_webhook_requests_total{outcome="invalid_payload",source="open"} 1.0' in text
    assert "agentrt_webhook_seconds_bucket" in text
    assert 'agentrt_ingress_stream_length{stream="agentrt:in:{p' in text


async def test_unauthenticated_sources_are_warned_about_at_start(redis_url: str) -> None:
    config = make_config()
    with structlog.testing.capture_logs() as logs:
        create_app(
            Settings.from_env({}).with_urls(redis_url=redis_url, database_url=None),
            config,
            resolve(config),
        )
    warned = {e["source"] for e in logs if e["event"] == "webhooks.unauthenticated_source"}
    assert warned == {"open", "tiny"}


async def test_openapi_describes_routes_and_errors(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    post = doc["paths"]["/webhooks/{source}"]["post"]
    assert set(post["responses"]) >= {"202", "401", "404", "413", "415", "422", "503"}
    assert "message/rfc822" in post["requestBody"]["content"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
