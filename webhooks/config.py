"""Sources, read from a TOML file: each with its format, its secrets and its partition key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import msgspec

from webhooks.auth import decode_secret
from webhooks.errors import ConfigError

Format = Literal["postmark", "mailgun", "sendgrid", "mime", "debezium", "supabase", "generic"]
Auth = Literal["standard", "mailgun", "basic", "none"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class SourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: Format = "generic"
    #: How senders prove who they are; "none" must be said explicitly.
    auth: Auth
    #: Standard Webhooks secrets (``whsec_...``); several during a rotation.
    secrets: list[str] = []
    #: Mailgun's webhook signing key.
    signing_key: str | None = None
    #: HTTP Basic credentials (Postmark, SendGrid).
    username: str | None = None
    password: str | None = None
    #: "auto" (the format's own: an email thread, a table row), "none", or a
    #: JSON pointer into a generic body (``/customer/id``).
    partition_key: str = "auto"
    max_body_bytes: int = 1024 * 1024


class IngressConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    partitions: int = 8
    #: Entries per partition stream above which ingress answers 503.
    max_backlog: int = 100_000
    dedupe_window_hours: float = 72.0
    retry_after_seconds: int = 5


class WebhooksConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ingress: IngressConfig = IngressConfig()
    sources: dict[str, SourceConfig] = {}


class ResolvedSource(msgspec.Struct, frozen=True):
    """A source with its secrets read (``env:NAME`` references resolved) and decoded."""

    name: str
    config: SourceConfig
    keys: list[bytes]
    signing_key: bytes | None
    username: str | None
    password: str | None


def _resolve(value: str | None, where: str) -> str | None:
    if value is None or not value.startswith("env:"):
        return value
    name = value[4:]
    resolved = os.environ.get(name)
    if resolved is None:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    return resolved


def load(path: Path) -> tuple[WebhooksConfig, dict[str, ResolvedSource]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the sources file {path}: {exc.strerror}") from None
    try:
        config = msgspec.toml.decode(raw, type=WebhooksConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config, resolve(config, str(path))


def resolve(config: WebhooksConfig, where: str = "config") -> dict[str, ResolvedSource]:
    if not 1 <= config.ingress.partitions <= 1024:
        raise ConfigError(f"{where}: ingress.partitions must be 1..1024")
    sources: dict[str, ResolvedSource] = {}
    for name, src in config.sources.items():
        at = f"{where}: sources.{name}"
        if not _NAME.match(name):
            raise ConfigError(f"{at}: a source name is lower case letters, digits, - and _")
        keys: list[bytes] = []
        if src.auth == "standard":
            if not src.secrets:
                raise ConfigError(f"{at}: auth = 'standard' needs secrets = ['whsec_...']")
            for i, secret in enumerate(src.secrets):
                value = _resolve(secret, f"{at}.secrets[{i}]")
                assert value is not None
                try:
                    keys.append(decode_secret(value))
                except ValueError as exc:
                    raise ConfigError(f"{at}.secrets[{i}]: {exc}") from None
        signing_key = _resolve(src.signing_key, f"{at}.signing_key")
        if src.auth == "mailgun" and not signing_key:
            raise ConfigError(f"{at}: auth = 'mailgun' needs signing_key")
        username = _resolve(src.username, f"{at}.username")
        password = _resolve(src.password, f"{at}.password")
        if src.auth == "basic" and (not username or not password):
            raise ConfigError(f"{at}: auth = 'basic' needs username and password")
        if src.partition_key not in ("auto", "none") and not src.partition_key.startswith("/"):
            raise ConfigError(f"{at}.partition_key: 'auto', 'none' or a JSON pointer like /a/b")
        if src.max_body_bytes < 1:
            raise ConfigError(f"{at}.max_body_bytes must be positive")
        sources[name] = ResolvedSource(
            name, src, keys, signing_key.encode() if signing_key else None, username, password
        )
    return sources
