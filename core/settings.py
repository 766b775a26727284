"""Settings: environment variables with documented defaults, validated when they are read.

Every part of the project takes a ``Settings`` from ``load_settings()``; nothing else reads
the environment. Loading does no other work: it writes no file. Secrets come from the
environment or, failing that, from files under STATE_DIR/secrets that the commands that
start servers make (``ensure_secrets``: ``t2i-stack up``, the test fixtures, benchmarks
that start their own stack). ``t2i config`` prints the table of variables.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.addons import parse_controlnets
from core.affinity import MODES as AFFINITY_MODES
from core.errors import SettingError
from core.stepcache import StepCache
from core.webhooks import parse_allowlist

Check = Callable[[Any], "str | None"]
"""A setting's check: None when the value is good, else what is wrong with it."""


def _setting(env: str, default: object, doc: str, secret: bool = False,
             check: Check | None = None) -> Any:
    # Secrets stay out of repr, so a logged or asserted Settings never shows them.
    return field(default=default, repr=not secret,
                 metadata={"env": env, "doc": doc, "check": check})


def _at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low}"


def _between(low: float, high: float) -> Check:
    return lambda value: None if low <= value <= high else f"must be in [{low}, {high}]"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be above 0"


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "is not a TCP port (1-65535)"


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _url(*schemes: str, empty: bool = False) -> Check:
    def check(value: str) -> str | None:
        if not value and empty:
            return None
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.netloc or parts.path):
            return f"must be a URL with scheme {' or '.join(schemes)}"
        return None
    return check


def _host_port(value: str) -> str | None:
    host, _, port = value.rpartition(":")
    return None if host and port.isdigit() and _port(int(port)) is None else \
        "must be host:port"


def _bucket_name(value: str) -> str | None:
    return None if re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value) else \
        "is not an S3 bucket name (3-63 lower-case letters, digits, '.', '-')"


def _device(value: str) -> str | None:
    return None if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) else \
        "must be auto, cpu, mps, cuda or cuda:N"


def _image_side(value: int) -> str | None:
    return None if value >= 64 and value % 8 == 0 else "must be a multiple of 8, at least 64"


def _k_table(value: str) -> str | None:
    return None if value in ("auto", "reference") or Path(value).expanduser().is_file() else \
        "is neither 'auto', 'reference' nor a JSON file that exists"


def _parses(parse: Callable[[str], object]) -> Check:
    """A check that the value parses; the parser's error is the problem."""
    def check(value: str) -> str | None:
        try:
            parse(value)
        except ValueError as exc:
            return str(exc)
        return None
    return check


def _policy(name: str) -> object:
    from cachemgr.policies import policy_by_name  # pure, but cachemgr builds on core

    return policy_by_name(name)


def _user_password(value: str) -> str | None:
    return None if not value or ":" in value else "must be user:password"


def parse_api_keys(text: str) -> dict[str, str]:
    """API key -> tenant, from "tenant:key,tenant:key"; raises ValueError naming a bad pair."""
    tenants = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        tenant, _, key = pair.partition(":")
        if not tenant or len(key) < 16:
            raise ValueError(f"{tenant or pair!r} needs tenant:key with a key of at least 16 "
                             "characters")
        tenants[key] = tenant
    return tenants


@dataclass(frozen=True)
class Settings:
    # Servers
    redis_url: str = _setting("T2I_REDIS_URL", "redis://127.0.0.1:6390/0",
                              "Redis for job records and the cache catalog",
                              check=_url("redis", "rediss", "unix"))
    broker_url: str = _setting("T2I_BROKER_URL", "",
                               "Celery broker; empty means T2I_REDIS_URL",
                               check=_url("redis", "rediss", "amqp", "amqps", "sqs", empty=True))
    result_backend: str = _setting("T2I_RESULT_BACKEND", "",
                                   "Celery result backend; empty means T2I_REDIS_URL",
                                   check=_url("redis", "rediss", "db+postgresql", "rpc",
                                              empty=True))
    s3_endpoint: str = _setting("T2I_S3_ENDPOINT", "127.0.0.1:8333",
                                "S3 API host:port (MinIO in production, SeaweedFS locally)",
                                check=_host_port)
    s3_access_key: str = _setting("T2I_S3_ACCESS_KEY", "t2i-local", "S3 access key id",
                                  check=_not_empty)
    s3_secret_key: str = _setting("T2I_S3_SECRET_KEY", "",
                                  "S3 secret key; empty: generated at first start into "
                                  "STATE_DIR/secrets/s3-secret-key (0600)", secret=True)
    s3_secure: bool = _setting("T2I_S3_SECURE", False, "use HTTPS for S3")
    s3_public_url: str = _setting("T2I_S3_PUBLIC_URL", "",
                                  "where browsers reach S3 (scheme://host[:port]): presigned "
                                  "image URLs are signed for it (a signed URL cannot be "
                                  "rewritten); empty: T2I_S3_ENDPOINT",
                                  check=_url("http", "https", empty=True))
    s3_region: str = _setting("T2I_S3_REGION", "us-east-1", "S3 region (signatures need one)",
    check=_not_empty)
    s3_bucket: str = _setting("T2I_S3_BUCKET", "t2i", "bucket for images and cached latents",
    check=_bucket_name)
    chroma_path: str = _setting("T2I_CHROMA_PATH", "",
                                "embedded Chroma directory; empty means STATE_DIR/chroma")
    chroma_url: str = _setting("T2I_CHROMA_URL", "",
                               "Chroma server URL (http://host:port); overrides T2I_CHROMA_PATH",
                               check=_url("http", "https", empty=True))
    state_dir: str = _setting("T2I_STATE_DIR", "~/.local/state/t2i",
                              "local stack: data, logs, PIDs, the built test model",
                              check=_not_empty)
    api_host: str = _setting("T2I_API_HOST", "127.0.0.1", "HTTP API bind address", check=_not_empty)
    api_port: int = _setting("T2I_API_PORT", 8000, "HTTP API port", check=_port)
    api_read_timeout_s: float = _setting("T2I_API_READ_TIMEOUT_S", 10.0,
                                         "HTTP API: a request (head and body) must arrive within "
                                         "this of its first byte, or the connection is closed",
                                         check=_positive)
    api_max_connections: int = _setting("T2I_API_MAX_CONNECTIONS", 1000,
                                        "HTTP API: open connections per process; more are "
                                        "answered 503", check=_at_least(1))
    flower_port: int = _setting("T2I_FLOWER_PORT", 5555, "Flower port", check=_port)
    flower_auth: str = _setting("T2I_FLOWER_AUTH", "",
                                "user:password for Flower's basic auth; empty: admin with a "
                                "password generated into STATE_DIR/secrets/flower-password",
                                secret=True, check=_user_password)

    # Tenants
    api_keys: str = _setting("T2I_API_KEYS", "",
                             "comma-separated tenant:key pairs the HTTP API accepts; empty: "
                             "tenant 'default' with a key generated into "
                             "STATE_DIR/secrets/api-key-default", secret=True, check=_parses(parse_api_keys))
    cache_scope: str = _setting("T2I_CACHE_SCOPE", "tenant",
                                "tenant: a tenant's jobs reuse only its own latents (a shared "
                                "approximate cache leaks prompts across users); shared: all "
                                "tenants share one cache, for more savings",
                                check=_one_of("tenant", "shared"))
    s3_master_port: int = _setting("T2I_S3_MASTER_PORT", 9333,
                                   "local stack: SeaweedFS master port (S3 port is in "
                                   "T2I_S3_ENDPOINT)",
                                   check=_port)

    # Model
    model: str = _setting("T2I_MODEL", "tiny",
                          "'tiny' (a random-weight SD-architecture TEST model built here), "
                          "'sd15-random' (SD 1.5's architecture at full size, random weights, "
                          "built here: SD 1.5's cost per step on a GPU), "
                          "'scene' (the scene-world model trained by quality.world_model, "
                          "committed), a local diffusers directory, or a hub id", check=_not_empty)
    scheduler: str = _setting("T2I_SCHEDULER", "ddim", "ddim or euler",
    check=_one_of("ddim", "euler"))
    device: str = _setting("T2I_DEVICE", "auto", "auto, cpu, cuda, cuda:N", check=_device)
    torch_threads: int = _setting("T2I_TORCH_THREADS", 0,
                                  "CPU threads per worker process for torch; 0 = torch's default "
                                  "(set 1 when several workers share few cores)",
                                  check=_at_least(0))
    gpu_batch: int = _setting("T2I_GPU_BATCH", 1,
                              "jobs a GPU worker process advances together, one UNet call per "
                              "step (jobs join and leave at step boundaries); 1: one job at a "
                              "time", check=_at_least(1))
    hf_hub_offline: bool = _setting("HF_HUB_OFFLINE", False,
                                    "never reach the hub when loading a model")

    # Approximate caching
    cache_enabled: bool = _setting("T2I_CACHE", True,
                                   "approximate caching on (1) or off (0: every job runs in full)")
    embedder: str = _setting("T2I_EMBEDDER", "auto",
                             "prompt embedder for the lookup: minilm (all-MiniLM-L6-v2, 384-d), "
                             "clip (the served model's text encoder, pooled), or auto (the one "
                             "the model was profiled best with (scene), else minilm)",
                             check=_one_of("auto", "minilm", "clip"))
    k_table: str = _setting("T2I_K_TABLE", "auto",
                            "similarity -> K table: 'reference' (NIRVANA's), a JSON file path, "
                            "or auto (the table profiled for the model and embedder: the scene "
                            "model's, else reference)", check=_k_table)

    step_cache: str = _setting("T2I_STEP_CACHE", "auto",
                               "within-request step cache: off, deepcache:N (every N-th step "
                               "of a run runs the whole UNet, the others reuse its deep "
                               "features and run the outer blocks only), or auto (what the "
                               "K table names: off for the reference table)",
                               check=_parses(lambda v: v == "auto" or StepCache.parse(v)))

    lora_from: float = _setting("T2I_LORA_FROM", 0.2,
                                "fraction of a LoRA job's steps that run on the base model "
                                "while a missing adapter loads; from there on the adapter "
                                "acts (0: from the first step; part of the cache partition's "
                                "meaning, so change it with triage and GPU workers together)",
                                check=_between(0.0, 0.5))
    lora_cache_mb: int = _setting("T2I_LORA_CACHE_MB", 512,
                                  "LoRA weights a GPU worker keeps resident (MiB; least "
                                  "recently used out first)", check=_positive)
    lora_affinity: str = _setting("T2I_LORA_AFFINITY", "free",
                                  "where triage sends a LoRA job (core.affinity): free (to a "
                                  "GPU worker holding its LoRAs while it has a free slot), "
                                  "queue (also up to a batch waiting there when every worker "
                                  "is busy: for slow LoRA loads), off (the shared queue)",
                                  check=_one_of(*AFFINITY_MODES))
    lora_max_bytes: int = _setting("T2I_LORA_MAX_BYTES", 128 * 2**20,
                                   "largest LoRA file an upload may be (bytes)",
                                   check=_positive)
    lora_max_rank: int = _setting("T2I_LORA_MAX_RANK", 128, "highest LoRA rank an upload may "
                                                            "have", check=_positive)

    controlnets: str = _setting("T2I_CONTROLNETS", "auto",
                                "ControlNets GPU workers serve: name=path,... (diffusers "
                                "ControlNet directories for the served model), or auto (the "
                                "scene model's layout ControlNet for scene, else none)",
                                check=_parses(lambda v: v == "auto" or parse_controlnets(v)))
    controlnet_parallel: bool = _setting("T2I_CONTROLNET_PARALLEL", False,
                                         "run a ControlNet on its own thread beside the UNet's "
                                         "down blocks (1: pays off when the UNet call leaves "
                                         "cores idle, e.g. T2I_TORCH_THREADS=1 on a CPU) or "
                                         "before the UNet call (0)")

    cache_admit_resumed: bool = _setting("T2I_CACHE_ADMIT_RESUMED", True,
                                         "a job resumed from K keeps its own latents at the K "
                                         "set above K, so its repeats resume later (0 = only "
                                         "full generations are cached)")

    cache_policy: str = _setting("T2I_CACHE_POLICY", "lcbfu",
                                 "eviction policy: lcbfu, lru, lfu, fifo or none",
                                 check=_parses(_policy))
    cache_max_bytes: int = _setting("T2I_CACHE_MAX_BYTES", 2 * 1024**3,
                                    "latent bytes the cache may hold (0 = no limit)",
                                    check=_at_least(0))
    cache_max_items: int = _setting("T2I_CACHE_MAX_ITEMS", 0,
                                    "(entry, K) items the cache may hold (0 = no limit)",
                                    check=_at_least(0))
    cache_low_water: float = _setting("T2I_CACHE_LOW_WATER", 0.9,
                                      "eviction stops at this fraction of the budget",
                                      check=_fraction)
    cache_keep_recent_s: float = _setting("T2I_CACHE_KEEP_RECENT_S", 0.0,
                                          "spare the last item of a prompt used this recently "
                                          "(0 = off)", check=_at_least(0))
    cache_decay_half_life_s: float = _setting("T2I_CACHE_DECAY_HALF_LIFE_S", 0.0,
                                              "LCBFU score decays with idle time at this "
                                              "half-life (0 = plain K x hits)", check=_at_least(0))
    evict_interval_s: float = _setting("T2I_EVICT_INTERVAL_S", 5.0, "beat: eviction check period",
    check=_positive)
    sweep_interval_s: float = _setting("T2I_SWEEP_INTERVAL_S", 300.0, "beat: orphan sweep period",
    check=_positive)
    sweep_grace_s: float = _setting("T2I_SWEEP_GRACE_S", 600.0,
                                    "the sweep leaves objects and records younger than this",
                                    check=_at_least(0))

    predictor_enabled: bool = _setting("T2I_PREDICTOR", False,
                                       "use the one-class SVM match predictor once trained "
                                       "(off by default: see docs/cache-manager.md)")
    predictor_min_samples: int = _setting("T2I_PREDICTOR_MIN_SAMPLES", 200,
                                          "matched prompts needed before the first training",
                                          check=_at_least(1))
    predictor_max_samples: int = _setting("T2I_PREDICTOR_MAX_SAMPLES", 5000,
                                          "most recent matched prompts kept for training",
                                          check=_at_least(1))
    predictor_nu: float = _setting("T2I_PREDICTOR_NU", 0.1,
                                   "SVM nu: at most this share of training prompts is outside",
                                   check=_fraction)
    predictor_audit_fraction: float = _setting("T2I_PREDICTOR_AUDIT_FRACTION", 0.1,
                                               "share of predicted misses looked up anyway, "
                                               "to measure the predictor", check=_between(0, 1))
    predictor_train_interval_s: float = _setting("T2I_PREDICTOR_TRAIN_INTERVAL_S", 600.0,
                                                 "beat: predictor training period", check=_positive)
    predictor_check_interval_s: float = _setting("T2I_PREDICTOR_CHECK_INTERVAL_S", 10.0,
                                                 "triage checks for a newer model this often",
                                                 check=_positive)

    # Request defaults and limits
    default_steps: int = _setting("T2I_DEFAULT_STEPS", 50, "denoising steps when a job names none",
    check=_at_least(1))
    max_steps: int = _setting("T2I_MAX_STEPS", 150, "most steps a job may ask for",
    check=_at_least(1))
    default_size: int = _setting("T2I_DEFAULT_SIZE", 512, "width and height when a job names none",
    check=_image_side)
    max_size: int = _setting("T2I_MAX_SIZE", 1024, "largest width or height", check=_image_side)
    default_guidance: float = _setting("T2I_DEFAULT_GUIDANCE", 7.5,
                                       "classifier-free guidance scale",
    check=_between(0, 50))
    max_prompt_chars: int = _setting("T2I_MAX_PROMPT_CHARS", 2000, "longest prompt accepted",
    check=_at_least(1))

    # Long GPU tasks
    soft_time_limit_s: int = _setting("T2I_SOFT_TIME_LIMIT_S", 600,
                                      "a generation is asked to stop after this long",
                                      check=_at_least(1))
    time_limit_s: int = _setting("T2I_TIME_LIMIT_S", 660, "a generation is killed after this long",
    check=_at_least(1))
    visibility_timeout_s: int = _setting("T2I_VISIBILITY_TIMEOUT_S", 7200,
                                         "unacked messages are redelivered after this long; "
                                         "must exceed the longest queue wait plus run time",
                                         check=_at_least(1))
    max_deliveries: int = _setting("T2I_MAX_DELIVERIES", 3,
                                   "a job whose worker died this many times while generating it "
                                   "is failed, not retried (a poison job)", check=_at_least(1))
    store_outage_s: float = _setting("T2I_STORE_OUTAGE_S", 120.0,
                                     "a finished image waits this long for the object store to "
                                     "come back before its job fails", check=_at_least(0))
    redis_outage_s: float = _setting("T2I_REDIS_OUTAGE_S", 300.0,
                                     "a worker holding a job waits this long for Redis to come "
                                     "back before it gives the job up", check=_at_least(0))
    reconcile_interval_s: float = _setting("T2I_RECONCILE_INTERVAL_S", 30.0,
                                           "beat: how often stranded jobs are looked for",
                                           check=_positive)
    reconcile_quiet_s: float = _setting("T2I_RECONCILE_QUIET_S", 120.0,
                                        "an unfinished job with no sign of life for this long "
                                        "and no broker message is re-sent to its stage's queue "
                                        "(failed after T2I_MAX_DELIVERIES re-sends)",
                                        check=_positive)
    worker_lease_s: float = _setting("T2I_WORKER_LEASE_S", 30.0,
                                     "a GPU worker renews a lease naming the messages it holds "
                                     "every third of this; the reconciler hands back the "
                                     "unacknowledged GPU messages that no live lease names (their "
                                     "worker died whole) once they are this old; 0: off, they "
                                     "wait for T2I_VISIBILITY_TIMEOUT_S", check=_at_least(0))
    job_ttl_s: int = _setting("T2I_JOB_TTL_S", 7 * 24 * 3600, "job records expire after this long",
    check=_at_least(60))
    image_url_ttl_s: int = _setting("T2I_IMAGE_URL_TTL_S", 3600,
                                    "presigned image URLs expire after",
    check=_between(1, 7 * 24 * 3600))

    # Webhooks and logs
    webhook_secret: str = _setting("T2I_WEBHOOK_SECRET", "",
                                   "master key of the webhook signatures (each tenant's is "
                                   "derived from it); empty: generated into "
                                   "STATE_DIR/secrets/webhook-secret", secret=True)
    webhook_allow: str = _setting("T2I_WEBHOOK_ALLOW", "",
                                  "internal webhook receivers allowed despite the address "
                                  "policy: comma-separated networks or addresses, each with "
                                  "an optional port (10.0.0.0/8, 127.0.0.1:9000, [fd00::1]:443); "
                                  "empty: only public addresses", check=_parses(parse_allowlist))
    webhook_max_attempts: int = _setting("T2I_WEBHOOK_MAX_ATTEMPTS", 8,
                                         "a webhook is given up after this many failed POSTs "
                                         "(retries back off 1, 2, 4 ... s, at most 10 min)",
                                         check=_at_least(1))
    webhook_timeout_s: float = _setting("T2I_WEBHOOK_TIMEOUT_S", 5.0,
                                        "total deadline of one POST: connect, send and the "
                                        "answer's status line", check=_positive)
    webhook_concurrency: int = _setting("T2I_WEBHOOK_CONCURRENCY", 16,
                                        "deliveries the webhook worker runs at once (threads)",
                                        check=_at_least(1))
    webhook_sweep_interval_s: float = _setting("T2I_WEBHOOK_SWEEP_INTERVAL_S", 30.0,
                                               "beat: how often deliveries whose message was "
                                               "lost are sent again", check=_positive)
    worker_alive_file: str = _setting("T2I_WORKER_ALIVE_FILE", "",
                                      "a worker touches this file every 10 s once ready (its "
                                      "liveness probe needs no broker); empty: none")
    log_format: str = _setting("T2I_LOG_FORMAT", "json",
                               "json: one JSON object per line with the job id; text: plain",
                               check=_one_of("json", "text"))

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
        if self.chroma_path:
            return Path(self.chroma_path).expanduser()
        return self.state_path / "chroma"

    @property
    def redis_broker(self) -> bool:
        """The broker is Redis, whose storage of messages the reconciler reads."""
        return self.broker.startswith(("redis://", "rediss://"))

    @property
    def worker_leases(self) -> bool:
        """GPU workers keep leases: T2I_WORKER_LEASE_S above 0, on a Redis broker."""
        return bool(self.worker_lease_s) and self.redis_broker

    @property
    def redis_port(self) -> int:
        return urlsplit(self.redis_url).port or 6379

    @property
    def s3_port(self) -> int:
        return int(self.s3_endpoint.rsplit(":", 1)[1])



_SECRET_FILES = {"s3_secret_key": "s3-secret-key", "api_keys": "api-key-default",
                 "flower_auth": "flower-password", "webhook_secret": "webhook-secret"}


def _from_file(name: str, text: str) -> str:
    """A secret file's content as the setting's value."""
    return {"api_keys": f"default:{text}", "flower_auth": f"admin:{text}"}.get(name, text)


def _parse(raw: str, kind: str, env: str) -> object:
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise SettingError(f"{env}={raw!r} is not a boolean (use 1/0, true/false)")
    try:
        return {"str": str, "int": int, "float": float}[kind](raw)
    except ValueError:
        raise SettingError(f"{env}={raw!r} is not a valid {kind}") from None


def _check(config: Settings) -> None:
    """Each value on its own, then the ones that must agree."""
    for f in fields(Settings):
        check = f.metadata["check"]
        value = getattr(config, f.name)
        problem = check(value) if check else None
        if problem:
            shown = "(secret)" if not f.repr else repr(value)
            raise SettingError(f"{f.metadata['env']}={shown}: {problem}")
    together = [
        (config.default_steps <= config.max_steps, "T2I_DEFAULT_STEPS", config.default_steps,
         f"must not exceed T2I_MAX_STEPS={config.max_steps}"),
        (config.default_size <= config.max_size, "T2I_DEFAULT_SIZE", config.default_size,
         f"must not exceed T2I_MAX_SIZE={config.max_size}"),
        (config.soft_time_limit_s < config.time_limit_s, "T2I_SOFT_TIME_LIMIT_S",
         config.soft_time_limit_s, f"must be below T2I_TIME_LIMIT_S={config.time_limit_s}"),
    ]
    for ok, env, value, problem in together:
        if not ok:
            raise SettingError(f"{env}={value!r}: {problem}")


def load_settings(environ: Mapping[str, str] | None = None,
                  read_secrets: bool = True) -> Settings:
    """Settings from environment variables (``os.environ`` unless given), each checked;
    raises SettingError naming the variable and its bad value. Secrets the environment
    leaves empty are read from STATE_DIR/secrets when those files exist (never made here)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {f.name: _parse(environ[f.metadata["env"]], str(f.type), f.metadata["env"])
              for f in fields(Settings) if f.metadata["env"] in environ}
    config = Settings(**values)
    if read_secrets:
        directory = config.state_path / "secrets"
        found: dict[str, Any] = {name: _from_file(name, (directory / file).read_text().strip())
                 for name, file in _SECRET_FILES.items()
                 if not getattr(config, name) and (directory / file).is_file()}
        config = replace(config, **found)
    _check(config)
    return config


def ensure_secrets(config: Settings) -> Settings:
    """Fill the secrets ``config`` lacks from STATE_DIR/secrets, making each file (random,
    0600, in a 0700 folder) the first time: what the commands that start servers call, so
    that no secret is ever in the repository or a default."""
    directory = config.state_path / "secrets"
    missing = {name: file for name, file in _SECRET_FILES.items() if not getattr(config, name)}
    if not missing:
        return config
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    found: dict[str, Any] = {}
    for name, file in missing.items():
        path = directory / file
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        found[name] = _from_file(name, path.read_text().strip())
    return replace(config, **found)


def require_secret(config: Settings, name: str) -> str:
    """A secret a component cannot work without; raises SettingError saying where it comes
    from when it is empty."""
    value = getattr(config, name)
    if not value:
        env = next(f.metadata["env"] for f in fields(Settings) if f.name == name)
        path = config.state_path / "secrets" / _SECRET_FILES[name]
        raise SettingError(f"{env} is not set and {path} does not exist: run `t2i-stack up` "
                           "(which makes it) or set it")
    return value


def api_key_tenants(config: Settings) -> dict[str, str]:
    """API key -> tenant, from T2I_API_KEYS ("tenant:key,tenant:key")."""
    return parse_api_keys(config.api_keys)


def to_environ(config: Settings) -> dict[str, str]:
    """The environment variables that make ``load_settings()`` return ``config`` (for the
    processes the local stack and the tests start)."""
    environ = {}
    for f in fields(Settings):
        value = getattr(config, f.name)
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        environ[f.metadata["env"]] = text
    return environ


def secret_variables() -> frozenset[str]:
    """The variables holding secrets: never printed."""
    return frozenset(f.metadata["env"] for f in fields(Settings) if not f.repr)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the documentation table."""
    return [(f.metadata["env"], repr(f.default), f.metadata["doc"]) for f in fields(Settings)]
