"""The Celery queues, by name: one place for what the routes, the workers, KEDA and the
reconciler must agree on."""

TRIAGE = "triage"          # CPU: embed, look up, route
FULL = "gen.full"          # GPU: generations from noise
RESUME = "gen.resume"      # GPU: generations resumed from a cached latent
CACHE = "cache"            # CPU: registrations, eviction, sweep, predictor, reconciler
WEBHOOKS = "webhooks"      # I/O: webhook deliveries

# A GPU worker's own queue, its node name after this: LoRA jobs triage sends to the worker
# that holds their LoRAs (core.affinity). Each GPU worker adds its own at start.
AFFINITY_PREFIX = "gen.at."

JOB_QUEUES = (TRIAGE, FULL, RESUME)  # the queues whose messages carry a job id
GPU_QUEUES = (FULL, RESUME)


def affinity_queue(node: str) -> str:
    return AFFINITY_PREFIX + node


def is_gpu_queue(name: str) -> bool:
    """A shared generation queue or a GPU worker's own."""
    return name in GPU_QUEUES or name.startswith(AFFINITY_PREFIX)
