"""The sources file: shipped samples load, mistakes are named."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.support.webhooks import SAMPLES
from webhooks.config import load
from webhooks.errors import ConfigError


def test_shipped_sample_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "whsec_" + base64.b64encode(b"k").decode()
    for name in (
        "POSTMARK_WEBHOOK_PASSWORD",
        "MAILGUN_WEBHOOK_SIGNING_KEY",
        "SENDGRID_WEBHOOK_PASSWORD",
        "SUPABASE_WEBHOOK_PASSWORD",
    ):
        monkeypatch.setenv(name, "x")
    for name in (
        "MTA_WEBHOOK_SECRET",
        "DEBEZIUM_WEBHOOK_SECRET",
        "DEBEZIUM_WEBHOOK_SECRET_PREVIOUS",
        "BILLING_WEBHOOK_SECRET",
    ):
        monkeypatch.setenv(name, secret)
    config, sources = load(SAMPLES / "webhooks.toml")
    assert config.ingress.partitions == 8
    assert set(sources) == {
        "postmark",
        "mailgun",
        "sendgrid",
        "mta",
        "debezium",
        "supabase",
        "billing",
    }
    assert len(sources["debezium"].keys) == 2
    _, dev = load(SAMPLES / "dev-webhooks.toml")
    assert dev["orders"].config.partition_key == "/data/customer/id"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[sources.a]\nformat = "generic"\n', "auth"),
        ('[sources.a]\nauth = "standard"\n', "needs secrets"),
        ('[sources.a]\nauth = "standard"\nsecrets = ["whsec_***"]\n', "secrets[0]"),
        ('[sources.a]\nauth = "standard"\nsecrets = ["env:NOPE_NOT_SET"]\n', "NOPE_NOT_SET"),
        ('[sources.a]\nauth = "basic"\nusername = "u"\n', "username and password"),
        ('[sources.a]\nauth = "mailgun"\n', "signing_key"),
        ('[sources.a]\nauth = "none"\nformat = "xml"\n', "format"),
        ('[sources.a]\nauth = "none"\npartition_key = "id"\n', "partition_key"),
        ('[sources.a]\nauth = "none"\ncolour = "blue"\n', "colour"),
        ('[sources."Bad Name"]\nauth = "none"\n', "lower case"),
        ("[ingress]\npartitions = 0\n", "partitions"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "webhooks.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the sources file"):
        load(tmp_path / "absent.toml")
