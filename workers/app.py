"""The Celery application. Importing it loads no model and no torch (producers import it)."""

from __future__ import annotations

from celery import Celery
from kombu.exceptions import OperationalError

from celeryconfig import celery_options
from core.errors import BrokerUnavailable
from core.settings import Settings

# Worker processes: configured from the environment through the celeryconfig module.
app = Celery("t2i", include=["workers.tasks", "workers.lease"])
app.config_from_object("celeryconfig")


def make_app(config: Settings) -> Celery:
    """A Celery app for explicit settings (producers configured in code, tests)."""
    configured = Celery("t2i")
    configured.conf.update(celery_options(config))
    return configured

TRIAGE_TASK = "triage.route"
FULL_TASK = "gen.full"
RESUME_TASK = "gen.resume"
REGISTER_TASK = "cache.register"
EVICT_TASK = "cache.evict"
SWEEP_TASK = "cache.sweep"
TRAIN_PREDICTOR_TASK = "cache.train_predictor"
RECONCILE_TASK = "jobs.reconcile"
WEBHOOK_TASK = "webhooks.deliver"
WEBHOOK_SWEEP_TASK = "webhooks.sweep"


def enqueue(celery: Celery, task_name: str, job_id: str, countdown: float | None = None,
            queue: str | None = None, **kwargs: object) -> None:
    """Send ``task_name`` for ``job_id`` to its queue (the queue is named like the task's
    route in celeryconfig.task_routes, unless ``queue`` names another), at once or after
    ``countdown`` seconds. Messages carry ids and keys only."""
    options = {"queue": queue} if queue else {}
    try:
        celery.send_task(task_name, args=[job_id], kwargs=kwargs, countdown=countdown,
                         **options)
    except OperationalError as exc:
        raise BrokerUnavailable(f"cannot enqueue {task_name} for job {job_id}: {exc}") from exc
