"""An ingress app wired to the test Redis, with one source per format."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode

import httpx
import msgspec
import redis.asyncio as aioredis

from runtime.settings import Settings
from runtime.streams.keys import ingress_stream
from tests.support import REPO
from tests.support.servers import redis_db_url
from webhooks import auth
from webhooks.app import create_app
from webhooks.config import IngressConfig, SourceConfig, WebhooksConfig, resolve

SAMPLES = REPO / "scripts" / "samples"
SECRET = "whsec_" + base64.b64encode(b"test secret for the ingress suite").decode()
KEY = auth.decode_secret(SECRET)
MAILGUN_KEY = "key-mailgun-test"
BASIC = ("provider", "s3cret")
TEST_DB = 9  # the Redis database the ingress tests own (and flush)


def redis_url_for_tests(url: str) -> str:
    return redis_db_url(url, TEST_DB)


def make_config(partitions: int = 4, max_backlog: int = 1000) -> WebhooksConfig:
    basic = {"auth": "basic", "username": BASIC[0], "password": BASIC[1]}
    standard = {"auth": "standard", "secrets": [SECRET]}
    sources = {
        "postmark": {"format": "postmark", **basic},
        "mailgun": {"format": "mailgun", "auth": "mailgun", "signing_key": MAILGUN_KEY},
        "sendgrid": {"format": "sendgrid", **basic},
        "mime": {"format": "mime", **standard},
        "debezium": {"format": "debezium", **standard},
        "supabase": {"format": "supabase", **basic},
        "orders": {"format": "generic", **standard, "partition_key": "/data/customer/id"},
        "open": {"format": "generic", "auth": "none"},
        "tiny": {"format": "generic", "auth": "none", "max_body_bytes": 64},
    }
    return WebhooksConfig(
        ingress=IngressConfig(
            partitions=partitions, max_backlog=max_backlog, retry_after_seconds=7
        ),
        sources={k: msgspec.convert(v, SourceConfig) for k, v in sources.items()},
    )


@contextlib.asynccontextmanager
async def ingress(
    redis_url: str,
    config: WebhooksConfig | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    config = config or make_config()
    settings = Settings.from_env({}).with_urls(redis_url=redis_url, database_url=None)
    app = create_app(settings, config, resolve(config))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ingress"
        ) as client,
    ):
        client.app = app  # type: ignore[attr-defined]
        yield client


def standard_headers(
    body: bytes, msg_id: str | None = None, content_type: str = "application/json"
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    now = int(time.time())
    return {
        "content-type": content_type,
        "webhook-id": msg_id,
        "webhook-timestamp": str(now),
        "webhook-signature": auth.sign(KEY, msg_id, now, body),
    }


def basic_headers(content_type: str) -> dict[str, str]:
    token = base64.b64encode(f"{BASIC[0]}:{BASIC[1]}".encode()).decode()
    return {"content-type": content_type, "authorization": f"Basic {token}"}


def mailgun_form(token: str | None = None) -> bytes:
    """The Mailgun sample, signed now with a fresh token."""
    fields = parse_qsl((SAMPLES / "email" / "mailgun.form").read_text(), keep_blank_values=True)
    stamp = str(int(time.time()))
    token = token or uuid.uuid4().hex * 2
    sig = hmac.new(MAILGUN_KEY.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    fields = [(k, v) for k, v in fields if k not in ("timestamp", "token", "signature")]
    fields += [("timestamp", stamp), ("token", token), ("signature", sig)]
    return urlencode(fields).encode()


async def all_entries(redis: aioredis.Redis, partitions: int = 4) -> list[dict[bytes, bytes]]:
    entries = []
    for p in range(partitions):
        entries += [fields for _, fields in await redis.xrange(ingress_stream(p))]
    return entries
