"""Celery's own options, computed from the project's settings (core.settings).

Celery reads the lower-case names this module defines (``app.config_from_object``).
Importing it reads the environment and nothing else: it writes no file.
"""

from __future__ import annotations

from typing import Any

from core.settings import Settings, load_settings
from workers.queues import CACHE, FULL, RESUME, TRIAGE, WEBHOOKS


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
        # Job tasks report through the job record, and Flower reads events: storing their
        # results (and a STARTED state before each, whose failed write in a Redis outage ends
        # the task before it starts) would write ~2 keys a job that nothing reads. The
        # maintenance tasks keep theirs: an operator (or a test) reads their reports.
        "task_ignore_result": True,
        "result_expires": config.job_ttl_s,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": TRIAGE,
        "task_routes": {
            "triage.*": {"queue": TRIAGE},
            "gen.full": {"queue": FULL},
            "gen.resume": {"queue": RESUME},
            "cache.*": {"queue": CACHE},
            "jobs.*": {"queue": CACHE},
            "webhooks.*": {"queue": WEBHOOKS},
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


# Celery reads these module-level names (app.config_from_object("celeryconfig")).
globals().update(celery_options(load_settings()))
