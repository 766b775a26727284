"""The Python client: submit a prompt, poll its job, fetch the image. Needs Redis (and S3
for images); never imports torch."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from core.addons import control_key, parse_control
from core.errors import (
    BrokerUnavailable,
    DeliveryFailed,
    InvalidRequest,
    JobNotFinished,
    JobNotFound,
    Timeout,
    WebhookRefused,
)
from core.jobs import JobRecord, JobState, RequestLimits, parse_request
from core.jobstore import JobStore
from core.objectstore import ObjectStore
from core.settings import Settings, load_settings
from core.webhooks import AddressPolicy, parse_allowlist, parse_events, parse_target
from producer.addons import LoraRegistry
from workers.app import TRIAGE_TASK, WEBHOOK_TASK, enqueue, make_app
from workers.builtin_models import served_controlnets
from workers.webhooks import resolve_host

DEFAULT_TENANT = "default"
MAX_PAGE = 100  # jobs per page of a listing
_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces


def _fingerprint(submission: dict[str, Any]) -> str:
    """The same submission gives the same fingerprint (key order aside)."""
    text = json.dumps(submission, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


class Client:
    """Acts for one tenant: its jobs are the only ones it can see or cancel (another
    tenant's job reads as not found). The HTTP API makes one per request with ``for_tenant``."""

    def __init__(self, settings: Settings | None = None, tenant: str = DEFAULT_TENANT) -> None:
        self.settings = settings or load_settings()
        self.tenant = tenant
        self.limits = RequestLimits.from_settings(self.settings)
        self.celery = make_app(self.settings)
        self.jobs = JobStore.from_settings(
            self.settings, webhook_due=functools.partial(enqueue, self.celery, WEBHOOK_TASK))
        self.webhook_policy = AddressPolicy(parse_allowlist(self.settings.webhook_allow))
        self._objects: ObjectStore | None = None

    def for_tenant(self, tenant: str) -> Client:
        """The same connections, acting for ``tenant``."""
        other = copy.copy(self)
        other.tenant = tenant
        return other

    def _own(self, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record.tenant != self.tenant:
            raise JobNotFound(job_id)  # never confirm that another tenant's job exists
        return record

    @property
    def objects(self) -> ObjectStore:
        if self._objects is None:
            self._objects = ObjectStore.from_settings(self.settings)
        return self._objects

    @property
    def loras(self) -> LoraRegistry:
        """This tenant's LoRAs: upload, list, delete (producer.addons)."""
        return LoraRegistry(self.objects, self.tenant, self.settings.model,
                            self.settings.lora_max_bytes, self.settings.lora_max_rank)

    def upload_lora(self, name: str, data: bytes) -> dict[str, Any]:
        """Check a LoRA file against the served model and keep it as ``name``."""
        return self.loras.upload(name, data)

    def list_loras(self) -> list[dict[str, Any]]:
        return self.loras.list()

    def delete_lora(self, name: str) -> None:
        self.loras.delete(name)

    def submit(self, prompt: str, *, idempotency_key: str | None = None,
               webhook_url: str | None = None, webhook_events_filter: list[str] | None = None,
               **params: Any) -> str:
        """Validate and enqueue a job; return its id. Bad input raises InvalidRequest and
        enqueues nothing. A repeated ``idempotency_key`` (per tenant, kept as long as job
        records) returns the first job's id instead of making another; reused with a
        different request it raises IdempotencyConflict. ``webhook_url`` is POSTed the job's
        events: those of ``webhook_events_filter`` (core.webhooks.Event), completed alone
        by default."""
        payload = {"prompt": prompt, **params}
        if webhook_url is not None:
            payload["webhook_url"] = webhook_url
        if webhook_events_filter is not None:
            payload["webhook_events_filter"] = webhook_events_filter
        return self.submit_payload(payload, idempotency_key)

    def submit_payload(self, payload: dict[str, Any], idempotency_key: str | None = None) -> str:
        """``submit`` for a decoded request body: its keys are never Python parameters, so
        any key is just a field (an unknown one is refused by name)."""
        params = dict(payload)
        webhook_url = params.pop("webhook_url", None)
        events_filter = params.pop("webhook_events_filter", None)
        control = params.pop("controlnet", None)
        request = parse_request(params, self.limits, random_seed=secrets.randbelow(2**32))
        if request.loras:
            request = dataclasses.replace(request, loras=self.loras.resolve(request.loras))
        image = b""
        if control is not None:
            ref, image = parse_control(control, request.width, request.height,
                                       served_controlnets(self.settings.controlnets,
                                                          self.settings.model))
            request = dataclasses.replace(request, controlnet=ref)
        hook = "" if webhook_url is None else self._allowed_webhook(webhook_url)
        events = "" if events_filter is None else ",".join(parse_events(events_filter))
        if events and not hook:
            raise InvalidRequest("webhook_events_filter", "given without a webhook_url")
        idempotency = None
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not _IDEMPOTENCY_KEY.fullmatch(
                    idempotency_key):
                raise InvalidRequest("Idempotency-Key", f"{idempotency_key!r} must be 1 to 128 "
                                     "printable ASCII characters without spaces")
            idempotency = (f"{self.tenant}:{idempotency_key}",
                           _fingerprint({"webhook_url": webhook_url, "controlnet": control,
                                         "webhook_events_filter": events_filter, **params}))
        if request.controlnet is not None:   # kept once the whole submission is valid
            self.objects.put(control_key(request.controlnet.digest), image)
        job_id = uuid.uuid4().hex
        holder = self.jobs.create(JobRecord(id=job_id, state=JobState.QUEUED, request=request,
                                            model=self.settings.model, submitted_at=time.time(),
                                            tenant=self.tenant, webhook_url=hook,
                                            webhook_events=events), idempotency)
        if holder != job_id:
            return holder
        try:
            enqueue(self.celery, TRIAGE_TASK, job_id)
        except BrokerUnavailable as exc:
            # The record must not promise a job that no queue holds, nor the key hold it.
            reason = f"not enqueued: {exc}"
            self.jobs.update(job_id, lambda r: r.transition(
                JobState.FAILED, error=reason, finished_at=time.time()))
            if idempotency:
                self.jobs.release_idempotency(idempotency[0])
            raise
        return job_id

    def _allowed_webhook(self, url: object) -> str:
        """The URL, if it parses and every address its host has now is allowed (it is
        checked again at each delivery, since a name can change what it resolves to)."""
        try:
            self.webhook_policy.check(parse_target(url), resolve_host)
        except (WebhookRefused, DeliveryFailed) as exc:
            raise InvalidRequest("webhook_url", f"refused: {exc} (only public addresses, "
                                                "or those in T2I_WEBHOOK_ALLOW)") from None
        return str(url)

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's public record; a succeeded job also gets a presigned image URL."""
        record = self._own(job_id)
        view = record.public()
        if record.state is JobState.SUCCEEDED:
            view["image_url"] = self.objects.presigned_url(record.image_key,
                                                           self.settings.image_url_ttl_s)
        return view

    def jobs_page(self, limit: int = 20, before: float | None = None) -> dict[str, Any]:
        """This tenant's jobs, newest first, ``limit`` at a time: ``{"jobs": [...], "next":
        cursor}``; pass ``next`` as ``before`` for the following page (None: no more)."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest("limit", f"{limit} is out of range [1, {MAX_PAGE}]")
        records = self.jobs.tenant_jobs(self.tenant, limit + 1, before)
        page = records[:limit]
        return {"jobs": [record.public() for record in page],
                "next": page[-1].submitted_at if len(records) > limit else None}

    def wait(self, job_id: str, timeout: float = 300.0, poll_s: float = 0.1,
             watch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is finished (succeeded, failed or cancelled); ``watch`` sees
        the job's public record at each poll (a progress bar, say)."""
        deadline = time.monotonic() + timeout
        while True:
            record = self._own(job_id)
            if watch is not None:
                watch(record.public())
            if record.state.terminal:
                return self.status(job_id)
            if time.monotonic() >= deadline:
                raise Timeout(f"job {job_id} still {record.state} after {timeout:.0f}s")
            time.sleep(poll_s)

    def result(self, job_id: str) -> bytes:
        """The PNG bytes of a succeeded job."""
        record = self._own(job_id)
        if record.state is not JobState.SUCCEEDED:
            raise JobNotFinished(f"job {job_id} is {record.state}, it has no image"
                                 + (f" ({record.error})" if record.error else ""))
        return self.objects.get(record.image_key)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: at once if no worker holds it, else at its next denoising step."""
        self._own(job_id)
        return self.jobs.request_cancel(job_id, now=time.time()).public()
