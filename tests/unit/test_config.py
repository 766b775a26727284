"""The configuration surface: environment parsing, defaults, round trip."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import celeryconfig
from core import settings
from core.settings import Settings, load_settings, to_environ


def test_defaults_without_environment():
    config = load_settings({}, read_secrets=False)
    assert config == Settings()
    assert config.broker == config.redis_url and config.results == config.redis_url


def test_values_are_parsed_by_type():
    config = load_settings({"T2I_DEFAULT_STEPS": "25", "T2I_S3_SECURE": "true",
                            "T2I_DEFAULT_GUIDANCE": "3.5", "T2I_BROKER_URL": "redis://b:1/2"},
                           read_secrets=False)
    assert (config.default_steps, config.s3_secure, config.default_guidance) == (25, True, 3.5)
    assert config.broker == "redis://b:1/2"


@pytest.mark.parametrize("env, value", [("T2I_DEFAULT_STEPS", "many"), ("T2I_S3_SECURE", "maybe")])
def test_bad_values_name_the_variable(env, value):
    with pytest.raises(ValueError, match=f"{env}='{value}'"):
        load_settings({env: value}, read_secrets=False)


def test_to_environ_round_trips():
    config = load_settings({"T2I_API_PORT": "9001", "HF_HUB_OFFLINE": "1"},
                           read_secrets=False)
    assert load_settings(to_environ(config), read_secrets=False) == config


def test_every_setting_is_documented():
    rows = settings.describe()
    assert len(rows) == len(to_environ(Settings()))
    assert all(doc for _, _, doc in rows)


def test_celery_options_suit_long_gpu_tasks():
    options = celeryconfig.celery_options(Settings(visibility_timeout_s=9000))
    assert options["task_acks_late"] and options["task_reject_on_worker_lost"]
    assert options["worker_prefetch_multiplier"] == 1
    assert options["broker_transport_options"]["visibility_timeout"] == 9000
    assert options["task_time_limit"] > options["task_soft_time_limit"]


def test_beat_sends_no_webhook_delivery_and_nothing_every_second():
    """Deliveries are sent by the write that makes them due; beat only sweeps up lost
    messages, so an idle stack's workers and Flower are not filled with no-op tasks."""
    schedule = celeryconfig.celery_options(Settings())["beat_schedule"]
    assert "webhooks.deliver" not in {entry["task"] for entry in schedule.values()}
    assert min(entry["schedule"] for entry in schedule.values()) >= 5  # eviction, the most often


def test_loading_writes_nothing_and_the_stack_makes_missing_secrets_once(tmp_path):
    config = load_settings({"T2I_STATE_DIR": str(tmp_path)})
    assert not any(tmp_path.iterdir())                  # loading never writes
    assert config.s3_secret_key == "" and config.api_keys == ""
    made = settings.ensure_secrets(config)               # what t2i-stack up calls
    files = sorted(p.name for p in (tmp_path / "secrets").iterdir())
    assert files == ["api-key-default", "flower-password", "s3-secret-key", "webhook-secret"]
    assert all((tmp_path / "secrets" / f).stat().st_mode & 0o777 == 0o600 for f in files)
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    assert len(made.s3_secret_key) >= 32 and made.flower_auth.startswith("admin:")
    assert load_settings({"T2I_STATE_DIR": str(tmp_path)}) == made  # read back, not remade
    assert settings.ensure_secrets(made) == made
    given = load_settings({"T2I_STATE_DIR": str(tmp_path), "T2I_S3_SECRET_KEY": "from-env"})
    assert given.s3_secret_key == "from-env"


def test_a_missing_secret_is_an_error_that_says_where_it_comes_from(tmp_path):
    config = load_settings({"T2I_STATE_DIR": str(tmp_path)})
    with pytest.raises(settings.SettingError, match="T2I_S3_SECRET_KEY is not set.*t2i-stack up"):
        settings.require_secret(config, "s3_secret_key")


@pytest.mark.parametrize("env, value, problem", [
    ("T2I_API_PORT", "70000", "not a TCP port"), ("T2I_SCHEDULER", "dpm", "one of ddim, euler"),
    ("T2I_CACHE_POLICY", "mru", "unknown"), ("T2I_S3_ENDPOINT", "nohost", "host:port"),
    ("T2I_DEFAULT_STEPS", "200", "T2I_MAX_STEPS=150"), ("T2I_CACHE_LOW_WATER", "1.5", "(0, 1]"),
    ("T2I_K_TABLE", "/no/such.json", "JSON file"), ("T2I_REDIS_URL", "localhost:6379", "scheme"),
    ("T2I_DEFAULT_SIZE", "100", "multiple of 8"), ("T2I_WEBHOOK_ALLOW", "localhost:80", "localhost"),
    ("T2I_SOFT_TIME_LIMIT_S", "700", "T2I_TIME_LIMIT_S=660"), ("T2I_DEVICE", "tpu", "cuda:N"),
    ("T2I_S3_BUCKET", "x", "bucket name"), ("T2I_WEBHOOK_TIMEOUT_S", "0", "above 0"),
    ("T2I_STEP_CACHE", "deepcache:1", "deepcache:N")])
def test_every_setting_is_checked_at_load_naming_the_variable_and_value(env, value, problem):
    with pytest.raises(settings.SettingError, match=f"{env}=.*{value}.*") as caught:
        load_settings({env: value}, read_secrets=False)
    assert problem in str(caught.value)


def test_a_bad_secret_is_named_but_never_shown():
    with pytest.raises(settings.SettingError) as caught:
        load_settings({"T2I_API_KEYS": "acme:shortkey"}, read_secrets=False)
    assert "T2I_API_KEYS=(secret)" in str(caught.value) and "shortkey" not in str(caught.value)


def test_api_keys_map_to_tenants_and_short_keys_are_refused():
    config = Settings(api_keys="acme:" + "a" * 20 + ", globex:" + "b" * 16)
    assert settings.api_key_tenants(config) == {"a" * 20: "acme", "b" * 16: "globex"}
    with pytest.raises(ValueError, match="'acme' needs tenant:key"):
        settings.api_key_tenants(Settings(api_keys="acme:short"))
    with pytest.raises(ValueError, match="T2I_CACHE_SCOPE='everyone'"):
        load_settings({"T2I_CACHE_SCOPE": "everyone"}, read_secrets=False)


def test_secrets_never_show_in_repr():
    config = Settings(s3_secret_key="s3-secret-value", flower_auth="admin:flower-secret",
                      api_keys="acme:" + "k" * 20, webhook_secret="hook-secret")
    assert not any(secret in repr(config)
                   for secret in ("s3-secret-value", "flower-secret", "kkkk", "hook-secret"))
    assert settings.secret_variables() == {"T2I_S3_SECRET_KEY", "T2I_FLOWER_AUTH",
                                               "T2I_API_KEYS", "T2I_WEBHOOK_SECRET"}


@pytest.mark.parametrize("command", [
    [sys.executable, "-c", "import celeryconfig, workers.app"],
    [str(Path(sys.executable).parent / "t2i"), "--help"],
    [str(Path(sys.executable).parent / "t2i"), "config"],
    [str(Path(sys.executable).parent / "t2i-stack"), "--help"]])
def test_importing_the_settings_and_asking_for_help_write_no_file(tmp_path, command):
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(command, env={"PATH": os.environ["PATH"], "HOME": str(home)},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any(home.rglob("*")), sorted(home.rglob("*"))
