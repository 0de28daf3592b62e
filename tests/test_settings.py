"""Tests for config.settings: every LOOPLINE_* variable parses, and every bad value names its variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loopline.settings import PREFIX, ConfigError, Settings, redact_url

# One non-default value per field, as the environment would spell it, and the value it must parse to.
GOOD_ENV = {
    "LOOPLINE_MAX_DELIVERIES": "3",
    "LOOPLINE_RESTORE_INTERVAL_S": "2.5",
    "LOOPLINE_MAX_MESSAGE_BYTES": "4194304",
    "LOOPLINE_REDIS_SOCKET_TIMEOUT_S": "7.5",
    "LOOPLINE_EVENT_FLUSH_MS": "20",
    "LOOPLINE_TASK_LOG": "off",
    "LOOPLINE_BROKER_URL": "redis://127.0.0.1:6390/1",
    "LOOPLINE_RESULT_BACKEND": "redis://:pw@127.0.0.1:6391/2",
    "LOOPLINE_HOME": "~/loopline-home",
    "LOOPLINE_VISIBILITY_TIMEOUT_S": "7200",
    "LOOPLINE_TASK_TIME_LIMIT_S": "600",
    "LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "500",
    "LOOPLINE_RESULT_EXPIRES_S": "60",
    "LOOPLINE_URL_ALLOWLIST": " 127.0.0.1, 10.0.0.0/8 ,hooks.example.org,",
    "LOOPLINE_FETCH_TIMEOUT_S": "2.5",
    "LOOPLINE_FETCH_MAX_BYTES": "2048",
    "LOOPLINE_WEBHOOK_MAX_RETRIES": "0",
    "LOOPLINE_WEBHOOK_BACKOFF_BASE_S": "0.25",
    "LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "60",
    "LOOPLINE_FLOWER_AUTH": "admin:s3cret",
    "LOOPLINE_MAX_ARG_BYTES": "4096",
    "LOOPLINE_ASYNCIO_SYNC_THREADS": "4",
    "LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S": "0",
    "LOOPLINE_ASYNCIO_BLOCKING_MS": "12.5",
    "LOOPLINE_DEFAULT_HOST_RATE": "300/m",
    "LOOPLINE_DEFAULT_HOST_CONCURRENCY": "8",
    "LOOPLINE_FETCH_MAX_RETRIES": "1",
}
PARSED = {
    "max_deliveries": 3,
    "restore_interval_s": 2.5,
    "max_message_bytes": 4194304,
    "redis_socket_timeout_s": 7.5,
    "event_flush_ms": 20.0,
    "task_log": False,
    "broker_url": "redis://127.0.0.1:6390/1",
    "result_backend": "redis://:pw@127.0.0.1:6391/2",
    "home": Path("~/loopline-home").expanduser(),
    "visibility_timeout_s": 7200,
    "task_time_limit_s": 600,
    "task_soft_time_limit_s": 500,
    "result_expires_s": 60,
    "url_allowlist": ("127.0.0.1", "10.0.0.0/8", "hooks.example.org"),
    "fetch_timeout_s": 2.5,
    "fetch_max_bytes": 2048,
    "webhook_max_retries": 0,
    "webhook_backoff_base_s": 0.25,
    "webhook_backoff_max_s": 60.0,
    "flower_auth": "admin:s3cret",
    "max_arg_bytes": 4096,
    "asyncio_sync_threads": 4,
    "asyncio_shutdown_grace_s": 0.0,
    "asyncio_blocking_ms": 12.5,
    "default_host_rate": "300/m",
    "default_host_concurrency": 8,
    "fetch_max_retries": 1,
}


def test_the_tables_cover_every_field() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert set(PARSED) == names
    assert set(GOOD_ENV) == {PREFIX + name.upper() for name in names}


def test_every_variable_parses_to_its_type() -> None:
    settings = Settings.from_env(GOOD_ENV)
    for name, expected in PARSED.items():
        value = getattr(settings, name)
        assert value == expected, name
        assert type(value) is type(expected), name
        assert value != getattr(Settings(), name), f"{name}: the test value must differ from the default"


def test_no_variables_give_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_blank_values_mean_default_and_other_prefixes_are_ignored() -> None:
    env = {"LOOPLINE_TASK_TIME_LIMIT_S": "  ", "LOOPLINE_BROKER_URL": "", "TASK_TIME_LIMIT_S": "1"}
    settings = Settings.from_env(env)
    assert settings == Settings()


def test_values_are_stripped() -> None:
    settings = Settings.from_env({"LOOPLINE_FETCH_MAX_BYTES": " 99 \n", "LOOPLINE_FLOWER_AUTH": " a:b "})
    assert settings.fetch_max_bytes == 99
    assert settings.flower_auth == "a:b"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLINE_FETCH_MAX_BYTES", "12345")
    assert Settings.from_env().fetch_max_bytes == 12345


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().task_time_limit_s = 1  # type: ignore[misc]


def test_config_error_is_a_value_error() -> None:
    # The CLI turns ValueError into a one-line message and exit code 2.
    assert issubclass(ConfigError, ValueError)


BAD = [
    # not a number
    ({"LOOPLINE_VISIBILITY_TIMEOUT_S": "abc"}, "LOOPLINE_VISIBILITY_TIMEOUT_S"),
    ({"LOOPLINE_TASK_TIME_LIMIT_S": "1.5"}, "LOOPLINE_TASK_TIME_LIMIT_S"),
    ({"LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "soon"}, "LOOPLINE_TASK_SOFT_TIME_LIMIT_S"),
    ({"LOOPLINE_RESULT_EXPIRES_S": "1e3"}, "LOOPLINE_RESULT_EXPIRES_S"),
    ({"LOOPLINE_FETCH_MAX_BYTES": "10MB"}, "LOOPLINE_FETCH_MAX_BYTES"),
    ({"LOOPLINE_WEBHOOK_MAX_RETRIES": "three"}, "LOOPLINE_WEBHOOK_MAX_RETRIES"),
    ({"LOOPLINE_MAX_ARG_BYTES": "1 MiB"}, "LOOPLINE_MAX_ARG_BYTES"),
    ({"LOOPLINE_FETCH_TIMEOUT_S": "fast"}, "LOOPLINE_FETCH_TIMEOUT_S"),
    ({"LOOPLINE_WEBHOOK_BACKOFF_BASE_S": "1s"}, "LOOPLINE_WEBHOOK_BACKOFF_BASE_S"),
    ({"LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "5m"}, "LOOPLINE_WEBHOOK_BACKOFF_MAX_S"),
    ({"LOOPLINE_ASYNCIO_SYNC_THREADS": "many"}, "LOOPLINE_ASYNCIO_SYNC_THREADS"),
    ({"LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S": "30s"}, "LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S"),
    ({"LOOPLINE_ASYNCIO_BLOCKING_MS": "x"}, "LOOPLINE_ASYNCIO_BLOCKING_MS"),
    ({"LOOPLINE_TASK_LOG": "maybe"}, "LOOPLINE_TASK_LOG"),
    # negative or zero
    ({"LOOPLINE_VISIBILITY_TIMEOUT_S": "-1"}, "LOOPLINE_VISIBILITY_TIMEOUT_S"),
    ({"LOOPLINE_TASK_TIME_LIMIT_S": "0"}, "LOOPLINE_TASK_TIME_LIMIT_S"),
    ({"LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "-5"}, "LOOPLINE_TASK_SOFT_TIME_LIMIT_S"),
    ({"LOOPLINE_RESULT_EXPIRES_S": "0"}, "LOOPLINE_RESULT_EXPIRES_S"),
    ({"LOOPLINE_FETCH_MAX_BYTES": "-1"}, "LOOPLINE_FETCH_MAX_BYTES"),
    ({"LOOPLINE_MAX_ARG_BYTES": "0"}, "LOOPLINE_MAX_ARG_BYTES"),
    ({"LOOPLINE_FETCH_TIMEOUT_S": "-0.5"}, "LOOPLINE_FETCH_TIMEOUT_S"),
    ({"LOOPLINE_WEBHOOK_MAX_RETRIES": "-1"}, "LOOPLINE_WEBHOOK_MAX_RETRIES"),
    ({"LOOPLINE_ASYNCIO_SYNC_THREADS": "0"}, "LOOPLINE_ASYNCIO_SYNC_THREADS"),
    ({"LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S": "-1"}, "LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S"),
    ({"LOOPLINE_ASYNCIO_BLOCKING_MS": "0"}, "LOOPLINE_ASYNCIO_BLOCKING_MS"),
    ({"LOOPLINE_EVENT_FLUSH_MS": "0"}, "LOOPLINE_EVENT_FLUSH_MS"),
    # soft limit at or above the hard limit
    ({"LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "300", "LOOPLINE_TASK_TIME_LIMIT_S": "300"},
     "LOOPLINE_TASK_SOFT_TIME_LIMIT_S"),
    ({"LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "400", "LOOPLINE_TASK_TIME_LIMIT_S": "300"}, "LOOPLINE_TASK_TIME_LIMIT_S"),
    # visibility timeout not above the hard limit, or not above the longest webhook backoff
    ({"LOOPLINE_VISIBILITY_TIMEOUT_S": "300", "LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "10"}, "LOOPLINE_VISIBILITY_TIMEOUT_S"),
    ({"LOOPLINE_VISIBILITY_TIMEOUT_S": "100", "LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "10"}, "LOOPLINE_TASK_TIME_LIMIT_S"),
    ({"LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "3600"}, "LOOPLINE_WEBHOOK_BACKOFF_MAX_S"),
    # broker and backend schemes
    ({"LOOPLINE_BROKER_URL": "http://127.0.0.1:6379/0"}, "LOOPLINE_BROKER_URL"),
    ({"LOOPLINE_BROKER_URL": "127.0.0.1:6379"}, "LOOPLINE_BROKER_URL"),
    ({"LOOPLINE_RESULT_BACKEND": "amqp://127.0.0.1//"}, "LOOPLINE_RESULT_BACKEND"),
    # allowlist entries
    ({"LOOPLINE_URL_ALLOWLIST": "127.0.0.1,not a host"}, "LOOPLINE_URL_ALLOWLIST"),
    ({"LOOPLINE_URL_ALLOWLIST": "hooks..example.org"}, "LOOPLINE_URL_ALLOWLIST"),
    ({"LOOPLINE_URL_ALLOWLIST": "http://127.0.0.1/"}, "LOOPLINE_URL_ALLOWLIST"),
    ({"LOOPLINE_URL_ALLOWLIST": "a" * 64 + ".example.org"}, "LOOPLINE_URL_ALLOWLIST"),
    # flower auth
    ({"LOOPLINE_FLOWER_AUTH": "adminonly"}, "LOOPLINE_FLOWER_AUTH"),
]


@pytest.mark.parametrize(("env", "variable"), BAD, ids=[f"{i}-{v}" for i, (_, v) in enumerate(BAD)])
def test_bad_value_raises_config_error_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert variable in str(info.value)


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                            ("0", False), ("false", False), ("No", False), ("off", False)])
def test_switches_read_the_usual_spellings(raw: str, value: bool) -> None:
    assert Settings.from_env({"LOOPLINE_TASK_LOG": raw}).task_log is value


def test_a_bad_value_is_quoted_in_the_message() -> None:
    with pytest.raises(ConfigError, match="LOOPLINE_FETCH_MAX_BYTES='10MB'"):
        Settings.from_env({"LOOPLINE_FETCH_MAX_BYTES": "10MB"})


@pytest.mark.parametrize("scheme", ["redis", "rediss", "unix", "amqp", "amqps", "pyamqp"])
def test_broker_schemes_accepted(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1/0"
    assert Settings.from_env({"LOOPLINE_BROKER_URL": url}).broker_url == url


@pytest.mark.parametrize("entry", ["127.0.0.1", "::1", "10.0.0.0/8", "fd00::/8", "localhost", "Hooks.Example.ORG."])
def test_allowlist_entries_accepted(entry: str) -> None:
    assert Settings.from_env({"LOOPLINE_URL_ALLOWLIST": entry}).url_allowlist == (entry,)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LOOPLINE_WEBHOOK_BACKOFF_BASE_S": "-1"}, "LOOPLINE_WEBHOOK_BACKOFF_BASE_S"),
        ({"LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "-1"}, "LOOPLINE_WEBHOOK_BACKOFF_MAX_S"),
        ({"LOOPLINE_FETCH_TIMEOUT_S": "nan"}, "LOOPLINE_FETCH_TIMEOUT_S"),
    ],
)
def test_negative_or_nan_durations_are_refused(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


GUARD_REJECTS = ["127.0.0.1:8080", "*.example.org"]


@pytest.mark.parametrize("entry", GUARD_REJECTS)
def test_the_url_guard_rejects_these_entries(entry: str) -> None:
    from loopline.jobs.urlguard import Allowlist

    with pytest.raises(ValueError, match="LOOPLINE_URL_ALLOWLIST"):
        Allowlist.parse([entry])


@pytest.mark.parametrize("entry", GUARD_REJECTS)
def test_allowlist_entry_the_url_guard_rejects_fails_at_start_up(entry: str) -> None:
    with pytest.raises(ConfigError, match="LOOPLINE_URL_ALLOWLIST"):
        Settings.from_env({"LOOPLINE_URL_ALLOWLIST": entry})


@pytest.mark.parametrize("auth", [":", "admin:", ":s3cret"])
def test_flower_auth_with_an_empty_part_is_refused(auth: str) -> None:
    with pytest.raises(ConfigError, match="LOOPLINE_FLOWER_AUTH"):
        Settings.from_env({"LOOPLINE_FLOWER_AUTH": auth})


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://user:s3cret@127.0.0.1:6379/0", "redis://user:***@127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("amqp://guest:guest@127.0.0.1//", "amqp://guest:***@127.0.0.1//"),
        ("redis://u:p@ss@127.0.0.1/0", "redis://u:***@127.0.0.1/0"),
        ("rediss://u:pw@[::1]:6379/0", "rediss://u:***@[::1]:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LOOPLINE_BROKER_URL": "http://admin:s3cret@127.0.0.1:6379/0"}, "LOOPLINE_BROKER_URL"),
        ({"LOOPLINE_RESULT_BACKEND": "amqp://admin:s3cret@127.0.0.1//"}, "LOOPLINE_RESULT_BACKEND"),
    ],
)
def test_password_is_redacted_in_config_errors(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert variable in message
    assert "s3cret" not in message
    assert "admin:***@127.0.0.1" in message
