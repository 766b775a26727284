"""The Celery queues, by name: one place for what the routes, the workers, KEDA and the
reconciler must agree on."""

TRIAGE = "triage"          # CPU: embed, look up, route
FULL = "gen.full"          # GPU: generations from noise
RESUME = "gen.resume"      # GPU: generations resumed from a cached latent
CACHE = "cache"            # CPU: registrations, eviction, sweep, predictor, reconciler
WEBHOOKS = "webhooks"      # I/O: webhook deliveries

JOB_QUEUES = (TRIAGE, FULL, RESUME)  # the queues whose messages carry a job id
GPU_QUEUES = (FULL, RESUME)
