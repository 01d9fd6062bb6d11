"""Settings: typed, read from the environment and flags, errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import SettingsError
from runtime.settings import Settings


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
        "        if m.name != 'runtime.__main__':\n"
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
