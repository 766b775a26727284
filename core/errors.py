"""The project's one error hierarchy. Adapters turn library errors into these."""

from __future__ import annotations


class T2IError(Exception):
    """Base of every error this project raises on purpose."""


class SettingError(T2IError, ValueError):
    """A setting (an environment variable) with a bad value, or a secret that is missing."""


class InvalidRequest(T2IError, ValueError):
    """A job request that can never succeed; it is refused before anything is enqueued."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobNotFound(T2IError, KeyError):
    """No job record with this id (never submitted, or expired)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job {self.job_id!r}"


class Unauthorized(T2IError):
    """No valid API key on a request."""


class InvalidTransition(T2IError):
    """A job state change the state machine does not allow."""


class JobCancelled(T2IError):
    """Raised inside a generation when its job was cancelled; the job ends as cancelled."""


class JobNotFinished(T2IError):
    """The job has no result yet (or ended without one)."""


class Timeout(T2IError, TimeoutError):
    """Waiting for a job took longer than allowed."""


class TransientError(T2IError):
    """A dependency is unavailable for now; retrying later may succeed."""


class BrokerUnavailable(TransientError):
    """The broker or job store (Redis) cannot be reached."""


class ObjectStoreUnavailable(TransientError):
    """The object store (S3) cannot be reached or refused the request."""


class ObjectMissing(T2IError):
    """An object the job needed is not in the object store."""


class ModelLoadError(T2IError):
    """The configured model could not be loaded."""


class StackError(T2IError):
    """The local stack could not start, or a server in it did not come up."""


class VectorIndexUnavailable(TransientError):
    """The vector index (Chroma) cannot be reached or failed the request."""


class CorruptLatent(T2IError):
    """A cached latent that cannot be used: truncated, wrong dtype or shape, another model."""


class DeliveryFailed(T2IError):
    """A webhook receiver could not be reached or did not answer in time."""


class WebhookRefused(T2IError):
    """A webhook target the address policy refuses (an internal address, or no address)."""


class IdempotencyConflict(T2IError):
    """An idempotency key reused with a different request."""


class ApiUnavailable(TransientError):
    """The HTTP API cannot be reached, or answered that it cannot serve now (503)."""


class BatcherStopped(T2IError):
    """The GPU worker's batcher thread is gone (closed, or it crashed): the job was not run."""


class AddonNotFound(T2IError, KeyError):
    """No add-on of this name in the tenant's registry."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no LoRA named {self.name!r}"


class ModelNotReady(TransientError):
    """What the served model is like is not known yet (no GPU worker has published it)."""
