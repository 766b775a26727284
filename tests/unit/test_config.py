"""The configuration surface: environment parsing, defaults, round trip."""

import pytest

import celeryconfig
from celeryconfig import Settings, load_settings, to_environ


def test_defaults_without_environment():
    config = load_settings({}, resolve_secrets=False)
    assert config == Settings()
    assert config.broker == config.redis_url and config.results == config.redis_url


def test_values_are_parsed_by_type():
    config = load_settings({"T2I_DEFAULT_STEPS": "25", "T2I_S3_SECURE": "true",
                            "T2I_DEFAULT_GUIDANCE": "3.5", "T2I_BROKER_URL": "redis://b:1/2"},
                           resolve_secrets=False)
    assert (config.default_steps, config.s3_secure, config.default_guidance) == (25, True, 3.5)
    assert config.broker == "redis://b:1/2"


@pytest.mark.parametrize("env, value", [("T2I_DEFAULT_STEPS", "many"), ("T2I_S3_SECURE", "maybe")])
def test_bad_values_name_the_variable(env, value):
    with pytest.raises(ValueError, match=f"{env}='{value}'"):
        load_settings({env: value}, resolve_secrets=False)


def test_to_environ_round_trips():
    config = load_settings({"T2I_API_PORT": "9001", "HF_HUB_OFFLINE": "1"},
                           resolve_secrets=False)
    assert load_settings(to_environ(config), resolve_secrets=False) == config


def test_every_setting_is_documented():
    rows = celeryconfig.describe()
    assert len(rows) == len(to_environ(Settings()))
    assert all(doc for _, _, doc in rows)


def test_celery_options_suit_long_gpu_tasks():
    options = celeryconfig.celery_options(Settings(visibility_timeout_s=9000))
    assert options["task_acks_late"] and options["task_reject_on_worker_lost"]
    assert options["worker_prefetch_multiplier"] == 1
    assert options["broker_transport_options"]["visibility_timeout"] == 9000
    assert options["task_time_limit"] > options["task_soft_time_limit"]


def test_missing_secrets_are_generated_once_into_the_state_directory(tmp_path):
    config = load_settings({"T2I_STATE_DIR": str(tmp_path)})
    files = sorted(p.name for p in (tmp_path / "secrets").iterdir())
    assert files == ["api-key-default", "flower-password", "s3-secret-key", "webhook-secret"]
    assert all((tmp_path / "secrets" / f).stat().st_mode & 0o777 == 0o600 for f in files)
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    assert len(config.s3_secret_key) >= 32 and config.flower_auth.startswith("admin:")
    assert load_settings({"T2I_STATE_DIR": str(tmp_path)}) == config  # stable across processes
    given = load_settings({"T2I_STATE_DIR": str(tmp_path), "T2I_S3_SECRET_KEY": "from-env"})
    assert given.s3_secret_key == "from-env"


def test_api_keys_map_to_tenants_and_short_keys_are_refused():
    config = Settings(api_keys="acme:" + "a" * 20 + ", globex:" + "b" * 16)
    assert celeryconfig.api_key_tenants(config) == {"a" * 20: "acme", "b" * 16: "globex"}
    with pytest.raises(ValueError, match="'acme' needs tenant:key"):
        celeryconfig.api_key_tenants(Settings(api_keys="acme:short"))
    with pytest.raises(ValueError, match="T2I_CACHE_SCOPE='everyone'"):
        load_settings({"T2I_CACHE_SCOPE": "everyone"}, resolve_secrets=False)


def test_secrets_never_show_in_repr():
    config = Settings(s3_secret_key="s3-secret-value", flower_auth="admin:flower-secret",
                      api_keys="acme:" + "k" * 20, webhook_secret="hook-secret")
    assert not any(secret in repr(config)
                   for secret in ("s3-secret-value", "flower-secret", "kkkk", "hook-secret"))
    assert celeryconfig.secret_variables() == {"T2I_S3_SECRET_KEY", "T2I_FLOWER_AUTH",
                                               "T2I_API_KEYS", "T2I_WEBHOOK_SECRET"}
