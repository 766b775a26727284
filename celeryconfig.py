"""The one configuration surface: environment variables with documented defaults.

Celery reads the lower-case names at the bottom of this module (``app.config_from_object``);
every other part of the project takes the ``Settings`` object from ``load_settings()``.
Nothing else in the project reads the environment. ``t2i config`` prints the table of
variables with their defaults and current values.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.webhooks import parse_allowlist


def _setting(env: str, default: object, doc: str, secret: bool = False) -> object:
    # Secrets stay out of repr, so a logged or asserted Settings never shows them.
    return field(default=default, repr=not secret, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Settings:
    # Servers
    redis_url: str = _setting("T2I_REDIS_URL", "redis://127.0.0.1:6390/0",
                              "Redis for job records and the cache catalog")
    broker_url: str = _setting("T2I_BROKER_URL", "",
                               "Celery broker; empty means T2I_REDIS_URL")
    result_backend: str = _setting("T2I_RESULT_BACKEND", "",
                                   "Celery result backend; empty means T2I_REDIS_URL")
    s3_endpoint: str = _setting("T2I_S3_ENDPOINT", "127.0.0.1:8333",
                                "S3 API host:port (MinIO in production, SeaweedFS locally)")
    s3_access_key: str = _setting("T2I_S3_ACCESS_KEY", "t2i-local", "S3 access key id")
    s3_secret_key: str = _setting("T2I_S3_SECRET_KEY", "",
                                  "S3 secret key; empty: generated at first start into "
                                  "STATE_DIR/secrets/s3-secret-key (0600)", secret=True)
    s3_secure: bool = _setting("T2I_S3_SECURE", False, "use HTTPS for S3")
    s3_region: str = _setting("T2I_S3_REGION", "us-east-1", "S3 region (signatures need one)")
    s3_bucket: str = _setting("T2I_S3_BUCKET", "t2i", "bucket for images and cached latents")
    chroma_path: str = _setting("T2I_CHROMA_PATH", "",
                                "embedded Chroma directory; empty means STATE_DIR/chroma")
    chroma_url: str = _setting("T2I_CHROMA_URL", "",
                               "Chroma server URL (http://host:port); overrides T2I_CHROMA_PATH")
    state_dir: str = _setting("T2I_STATE_DIR", "~/.local/state/t2i",
                              "local stack: data, logs, PIDs, the built test model")
    api_host: str = _setting("T2I_API_HOST", "127.0.0.1", "HTTP API bind address")
    api_port: int = _setting("T2I_API_PORT", 8000, "HTTP API port")
    api_read_timeout_s: float = _setting("T2I_API_READ_TIMEOUT_S", 10.0,
                                         "HTTP API: a request (head and body) must arrive within "
                                         "this of its first byte, or the connection is closed")
    api_max_connections: int = _setting("T2I_API_MAX_CONNECTIONS", 1000,
                                        "HTTP API: open connections per process; more are "
                                        "answered 503")
    flower_port: int = _setting("T2I_FLOWER_PORT", 5555, "Flower port")
    flower_auth: str = _setting("T2I_FLOWER_AUTH", "",
                                "user:password for Flower's basic auth; empty: admin with a "
                                "password generated into STATE_DIR/secrets/flower-password",
                                secret=True)

    # Tenants
    api_keys: str = _setting("T2I_API_KEYS", "",
                             "comma-separated tenant:key pairs the HTTP API accepts; empty: "
                             "tenant 'default' with a key generated into "
                             "STATE_DIR/secrets/api-key-default", secret=True)
    cache_scope: str = _setting("T2I_CACHE_SCOPE", "tenant",
                                "tenant: a tenant's jobs reuse only its own latents (a shared "
                                "approximate cache leaks prompts across users); shared: all "
                                "tenants share one cache, for more savings")
    s3_master_port: int = _setting("T2I_S3_MASTER_PORT", 9333,
                                   "local stack: SeaweedFS master port (S3 port is in T2I_S3_ENDPOINT)")

    # Model
    model: str = _setting("T2I_MODEL", "tiny",
                          "'tiny' (a random-weight SD-architecture TEST model built here), "
                          "'sd15-random' (SD 1.5's architecture at full size, random weights, "
                          "built here: SD 1.5's cost per step on a GPU), "
                          "'scene' (the scene-world model trained by quality.world_model, "
                          "committed), a local diffusers directory, or a hub id")
    scheduler: str = _setting("T2I_SCHEDULER", "ddim", "ddim or euler")
    device: str = _setting("T2I_DEVICE", "auto", "auto, cpu, cuda, cuda:N")
    torch_threads: int = _setting("T2I_TORCH_THREADS", 0,
                                  "CPU threads per worker process for torch; 0 = torch's default "
                                  "(set 1 when several workers share few cores)")
    hf_hub_offline: bool = _setting("HF_HUB_OFFLINE", False,
                                    "never reach the hub when loading a model")

    # Approximate caching
    cache_enabled: bool = _setting("T2I_CACHE", True,
                                   "approximate caching on (1) or off (0: every job runs in full)")
    embedder: str = _setting("T2I_EMBEDDER", "minilm",
                             "prompt embedder for the lookup: minilm (all-MiniLM-L6-v2, 384-d) "
                             "or clip (the served model's text encoder, pooled)")
    k_table: str = _setting("T2I_K_TABLE", "reference",
                            "similarity -> K table: 'reference' (NIRVANA's) or a JSON file path")

    cache_admit_resumed: bool = _setting("T2I_CACHE_ADMIT_RESUMED", True,
                                         "a job resumed from K keeps its own latents at the K "
                                         "set above K, so its repeats resume later (0 = only "
                                         "full generations are cached)")

    cache_policy: str = _setting("T2I_CACHE_POLICY", "lcbfu",
                                 "eviction policy: lcbfu, lru, lfu, fifo or none")
    cache_max_bytes: int = _setting("T2I_CACHE_MAX_BYTES", 2 * 1024**3,
                                    "latent bytes the cache may hold (0 = no limit)")
    cache_max_items: int = _setting("T2I_CACHE_MAX_ITEMS", 0,
                                    "(entry, K) items the cache may hold (0 = no limit)")
    cache_low_water: float = _setting("T2I_CACHE_LOW_WATER", 0.9,
                                      "eviction stops at this fraction of the budget")
    cache_keep_recent_s: float = _setting("T2I_CACHE_KEEP_RECENT_S", 0.0,
                                          "spare the last item of a prompt used this recently "
                                          "(0 = off)")
    cache_decay_half_life_s: float = _setting("T2I_CACHE_DECAY_HALF_LIFE_S", 0.0,
                                              "LCBFU score decays with idle time at this "
                                              "half-life (0 = plain K x hits)")
    evict_interval_s: float = _setting("T2I_EVICT_INTERVAL_S", 5.0, "beat: eviction check period")
    sweep_interval_s: float = _setting("T2I_SWEEP_INTERVAL_S", 300.0, "beat: orphan sweep period")
    sweep_grace_s: float = _setting("T2I_SWEEP_GRACE_S", 600.0,
                                    "the sweep leaves objects and records younger than this")

    predictor_enabled: bool = _setting("T2I_PREDICTOR", False,
                                       "use the one-class SVM match predictor once trained "
                                       "(off by default: see docs/cache-manager.md)")
    predictor_min_samples: int = _setting("T2I_PREDICTOR_MIN_SAMPLES", 200,
                                          "matched prompts needed before the first training")
    predictor_max_samples: int = _setting("T2I_PREDICTOR_MAX_SAMPLES", 5000,
                                          "most recent matched prompts kept for training")
    predictor_nu: float = _setting("T2I_PREDICTOR_NU", 0.1,
                                   "SVM nu: at most this share of training prompts is outside")
    predictor_audit_fraction: float = _setting("T2I_PREDICTOR_AUDIT_FRACTION", 0.1,
                                               "share of predicted misses looked up anyway, "
                                               "to measure the predictor")
    predictor_train_interval_s: float = _setting("T2I_PREDICTOR_TRAIN_INTERVAL_S", 600.0,
                                                 "beat: predictor training period")
    predictor_check_interval_s: float = _setting("T2I_PREDICTOR_CHECK_INTERVAL_S", 10.0,
                                                 "triage checks for a newer model this often")

    # Request defaults and limits
    default_steps: int = _setting("T2I_DEFAULT_STEPS", 50, "denoising steps when a job names none")
    max_steps: int = _setting("T2I_MAX_STEPS", 150, "most steps a job may ask for")
    default_size: int = _setting("T2I_DEFAULT_SIZE", 512, "width and height when a job names none")
    max_size: int = _setting("T2I_MAX_SIZE", 1024, "largest width or height")
    default_guidance: float = _setting("T2I_DEFAULT_GUIDANCE", 7.5, "classifier-free guidance scale")
    max_prompt_chars: int = _setting("T2I_MAX_PROMPT_CHARS", 2000, "longest prompt accepted")

    # Long GPU tasks
    soft_time_limit_s: int = _setting("T2I_SOFT_TIME_LIMIT_S", 600,
                                      "a generation is asked to stop after this long")
    time_limit_s: int = _setting("T2I_TIME_LIMIT_S", 660, "a generation is killed after this long")
    visibility_timeout_s: int = _setting("T2I_VISIBILITY_TIMEOUT_S", 7200,
                                         "unacked messages are redelivered after this long; "
                                         "must exceed the longest queue wait plus run time")
    max_deliveries: int = _setting("T2I_MAX_DELIVERIES", 3,
                                   "a job whose worker died this many times while generating it "
                                   "is failed, not retried (a poison job)")
    store_outage_s: float = _setting("T2I_STORE_OUTAGE_S", 120.0,
                                     "a finished image waits this long for the object store to "
                                     "come back before its job fails")
    redis_outage_s: float = _setting("T2I_REDIS_OUTAGE_S", 300.0,
                                     "a worker holding a job waits this long for Redis to come "
                                     "back before it gives the job up")
    reconcile_interval_s: float = _setting("T2I_RECONCILE_INTERVAL_S", 30.0,
                                           "beat: how often stranded jobs are looked for")
    reconcile_quiet_s: float = _setting("T2I_RECONCILE_QUIET_S", 120.0,
                                        "an unfinished job with no sign of life for this long "
                                        "and no broker message is re-sent to its stage's queue "
                                        "(failed after T2I_MAX_DELIVERIES re-sends)")
    job_ttl_s: int = _setting("T2I_JOB_TTL_S", 7 * 24 * 3600, "job records expire after this long")
    image_url_ttl_s: int = _setting("T2I_IMAGE_URL_TTL_S", 3600, "presigned image URLs expire after")

    # Webhooks and logs
    webhook_secret: str = _setting("T2I_WEBHOOK_SECRET", "",
                                   "master key of the webhook signatures (each tenant's is "
                                   "derived from it); empty: generated into "
                                   "STATE_DIR/secrets/webhook-secret", secret=True)
    webhook_allow: str = _setting("T2I_WEBHOOK_ALLOW", "",
                                  "internal webhook receivers allowed despite the address "
                                  "policy: comma-separated networks or addresses, each with "
                                  "an optional port (10.0.0.0/8, 127.0.0.1:9000, [fd00::1]:443); "
                                  "empty: only public addresses")
    webhook_max_attempts: int = _setting("T2I_WEBHOOK_MAX_ATTEMPTS", 8,
                                         "a webhook is given up after this many failed POSTs "
                                         "(retries back off 1, 2, 4 ... s, at most 10 min)")
    webhook_timeout_s: float = _setting("T2I_WEBHOOK_TIMEOUT_S", 5.0,
                                        "total deadline of one POST: connect, send and the "
                                        "answer's status line")
    webhook_concurrency: int = _setting("T2I_WEBHOOK_CONCURRENCY", 16,
                                        "deliveries the webhook worker runs at once (threads)")
    webhook_sweep_interval_s: float = _setting("T2I_WEBHOOK_SWEEP_INTERVAL_S", 30.0,
                                               "beat: how often deliveries whose message was "
                                               "lost are sent again")
    worker_alive_file: str = _setting("T2I_WORKER_ALIVE_FILE", "",
                                      "a worker touches this file every 10 s once ready (its "
                                      "liveness probe needs no broker); empty: none")
    log_format: str = _setting("T2I_LOG_FORMAT", "json",
                               "json: one JSON object per line with the job id; text: plain")

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def results(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def chroma_dir(self) -> Path:
        return Path(self.chroma_path).expanduser() if self.chroma_path else self.state_path / "chroma"

    @property
    def redis_port(self) -> int:
        return urlsplit(self.redis_url).port or 6379

    @property
    def s3_port(self) -> int:
        return int(self.s3_endpoint.rsplit(":", 1)[1])


def _parse(raw: str, kind: type, env: str) -> object:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{env}={raw!r} is not a boolean (use 1/0, true/false)")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a valid {kind.__name__}") from None


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def load_settings(environ: Mapping[str, str] | None = None,
                  resolve_secrets: bool = True) -> Settings:
    """Build Settings from environment variables (``os.environ`` unless given); secrets not
    set there come from the state directory (see ``with_secrets``)."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(Settings):
        env = f.metadata["env"]
        if env in environ:
            values[f.name] = _parse(environ[env], _TYPES[f.type], env)
    config = Settings(**values)
    if config.cache_scope not in ("tenant", "shared"):
        raise ValueError(f"T2I_CACHE_SCOPE={config.cache_scope!r}: use tenant or shared")
    parse_allowlist(config.webhook_allow)  # raises naming the bad entry
    return with_secrets(config) if resolve_secrets else config


def _stored_secret(directory: Path, name: str) -> str:
    """The secret in ``directory/name``, created (random, mode 0600) if it does not exist."""
    path = directory / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def with_secrets(config: Settings) -> Settings:
    """Fill the secrets the environment left empty from STATE_DIR/secrets, generating them on
    first use, so no secret is ever in the repository or a default."""
    directory = config.state_path / "secrets"
    return replace(
        config,
        s3_secret_key=config.s3_secret_key or _stored_secret(directory, "s3-secret-key"),
        flower_auth=config.flower_auth or f"admin:{_stored_secret(directory, 'flower-password')}",
        api_keys=config.api_keys or f"default:{_stored_secret(directory, 'api-key-default')}",
        webhook_secret=config.webhook_secret or _stored_secret(directory, "webhook-secret"))


def api_key_tenants(config: Settings) -> dict[str, str]:
    """API key -> tenant, from T2I_API_KEYS ("tenant:key,tenant:key")."""
    tenants = {}
    for pair in filter(None, (p.strip() for p in config.api_keys.split(","))):
        tenant, _, key = pair.partition(":")
        if not tenant or len(key) < 16:
            raise ValueError(f"T2I_API_KEYS: {tenant or pair!r} needs tenant:key with a key of "
                             "at least 16 characters")
        tenants[key] = tenant
    return tenants


def to_environ(config: Settings) -> dict[str, str]:
    """The environment variables that make ``load_settings()`` return ``config`` (for the
    processes the local stack and the tests start)."""
    environ = {}
    for f in fields(Settings):
        value = getattr(config, f.name)
        environ[f.metadata["env"]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return environ


def secret_variables() -> frozenset[str]:
    """The variables holding secrets: never printed."""
    return frozenset(f.metadata["env"] for f in fields(Settings) if not f.repr)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the documentation table."""
    return [(f.metadata["env"], repr(f.default), f.metadata["doc"]) for f in fields(Settings)]


def celery_options(config: Settings) -> dict[str, Any]:
    """Celery's own settings for ``config``; see the notes for why each long-task value."""
    return {
        "broker_url": config.broker,
        "result_backend": config.results,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        # Ack only after the task finished, so a worker killed mid-job leaves its message to
        # be redelivered; one message at a time per worker process.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Pool processes load the model before taking jobs; give them time to do so.
        "worker_proc_alive_timeout": 300,
        "task_soft_time_limit": config.soft_time_limit_s,
        "task_time_limit": config.time_limit_s,
        # Redis redelivers unacked messages after this; it must exceed queue wait + run time,
        # or a long-waiting job would run twice.
        "broker_transport_options": {"visibility_timeout": config.visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": config.visibility_timeout_s},
        "result_expires": config.job_ttl_s,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": "triage",
        "task_routes": {
            "triage.*": {"queue": "triage"},
            "gen.full": {"queue": "gen.full"},
            "gen.resume": {"queue": "gen.resume"},
            "cache.*": {"queue": "cache"},
            "jobs.*": {"queue": "cache"},
            "webhooks.*": {"queue": "webhooks"},
        },
        # Periodic cache maintenance; a message not started within its period expires, so
        # a stopped cache worker does not come back to a pile of stale runs.
        "beat_schedule": {
            "cache-evict": {"task": "cache.evict", "schedule": config.evict_interval_s,
                            "options": {"expires": config.evict_interval_s}},
            "cache-sweep": {"task": "cache.sweep", "schedule": config.sweep_interval_s,
                            "options": {"expires": config.sweep_interval_s}},
            "cache-train-predictor": {"task": "cache.train_predictor",
                                      "schedule": config.predictor_train_interval_s,
                                      "options": {"expires": config.predictor_train_interval_s}},
            "jobs-reconcile": {"task": "jobs.reconcile", "schedule": config.reconcile_interval_s,
                               "options": {"expires": config.reconcile_interval_s}},
            "webhooks-sweep": {"task": "webhooks.sweep",
                               "schedule": config.webhook_sweep_interval_s,
                               "options": {"expires": config.webhook_sweep_interval_s}},
        },
    }


settings = load_settings()
# Celery reads these module-level names (app.config_from_object("celeryconfig")).
globals().update(celery_options(settings))
