"""The ingress as users run it: `agentrt serve`, the sign/send helpers, and schemathesis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.servers import Servers
from tests.support.webhooks import SAMPLES, SECRET, redis_url_for_tests

CONFIG = f"""
[ingress]
partitions = 4

[sources.orders]
format = "generic"
auth = "standard"
secrets = ["{SECRET}"]

[sources.mail]
format = "mime"
auth = "basic"
username = "mail"
password = "env:TEST_MAIL_PASSWORD"

[sources.open]
format = "generic"
auth = "none"
max_body_bytes = 4096
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    config = tmp_path_factory.mktemp("serve") / "webhooks.toml"
    config.write_text(CONFIG)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url_for_tests(servers.redis_url),
        "DATABASE_URL": servers.database_url,
        "AGENTRT_WEBHOOKS_CONFIG": str(config),
        "TEST_MAIL_PASSWORD": "pw",
    }
    log = (config.parent / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(
                f"agentrt serve did not start: {(config.parent / 'serve.log').read_text()}"
            )
        yield {"url": url, "config": str(config), **env}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def agentrt(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_served_app_is_ready(served: dict[str, str]) -> None:
    ready = httpx.get(f"{served['url']}/readyz", timeout=5)
    assert ready.status_code == 200
    body = ready.json()
    durability = body.pop("redis_durability")
    assert body == {"status": "ready", "redis": "ok", "postgres": "ok"}
    assert {"appendonly", "appendfsync", "durable", "verified"} <= set(durability)


def test_send_signs_and_posts_a_sample(served: dict[str, str]) -> None:
    sent = agentrt(
        served,
        "webhooks",
        "send",
        "--source",
        "orders",
        "--url",
        served["url"],
        str(SAMPLES / "generic" / "order.json"),
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("202 ")
    assert '"event_id"' in sent.stdout
    mail = agentrt(
        served,
        "webhooks",
        "send",
        "--source",
        "mail",
        "--url",
        served["url"],
        str(SAMPLES / "email" / "message.eml"),
    )
    assert mail.returncode == 0, mail.stdout + mail.stderr
    assert mail.stdout.startswith("202 ")


def test_sign_prints_headers_curl_can_use(served: dict[str, str]) -> None:
    path = SAMPLES / "generic" / "order.json"
    signed = agentrt(served, "webhooks", "sign", "--source", "orders", str(path))
    assert signed.returncode == 0, signed.stderr
    headers = dict(line.split(": ", 1) for line in signed.stdout.strip().splitlines())
    assert set(headers) == {"content-type", "webhook-id", "webhook-timestamp", "webhook-signature"}
    response = httpx.post(
        f"{served['url']}/webhooks/orders", content=path.read_bytes(), headers=headers, timeout=5
    )
    assert response.status_code == 202
    unknown = agentrt(served, "webhooks", "sign", "--source", "nope", str(path))
    assert unknown.returncode == 2
    assert "no source 'nope'" in unknown.stderr


def test_serve_refuses_a_broken_config(served: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[sources.x]\nformat = "generic"\n')  # no auth: must be explicit
    result = agentrt({**served, "AGENTRT_WEBHOOKS_CONFIG": str(bad)}, "serve")
    assert result.returncode == 2
    assert "auth" in result.stderr


def test_openapi_driven_requests_never_get_a_5xx(served: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{served['url']}/openapi.json")
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            response = case.call(base_url=served["url"], timeout=10)
            assert response.status_code < 500 or response.status_code == 503, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
            )
            if response.status_code >= 400:
                assert "code" in response.json()

        no_server_error()
        checked += 1
    assert checked >= 4
