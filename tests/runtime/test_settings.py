"""Settings: typed, read from the environment and flags, errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import SettingsError
from runtime.settings import Settings, redact_url


def test_defaults_mean_embedded_servers() -> None:
    s = Settings.from_env({})
    assert s.redis_url is None
    assert s.database_url is None
    assert s.uses_embedded
    assert s.state_dir == Path(".agentrt")
    assert s.db_schema == "agentrt"


def test_environment_is_read_and_typed() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://localhost:6379/0",
            "DATABASE_URL": "postgresql://u:p@db:5432/x",
            "AGENTRT_STATE_DIR": "/tmp/x",
            "ANTHROPIC_API_KEY": "sk-test",
            "AGENTRT_LOG_JSON": "yes",
            "AGENTRT_POLL_INTERVAL": "0.25",
            "AGENTRT_LOG_NOTIFY": "off",
            "AGENTRT_DB_SCHEMA": "prod_log",
        }
    )
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.state_dir == Path("/tmp/x")
    assert s.log_json is True
    assert s.poll_interval == 0.25
    assert s.log_notify is False
    assert s.db_schema == "prod_log"
    assert not s.uses_embedded


def test_flags_override_environment_and_none_falls_through() -> None:
    env = {"AGENTRT_DB_SCHEMA": "from_env", "AGENTRT_LOG_LEVEL": "debug"}
    s = Settings.from_env(env, db_schema="from_flag", log_level=None)
    assert s.db_schema == "from_flag"
    assert s.log_level == "debug"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("REDIS_URL", "http://localhost", "scheme 'http'"),
        ("REDIS_URL", "redis://", "no host"),
        ("DATABASE_URL", "mysql://db/x", "scheme 'mysql'"),
        ("DATABASE_URL", "postgresql://db:port/x", "port"),
        ("AGENTRT_DB_SCHEMA", "Robert'); DROP", "identifier"),
        ("AGENTRT_LOG_LEVEL", "loud", "not one of"),
        ("AGENTRT_LOG_JSON", "perhaps", "boolean"),
        ("AGENTRT_POLL_INTERVAL", "soon", "number of seconds"),
        ("AGENTRT_POLL_INTERVAL", "0", "outside"),
    ],
)
def test_bad_values_name_their_key(key: str, value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({key: value})
    assert info.value.key == key
    assert problem in str(info.value)
    assert str(info.value).startswith(key)


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({}, db_schema="Bad-Name")
    assert info.value.key == "--db-schema"


def test_missing_url_is_named_when_required() -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        Settings.from_env({}).require_database_url()


def test_nothing_connects_at_import_time() -> None:
    """Importing every module with unreachable servers configured must not fail or hang."""
    code = (
        "import importlib, pkgutil, runtime, projections, webhooks\n"
        "for pkg in (runtime, projections, webhooks):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name.rpartition('.')[2] != '__main__':  # programs, run not imported\n"
        "            importlib.import_module(m.name)\n"
        "print('imported')"
    )
    env = {
        "REDIS_URL": "redis://192.0.2.1:1/0",
        "DATABASE_URL": "postgresql://192.0.2.1:1/x",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


def test_cli_reports_a_bad_setting_with_exit_code_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "services", "status"],
        env={"REDIS_URL": "http://nope", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr
    assert "settings_invalid" in result.stderr


def test_model_tiers_prices_and_budgets_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "AGENTRT_MODELS": "smart=claude-opus-5-5, tiny=claude-haiku-4-5",
            "AGENTRT_PRICES": '{"claude-x": [2, 8], "claude-y": {"input": 1, "output": 4}}',
            "AGENTRT_RUN_BUDGET_TOKENS": "5000",
            "AGENTRT_RUN_BUDGET_USD": "0.25",
            "AGENTRT_LLM_TIMEOUT": "7.5",
            "AGENTRT_LLM_MAX_ATTEMPTS": "3",
        }
    )
    assert s.models == {"fast": "claude-haiku-4-5", "smart": "claude-opus-5-5",
                        "tiny": "claude-haiku-4-5"}  # fmt: skip
    assert s.prices["claude-x"] == (2.0, 8.0)
    assert s.prices["claude-y"] == (1.0, 4.0)
    assert s.prices["claude-sonnet-5-5"] == (2.0, 10.0)  # defaults stay
    assert (s.run_budget_tokens, s.run_budget_usd) == (5000, 0.25)
    assert (s.llm_timeout, s.llm_max_attempts) == (7.5, 3)
    assert Settings.from_env({"AGENTRT_PRICES": "m=0.5/2"}).prices["m"] == (0.5, 2.0)
    d = Settings.from_env({})
    assert d.models == {"fast": "claude-haiku-4-5", "smart": "claude-sonnet-5-5"}
    assert d.run_budget_tokens is None
    assert d.run_budget_usd is None


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("AGENTRT_MODELS", "fast", "not name=value"),
        ("AGENTRT_MODELS", '{"fast": 3}', "non-empty string"),
        ("AGENTRT_PRICES", "m=3", "input and output"),
        ("AGENTRT_PRICES", "{bad json", "not valid JSON"),
        ("AGENTRT_PRICES", "m=-1/2", "negative"),
        ("AGENTRT_PRICES", "m=x/2", "not a number"),
        ("AGENTRT_RUN_BUDGET_TOKENS", "lots", "whole number"),
        ("AGENTRT_RUN_BUDGET_TOKENS", "-5", "too small"),
        ("AGENTRT_RUN_BUDGET_USD", "nan", "finite"),
        ("AGENTRT_LLM_TIMEOUT", "0", "positive"),
        ("AGENTRT_LLM_MAX_ATTEMPTS", "0", "too small"),
    ],
)
def test_bad_llm_settings_name_their_key(key: str, value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({key: value})
    assert info.value.key == key
    assert problem in str(info.value)


SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-api03-secretkey",
    "AGENTRT_APP_PASSWORD": "app-role-secret",
    "REDIS_URL": "redis://default:redis-secret@cache.internal:6379/0",
    "DATABASE_URL": "postgresql://owner:db-secret@db.internal:5432/agentrt",
    "AGENTRT_RUNTIME_DATABASE_URL": (
        "postgresql://agentrt_app@db.internal/agentrt?sslmode=require&password=query-secret"
    ),
}
SECRET_VALUES = (
    "sk-ant-api03-secretkey",
    "app-role-secret",
    "redis-secret",
    "db-secret",
    "query-secret",
)


def _shown(s: Settings) -> dict[str, str]:
    """Every way a Settings object reaches a terminal or a log line."""
    import rich.pretty
    import structlog

    event = {"event": "settings.loaded", "settings": s}
    return {
        "repr": repr(s),
        "str": str(s),
        "format": f"{s} {s!r}",
        "rich": rich.pretty.pretty_repr(s),
        "structlog json": structlog.processors.JSONRenderer()(None, "info", dict(event)),
        "structlog console": str(
            structlog.dev.ConsoleRenderer(colors=False)(None, "info", dict(event))
        ),
        "exception": repr(RuntimeError(s)),
    }


def test_secrets_never_appear_in_repr_str_or_log_lines() -> None:
    s = Settings.from_env(SECRETS)
    assert s.anthropic_api_key == "sk-ant-api03-secretkey"  # the values are there to use
    assert s.database_url == SECRETS["DATABASE_URL"]
    for how, text in _shown(s).items():
        for secret in SECRET_VALUES:
            assert secret not in text, f"{how} shows {secret!r}: {text}"
        # What is not secret stays readable: hosts, users, which secrets are set.
        assert "cache.internal" in text, how
        assert "owner:***@db.internal" in text, how
        assert "password=***" in text, how
        assert "anthropic_api_key='***'" in text, how
        assert "app_password='***'" in text, how


def test_unset_secrets_show_as_none() -> None:
    text = repr(Settings.from_env({}))
    assert "anthropic_api_key=None" in text
    assert "redis_url=None" in text
    assert "***" not in text


def test_secrets_given_as_flags_are_hidden_too() -> None:
    s = Settings.from_env(
        {}, database_url="postgresql://u:flag-secret@h/x", app_password="flag-app-secret"
    )
    assert "flag-secret" not in repr(s)
    assert "flag-app-secret" not in str(s)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:pw@h/1", "rediss://user:***@h/1"),
        ("unix://:pw@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # an unescaped @ in it
        ("postgresql://u:p%40ss@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("postgresql://u@h/db?sslpassword=k&Password=p", "postgresql://u@h/db?sslpassword=***&Password=***"),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
