"""The configuration surface: environment parsing, defaults, round trip."""

import pytest

import celeryconfig
from celeryconfig import Settings, load_settings, to_environ


def test_defaults_without_environment():
    config = load_settings({})
    assert config == Settings()
    assert config.broker == config.redis_url and config.results == config.redis_url


def test_values_are_parsed_by_type():
    config = load_settings({"T2I_DEFAULT_STEPS": "25", "T2I_S3_SECURE": "true",
                            "T2I_DEFAULT_GUIDANCE": "3.5", "T2I_BROKER_URL": "redis://b:1/2"})
    assert (config.default_steps, config.s3_secure, config.default_guidance) == (25, True, 3.5)
    assert config.broker == "redis://b:1/2"


@pytest.mark.parametrize("env, value", [("T2I_DEFAULT_STEPS", "many"), ("T2I_S3_SECURE", "maybe")])
def test_bad_values_name_the_variable(env, value):
    with pytest.raises(ValueError, match=f"{env}='{value}'"):
        load_settings({env: value})


def test_to_environ_round_trips():
    config = load_settings({"T2I_API_PORT": "9001", "HF_HUB_OFFLINE": "1"})
    assert load_settings(to_environ(config)) == config


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
