"""Typed settings, read from the environment and overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from runtime.errors import SettingsError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: Model tier -> model id (``AGENTRT_MODELS`` entries replace these one by one).
DEFAULT_MODELS: dict[str, str] = {"fast": "claude-haiku-4-5", "smart": "claude-sonnet-5-5"}
#: Model id -> (input, output) USD per million tokens, as published by Anthropic
#: (``AGENTRT_PRICES`` adds or replaces entries). Cache writes and reads are
#: priced from the input price (see ``runtime.llm``).
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-sonnet-5-5": (2.0, 10.0),
    "claude-sonnet-5": (2.0, 10.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-opus-5-5": (4.0, 20.0),
    "claude-opus-4-5": (5.0, 25.0),
}


#: Settings whose values are secrets: a repr shows only whether they are set.
SECRET_FIELDS = frozenset({"anthropic_api_key", "app_password", "api_token"})
#: Settings holding URLs: a repr shows them with any password masked.
URL_FIELDS = frozenset({"redis_url", "database_url", "runtime_database_url"})
#: Query parameters that carry a password in a libpq / redis URL.
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with its password masked (in the user info, or a ``password=`` parameter)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hosts}"
    query = "&".join(
        f"{item.partition('=')[0]}={MASK}"
        if unquote(item.partition("=")[0]).lower() in _SECRET_PARAMS
        else item
        for item in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _secret() -> Any:
    # repr=False also keeps the value out of tools that walk dataclass fields (rich).
    return dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Settings:
    """Everything agentrt reads from its environment.

    A ``None`` URL means "start the embedded server for it" (see
    :mod:`runtime.ops.embedded`). Nothing here connects to anything.

    ``repr()`` and ``str()`` never show a secret: the API key and the app role's
    password appear as ``'***'`` when set, URLs with their password masked.
    """

    redis_url: str | None = _secret()
    #: The URL migrations run with; its role owns the schema (or creates the owner role).
    database_url: str | None = _secret()
    #: The URL the runtime connects with; derived from ``database_url`` when unset.
    runtime_database_url: str | None = _secret()
    state_dir: Path = Path(".agentrt")
    anthropic_api_key: str | None = _secret()
    db_schema: str = "agentrt"
    owner_role: str = "agentrt_owner"
    app_role: str = "agentrt_app"
    #: Password given to ``app_role`` when migrate creates it (servers without trust auth).
    app_password: str | None = _secret()
    log_level: str = "info"
    log_json: bool = False
    #: Seconds between polls when a tail reader has no wake-up.
    poll_interval: float = 0.2
    #: Whether appends NOTIFY tail readers. Off by default: PostgreSQL serializes
    #: the commits of notifying transactions (see README); workers wake the relay
    #: through Redis instead, and other tail readers poll.
    log_notify: bool = False
    #: The webhook sources file (TOML) that ``agentrt serve`` reads.
    webhooks_config: Path = Path("webhooks.toml")
    #: Model tiers (``fast``, ``smart``, ...) -> model ids.
    models: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MODELS))
    #: Model id -> (input, output) USD per million tokens; a dated id (``-20251001``) matches too.
    prices: dict[str, tuple[float, float]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_PRICES)
    )
    #: A run's budget when its agent sets none (None: unlimited).
    run_budget_tokens: int | None = None
    run_budget_usd: float | None = None
    #: Seconds one model HTTP request may take before it counts as a (retryable) timeout.
    llm_timeout: float = 120.0
    #: Calls per model step, the first included (the runtime's retries; the SDK makes none).
    llm_max_attempts: int = 5
    #: Consecutive failures that open a tool's circuit breaker.
    breaker_failure_threshold: int = 5
    #: Seconds an open breaker waits before letting one probe call through.
    breaker_reset_timeout: float = 30.0
    #: Seconds a worker trusts a closed breaker without asking Redis (0: ask every call).
    breaker_cache: float = 0.5
    #: Seconds a handler may run (per activation) unless its agent sets ``timeout``;
    #: past it the handler is cancelled and the delivery counts as failed.
    handler_timeout: float = 300.0
    #: The relay's identity: its checkpoint and lease belong to this name, not to
    #: its routes, so adding an agent or a subscription keeps the position.
    relay_name: str = "default"
    #: Whether a subscriber the relay has not seen before gets the whole log
    #: (True) or starts at the relay's current position (False).
    relay_backfill: bool = False
    #: Refuse to start ``serve``/``worker`` on a Redis that does not fsync every
    #: write (``appendonly yes``, ``appendfsync always``); otherwise warn.
    require_durable_redis: bool = False
    #: Events a projection folds per transaction (its checkpoint moves once per batch).
    projection_batch: int = 1000
    #: A run's folded agent state is snapshotted every N of its events (0: never).
    snapshot_every: int = 100
    #: What the projector does with a projection whose code version differs from the
    #: version its tables were built with: ``rebuild`` them (shadow tables, swapped in
    #: when caught up) or ``flag`` it in ``projections status`` and leave it alone.
    projection_version_change: str = "rebuild"
    #: The bearer token of the query API (``agentrt api``); unset: ``agentrt api``
    #: makes one and keeps it in ``<state_dir>/api-token``.
    api_token: str | None = _secret()

    @property
    def read_schema(self) -> str:
        """The PostgreSQL schema of the read models (projections, their checkpoints)."""
        return f"{self.db_schema}_read"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``); ``overrides`` win.

        Overrides whose value is ``None`` are ignored, so CLI flags that were not
        given fall through to the environment.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, key in ENV_KEYS.items():
            raw = env.get(key)
            if raw is None or raw == "":
                continue
            values[field] = _parse(field, key, raw)
        for field, value in overrides.items():
            if field not in ENV_KEYS:
                raise TypeError(f"unknown setting {field!r}")
            if value is None:
                continue
            values[field] = _parse(field, "--" + field.replace("_", "-"), value)
        return cls(**values)

    def with_urls(self, *, redis_url: str | None, database_url: str | None) -> Settings:
        """A copy whose missing URLs are filled in (by the embedded servers)."""
        return dataclasses.replace(
            self,
            redis_url=self.redis_url or redis_url,
            database_url=self.database_url or database_url,
        )

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise SettingsError("DATABASE_URL", "not set and no embedded server was started")
        return self.database_url

    def require_redis_url(self) -> str:
        if self.redis_url is None:
            raise SettingsError("REDIS_URL", "not set and no embedded server was started")
        return self.redis_url

    @property
    def uses_embedded(self) -> bool:
        return self.redis_url is None or self.database_url is None

    def __repr__(self) -> str:
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and field.name in SECRET_FIELDS:
                value = MASK
            elif value is not None and field.name in URL_FIELDS:
                value = redact_url(value)
            shown.append(f"{field.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    __str__ = __repr__


ENV_KEYS: dict[str, str] = {
    "redis_url": "REDIS_URL",
    "database_url": "DATABASE_URL",
    "runtime_database_url": "AGENTRT_RUNTIME_DATABASE_URL",
    "state_dir": "AGENTRT_STATE_DIR",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "db_schema": "AGENTRT_DB_SCHEMA",
    "owner_role": "AGENTRT_OWNER_ROLE",
    "app_role": "AGENTRT_APP_ROLE",
    "app_password": "AGENTRT_APP_PASSWORD",
    "log_level": "AGENTRT_LOG_LEVEL",
    "log_json": "AGENTRT_LOG_JSON",
    "poll_interval": "AGENTRT_POLL_INTERVAL",
    "log_notify": "AGENTRT_LOG_NOTIFY",
    "webhooks_config": "AGENTRT_WEBHOOKS_CONFIG",
    "models": "AGENTRT_MODELS",
    "prices": "AGENTRT_PRICES",
    "run_budget_tokens": "AGENTRT_RUN_BUDGET_TOKENS",
    "run_budget_usd": "AGENTRT_RUN_BUDGET_USD",
    "llm_timeout": "AGENTRT_LLM_TIMEOUT",
    "llm_max_attempts": "AGENTRT_LLM_MAX_ATTEMPTS",
    "breaker_failure_threshold": "AGENTRT_BREAKER_FAILURES",
    "breaker_reset_timeout": "AGENTRT_BREAKER_RESET",
    "breaker_cache": "AGENTRT_BREAKER_CACHE",
    "handler_timeout": "AGENTRT_HANDLER_TIMEOUT",
    "relay_name": "AGENTRT_RELAY_NAME",
    "relay_backfill": "AGENTRT_RELAY_BACKFILL",
    "require_durable_redis": "AGENTRT_REQUIRE_DURABLE_REDIS",
    "projection_batch": "AGENTRT_PROJECTION_BATCH",
    "snapshot_every": "AGENTRT_SNAPSHOT_EVERY",
    "projection_version_change": "AGENTRT_PROJECTION_VERSION_CHANGE",
    "api_token": "AGENTRT_API_TOKEN",
}


def env_names() -> frozenset[str]:
    """Every environment variable :meth:`Settings.from_env` reads (compose files are
    checked against it: a misspelt name would be silently ignored)."""
    return frozenset(ENV_KEYS.values())


_LOG_LEVELS = {"debug", "info", "warning", "error", "critical"}


def _parse(field: str, key: str, raw: Any) -> Any:
    """Turn one raw value into the field's type, or raise naming ``key``."""
    if field in ("redis_url",):
        # redis+cluster:// (rediss+cluster://): a Redis Cluster, any one node of it.
        url = _url(key, str(raw), {"redis", "rediss", "unix", "redis+cluster", "rediss+cluster"})
        parts = urlsplit(url)
        if parts.scheme.endswith("+cluster") and parts.path.strip("/") not in ("", "0"):
            raise SettingsError(key, "a Redis Cluster has only database 0: drop the /<db> path")
        return url
    if field in ("database_url", "runtime_database_url"):
        return _url(key, str(raw), {"postgres", "postgresql"})
    if field in ("state_dir", "webhooks_config"):
        return Path(raw).expanduser()
    if field in ("db_schema", "owner_role", "app_role"):
        value = str(raw)
        if not _IDENTIFIER.match(value):
            raise SettingsError(
                key, f"{value!r} is not a plain SQL identifier (lower case, digits, _)"
            )
        return value
    if field == "log_level":
        value = str(raw).lower()
        if value not in _LOG_LEVELS:
            raise SettingsError(key, f"{raw!r} is not one of {sorted(_LOG_LEVELS)}")
        return value
    if field == "relay_name":
        value = str(raw)
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", value):
            raise SettingsError(key, f"{value!r}: use 1-100 letters, digits, '_', '.', ':' or '-'")
        return value
    if field in ("log_json", "log_notify", "relay_backfill", "require_durable_redis"):
        if isinstance(raw, bool):
            return raw
        value = str(raw).strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise SettingsError(key, f"{raw!r} is not a boolean (use true/false)")
    if field == "poll_interval":
        try:
            seconds = float(raw)
        except (TypeError, ValueError):
            raise SettingsError(key, f"{raw!r} is not a number of seconds") from None
        if not 0.001 <= seconds <= 60:
            raise SettingsError(key, f"{seconds} is outside 0.001..60 seconds")
        return seconds
    if field == "projection_version_change":
        value = str(raw).strip().lower()
        if value not in ("rebuild", "flag"):
            raise SettingsError(key, f"{raw!r} is not one of ['flag', 'rebuild']")
        return value
    if field in ("projection_batch", "snapshot_every"):
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise SettingsError(key, f"{raw!r} is not a whole number") from None
        low = 1 if field == "projection_batch" else 0
        if not low <= number <= 1_000_000:
            raise SettingsError(key, f"{number} is outside {low}..1000000")
        return number
    if field == "api_token":
        value = str(raw).strip()
        if len(value) < 16:
            raise SettingsError(key, "use at least 16 characters (a random token)")
        return value
    if field == "models":
        return {**DEFAULT_MODELS, **_models(key, raw)}
    if field == "prices":
        return {**DEFAULT_PRICES, **_prices(key, raw)}
    if field in ("run_budget_tokens", "llm_max_attempts", "breaker_failure_threshold"):
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise SettingsError(key, f"{raw!r} is not a whole number") from None
        if number < (0 if field == "run_budget_tokens" else 1):
            raise SettingsError(key, f"{number} is too small")
        return number
    if field in (
        "run_budget_usd",
        "llm_timeout",
        "breaker_reset_timeout",
        "handler_timeout",
        "breaker_cache",
    ):
        amount = _finite(key, raw)
        if amount < 0 or (field in ("llm_timeout", "handler_timeout") and amount == 0):
            raise SettingsError(key, f"{amount} must be positive")
        return amount
    return str(raw)


def _finite(key: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise SettingsError(key, f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise SettingsError(key, f"{raw!r} is not a finite number")
    return value


def _pairs(key: str, raw: Any) -> dict[str, Any]:
    """A mapping from a dict, a JSON object, or ``k=v,k=v`` text."""
    if isinstance(raw, Mapping):
        return dict(raw)
    text = str(raw).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise SettingsError(key, f"not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise SettingsError(key, "must be a JSON object")
        return value
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SettingsError(key, f"{item!r} is not name=value")
        out[name.strip()] = value.strip()
    return out


def _models(key: str, raw: Any) -> dict[str, str]:
    out = {}
    for tier, model in _pairs(key, raw).items():
        if not isinstance(model, str) or not model:
            raise SettingsError(key, f"tier {tier!r}: the model id must be a non-empty string")
        out[str(tier)] = model
    return out


def _prices(key: str, raw: Any) -> dict[str, tuple[float, float]]:
    """``{"model": [in, out]}``, ``{"model": {"input": in, "output": out}}`` or ``model=in/out``."""
    out = {}
    for model, price in _pairs(key, raw).items():
        if isinstance(price, Mapping):
            price = (price.get("input"), price.get("output"))
        elif isinstance(price, str):
            price = tuple(price.split("/"))
        if not isinstance(price, list | tuple) or len(price) != 2:
            raise SettingsError(
                key, f"{model!r}: give input and output USD per million tokens, e.g. 3/15"
            )
        pair = (_finite(key, price[0]), _finite(key, price[1]))
        if min(pair) < 0:
            raise SettingsError(key, f"{model!r}: a price cannot be negative")
        out[str(model)] = pair
    return out


def _url(key: str, raw: str, schemes: set[str]) -> str:
    try:
        parts = urlsplit(raw)
    except ValueError as exc:
        raise SettingsError(key, f"not a URL ({exc})") from None
    if parts.scheme not in schemes:
        raise SettingsError(
            key, f"scheme {parts.scheme or '(none)'!r} is not one of {sorted(schemes)}"
        )
    if parts.scheme != "unix" and not parts.hostname and "host=" not in parts.query:
        raise SettingsError(key, "has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric port
    except ValueError:
        raise SettingsError(key, "has a port that is not a number") from None
    return raw
