"""The HTTP API (FastAPI). Run: ``uvicorn producer.api:app`` (the local stack does)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import redis
import redis.asyncio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import logs
from core.errors import (
    AddonNotFound,
    IdempotencyConflict,
    InvalidRequest,
    JobNotFinished,
    JobNotFound,
    ObjectMissing,
    T2IError,
    TransientError,
    Unauthorized,
)
from core.jobs import JobState
from core.jobstore import JobStore, connect
from core.objectstore import ObjectStore
from core.settings import api_key_tenants, require_secret
from core.webhooks import tenant_secret
from producer.client import MAX_PAGE, Client
from producer.metrics import ApiMetrics

MAX_BODY_BYTES = 64 * 1024
MAX_HEADERS = 100        # more request headers than this: 431
MAX_HEADER_BYTES = 16 * 1024
HEALTH_CHECK_S = 1.5     # each dependency check of /readyz answers within this
MAX_WAIT_S = 60.0        # longest long-poll
WATCH_POLL_S = 0.25      # how often a long-poll re-reads the job
HEARTBEAT_S = 15.0       # an idle event stream sends a comment line this often
MAX_IMAGES = 4           # images one OpenAI-style request may ask for
RECONNECT_MS = 2000      # the event stream's `retry:`: how soon a dropped client reconnects


class LoraUse(BaseModel):
    name: str = Field(description="an uploaded LoRA of this tenant")
    scale: float = Field(1.0, description="-2 to 2; 1 applies it as trained")


class ControlUse(BaseModel):
    name: str = Field(description="a ControlNet served here (the scene model's: layout)")
    image: str = Field(description="the control image, PNG or JPEG, base64 (bare or as a "
                                   "data: URL), of the job's width x height; the body's "
                                   "64 KiB limit applies")
    scale: float = Field(1.0, description="0 to 2")


class JobSubmission(BaseModel):
    """The body of POST /v1/jobs (documentation: the API validates with core.jobs, which
    names the bad field and value in its 422)."""

    prompt: str = Field(description="what to draw; 1 to T2I_MAX_PROMPT_CHARS characters")
    negative_prompt: str | None = Field(None, description="what to steer away from")
    steps: int | None = Field(None, description="denoising steps (T2I_DEFAULT_STEPS)")
    guidance: float | None = Field(None, description="classifier-free guidance, 0 to 50")
    seed: int | None = Field(None, description="0 to 2^63-1; random when left out")
    width: int | None = Field(None, description="pixels, multiple of 8 (T2I_DEFAULT_SIZE)")
    height: int | None = Field(None, description="pixels, multiple of 8 (T2I_DEFAULT_SIZE)")
    webhook_url: str | None = Field(None, description="http(s) URL POSTed the job's events, "
                                    "signed as Standard Webhooks specify")
    webhook_events_filter: list[Literal["started", "progress", "completed"]] | None = Field(
        None, description="which events to POST (as cog's filter): started, progress (at "
                          "most one pending at a time), completed; default [completed]")
    loras: list[LoraUse] | None = Field(None, description="LoRAs to apply, in order (at most "
                                        "3), by the names uploaded to /v1/loras")
    controlnet: ControlUse | None = Field(None, description="a ControlNet the workers serve "
                                          "(T2I_CONTROLNETS) and its control image")


class LoraView(BaseModel):
    """A LoRA in the tenant's registry."""

    name: str
    digest: str = Field(description="sha256 of the file; jobs record it")
    rank: int
    modules: int = Field(description="layers it adapts")
    bytes: int
    uploaded_at: float
    model: str = Field(description="the served model it was checked against")


class LoraList(BaseModel):
    loras: list[LoraView]


SECURED: dict[str, Any] = {"security": [{"bearer": []}, {"apiKey": []}]}


# What the API answers, for the OpenAPI document (routes build their answers themselves;
# these describe them, and the e2e tests check the document and the answers agree).
class ErrorDetail(BaseModel):
    code: str = Field(description="invalid_request, bad_json, unauthorized, not_found, no_image, "
                                  "idempotency_conflict, too_large, unavailable, ...")
    message: str = Field(description="what is wrong, naming the value")
    field: str | None = Field(None, description="the request field or header at fault")


class ErrorBody(BaseModel):
    """Every error the API answers, in one shape."""

    error: ErrorDetail


class JobUrls(BaseModel):
    get: str
    cancel: str
    stream: str
    image: str


class Accepted(BaseModel):
    id: str
    state: str = Field(description="queued")
    urls: JobUrls


class Progress(BaseModel):
    step: int
    total: int


class CacheDecision(BaseModel):
    route: str = Field(description="full, resume or exact")
    k: int | None = Field(description="steps taken from the cache")
    similarity: float | None
    reason: str
    seed_rule: str | None
    fallback: str | None = Field(description="why a planned resume ran in full")


class JobView(BaseModel):
    id: str
    tenant: str
    state: str = Field(description="queued, triage, generating, succeeded, failed, cancelled")
    request: dict[str, Any]
    model: str
    progress: Progress
    cache: CacheDecision | None
    timings: dict[str, float | None]
    unet_calls: int | None
    shallow_unet_calls: int | None = Field(
        None, description="of unet_calls, the steps that reused deep features of an earlier "
                          "step and ran the outer UNet blocks only (T2I_STEP_CACHE)")
    step_cache: str | None = Field(None, description="the step cache the image was made with")
    batch_peak: int | None
    error: str | None
    cancel_requested: bool
    webhook_url: str | None
    webhook_events_filter: list[str] | None
    webhook: dict[str, Any] | None = Field(None, description="the completed event's delivery")
    image_url: str | None = Field(None, description="once succeeded: a presigned S3 URL")
    urls: JobUrls | None = Field(None, description="the API's paths for the job")


class JobPage(BaseModel):
    jobs: list[JobView]
    next: float | None = Field(description="pass as `before` for the next page; null: no more")


class ImagesRequest(BaseModel):
    """OpenAI's images request (POST /v1/images/generations)."""

    prompt: str
    n: int = Field(1, ge=1, description="images, each a job with its own seed")
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 8")
    response_format: str = Field("url", description="url (presigned) or b64_json")
    model: str | None = Field(None, description="accepted and ignored: one model is served")
    user: str | None = Field(None, description="accepted and ignored")


class ImagesAnswer(BaseModel):
    created: int
    data: list[dict[str, str]] = Field(description="[{url}] or [{b64_json}], in order")


class Health(BaseModel):
    ok: bool
    checks: dict[str, str] = Field(description="each store: ok, or why not")


ERROR_MEANINGS = {
    400: "the body is not JSON (or repeats a key, or nests too deep)",
    401: "no API key, or an unknown one",
    404: "no such job (or LoRA) for this tenant",
    409: "the job has no image yet, or the Idempotency-Key was used for another request",
    413: "the body is over 64 KiB (a LoRA upload: over T2I_LORA_MAX_BYTES)",
    415: "the body is not application/json",
    422: "a field is invalid: the error names it and its value",
    503: "Redis or S3 is unavailable (or, for a LoRA upload, no GPU worker has started): "
         "retry later",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]}
            for status in statuses}


def _job_urls(job_id: str) -> dict[str, str]:
    """The API's own paths for a job, as cog answers them (``image_url`` is only ever the
    presigned S3 URL of a succeeded job)."""
    path = f"/v1/jobs/{job_id}"
    return {"get": path, "cancel": path, "stream": f"{path}/events", "image": f"{path}/image"}


async def _json_object(request: Request) -> dict[str, Any] | JSONResponse:
    """The request's JSON object body, or the error answer: 415 not JSON's media type, 413
    too large, 400 not JSON; a body that is JSON but not an object raises InvalidRequest."""
    content_type = request.headers.get("content-type", "")
    # Media types are case-insensitive (RFC 9110): APPLICATION/JSON is JSON too.
    if content_type.split(";")[0].strip().lower() != "application/json":
        return _error(415, "unsupported_media_type",
                      f"content-type {content_type[:100]!r}: send application/json")
    body = await _capped_body(request)
    if body is None:
        response = _error(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
        response.headers["Connection"] = "close"  # the rest of it is never read
        return response
    try:
        payload = _decode_body(body)
    except InvalidRequest as exc:
        return _error(400, "bad_json", str(exc), exc.field)
    if not isinstance(payload, dict):
        raise InvalidRequest("body", f"must be a JSON object, got {type(payload).__name__}")
    return payload


def _openai_images(payload: dict[str, Any]) -> tuple[dict[str, Any], int, str]:
    """An OpenAI images request (prompt, n, size "WxH", response_format url or b64_json;
    model and user accepted and ignored: one model is served) as (job request, n, format)."""
    allowed = {"prompt", "n", "size", "response_format", "model", "user"}
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    n = payload.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
        raise InvalidRequest("n", f"{n!r} is not a whole number in [1, {MAX_IMAGES}]")
    size = payload.get("size")
    job: dict[str, Any] = {"prompt": payload.get("prompt")}
    if size is not None:
        width, _, height = str(size).partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise InvalidRequest("size", f"{size!r} is not WIDTHxHEIGHT, e.g. 512x512")
        job.update(width=int(width), height=int(height))
    response_format = payload.get("response_format", "url")
    if response_format not in ("url", "b64_json"):
        raise InvalidRequest("response_format", f"{response_format!r}: url or b64_json")
    return job, n, response_format


async def _finished_or_latest(acting: Client, job_id: str, wait_s: float) -> dict[str, Any]:
    """The job's view once it finishes, or after ``wait_s`` as it is then (a long poll)."""
    deadline = time.monotonic() + wait_s
    while True:
        view = await asyncio.to_thread(acting.status, job_id)
        if JobState(view["state"]).terminal or time.monotonic() >= deadline:
            return view
        await asyncio.sleep(WATCH_POLL_S)


def _preferred_wait(prefer: str) -> float:
    """Seconds a `Prefer: wait=N` header (RFC 7240) asks the submission to wait for the
    job, at most MAX_WAIT_S; 0 without one."""
    for preference in prefer.split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                raise InvalidRequest("Prefer", f"wait={value.strip()!r} is not a number of "
                                               "seconds") from None
            if not 0 <= seconds <= MAX_WAIT_S:
                raise InvalidRequest("Prefer", f"wait={seconds:g} is out of range "
                                               f"[0, {MAX_WAIT_S}]")
            return seconds
    return 0.0


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON leaves duplicate names undefined; a body that repeats one is refused rather
    than silently keeping the last."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _decode_body(body: bytes) -> Any:
    """The JSON of a request body; raises InvalidRequest naming what is wrong with it."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise InvalidRequest(exc.key, "appears twice in the body") from None
    except RecursionError:
        raise InvalidRequest("body", "JSON nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON, or a number of over 4,300 digits
        raise InvalidRequest("body", f"is not valid JSON: {exc}") from None


async def _capped_body(request: Request, cap: int = MAX_BODY_BYTES) -> bytes | None:
    """The body, or None when it is larger than ``cap``: refused by its declared length
    before any of it is read, or as soon as a chunked one grows past the cap."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class HeaderLimits:
    """ASGI middleware: a request with too many or too large headers gets 431 before any
    route sees it (the server already caps an unfinished head, producer.serve)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(name) + len(value) for name, value in headers)
            if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
                response = _error(431, "headers_too_large",
                                  f"{len(headers)} headers of {size} bytes; at most "
                                  f"{MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes")
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _presented_key(request: Request) -> str:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return request.headers.get("x-api-key", "")


def create_app(client: Client | None = None) -> FastAPI:
    api = FastAPI(title="t2i-serve", version="0.1.0",
                  description="Text-to-image jobs with approximate latent caching. Every "
                              "/v1 call needs an API key (Authorization: Bearer KEY or "
                              "X-API-Key: KEY); a key belongs to a tenant, which sees only "
                              "its own jobs.")
    state: dict[str, Any] = {}
    api.add_middleware(HeaderLimits)
    # Dependency checks get threads of their own: a store that hangs never takes the
    # threads that serve jobs, and each check is bounded by HEALTH_CHECK_S anyway.
    probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="health")

    def get_client() -> Client:
        if "client" not in state:
            state["client"] = client or Client()
            settings = state["client"].settings
            state["tenants"] = api_key_tenants(settings)
            state["metrics"] = ApiMetrics(settings.redis_url, settings.broker)
            state["probes"] = (
                JobStore(connect(settings.redis_url, timeout_s=HEALTH_CHECK_S), settings.job_ttl_s),
                ObjectStore.from_settings(settings, timeout_s=HEALTH_CHECK_S, retries=0))
            # event streams block on Redis (XREAD) without holding a thread each
            state["events"] = redis.asyncio.Redis.from_url(
                settings.redis_url, decode_responses=True, socket_timeout=HEARTBEAT_S + 10)
            logs.configure(settings.log_format)
        return state["client"]

    @api.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        get_client()
        state["metrics"].observe(request.method, getattr(route, "path", "unmatched"),
                                 response.status_code, started)
        return response

    def tenant_client(request: Request) -> Client:
        """The client acting for the tenant whose key the request presents."""
        base = get_client()
        presented = _presented_key(request).encode()
        tenant = next((t for key, t in state["tenants"].items()
                       if hmac.compare_digest(key.encode(), presented)), None)
        if tenant is None:
            raise Unauthorized("missing or unknown API key"
                               if presented else "an API key is required")
        return base.for_tenant(tenant)

    @api.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own parameter checks answer in the one error shape too."""
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return _error(422, "invalid_request", str(first.get("msg", "invalid request")), where)

    @api.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and wrong methods answer in the API's one error shape too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = _error(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})  # Allow, on a 405
        return response

    @api.exception_handler(T2IError)
    async def on_error(_: Request, exc: T2IError) -> JSONResponse:
        if isinstance(exc, Unauthorized):
            response = _error(401, "unauthorized", str(exc))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if isinstance(exc, InvalidRequest):
            return _error(422, "invalid_request", str(exc), exc.field)
        if isinstance(exc, (JobNotFound, AddonNotFound)):
            return _error(404, "not_found", str(exc))
        if isinstance(exc, (JobNotFinished, ObjectMissing)):
            return _error(409, "no_image", str(exc))
        if isinstance(exc, IdempotencyConflict):
            return _error(409, "idempotency_conflict", str(exc), "Idempotency-Key")
        if isinstance(exc, TransientError):
            return _error(503, "unavailable", str(exc))
        return _error(500, "internal", str(exc))

    @api.post("/v1/jobs", status_code=202, responses={
        202: {"model": Accepted},
        200: {"model": JobView, "description": "with Prefer: wait=N, finished within N s"},
        **_errors(400, 401, 409, 413, 415, 422, 503)}, openapi_extra={
        **SECURED, "requestBody": {"required": True, "content": {
            "application/json": {"schema": JobSubmission.model_json_schema()}}},
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "maxLength": 128},
                        "description": "a retry with the same key returns the same job"},
                       {"name": "Prefer", "in": "header", "required": False,
                        "schema": {"type": "string", "example": "wait=30"},
                        "description": f"wait=N (at most {MAX_WAIT_S}): answer 200 with the "
                                       "finished job if it finishes within N seconds"}]})
    async def submit(request: Request) -> JSONResponse:
        """Submit a job. It is validated before anything is enqueued. With `Prefer: wait=N`
        the answer waits up to N seconds: 200 and the finished job, else 202 as without."""
        acting = tenant_client(request)
        payload = await _json_object(request)
        if isinstance(payload, JSONResponse):
            return payload
        if "prompt" not in payload:
            raise InvalidRequest("prompt", "is required")
        if "idempotency_key" in payload:  # a header, never a body field
            raise InvalidRequest("idempotency_key", "unknown field; send the Idempotency-Key "
                                                    "header instead")
        wait_s = _preferred_wait(request.headers.get("prefer", ""))
        job_id = await asyncio.to_thread(acting.submit_payload, payload,
                                         request.headers.get("idempotency-key"))
        if wait_s:
            view = await _finished_or_latest(acting, job_id, wait_s)
            if JobState(view["state"]).terminal:  # answered as asked: the finished job
                return JSONResponse({**view, "urls": _job_urls(job_id)}, status_code=200,
                                    headers={"Preference-Applied": f"wait={wait_s:g}"})
        return JSONResponse({"id": job_id, "state": "queued", "urls": _job_urls(job_id)},
                            status_code=202)

    @api.post("/v1/images/generations", responses={
        200: {"model": ImagesAnswer}, **_errors(400, 401, 413, 415, 422, 503),
        502: {"model": ErrorBody, "description": "a job failed or was cancelled"},
        504: {"model": ErrorBody, "description": f"not finished within {MAX_WAIT_S} s: the "
                                                 "message names the jobs to poll"}},
        openapi_extra={**SECURED, "requestBody": {"required": True, "content": {
            "application/json": {"schema": ImagesRequest.model_json_schema()}}}})
    async def openai_images(request: Request) -> JSONResponse:
        """OpenAI's images endpoint, for clients that speak it: each image is a job (the
        same validation, cache and queue), answered when all finish, within MAX_WAIT_S."""
        acting = tenant_client(request)
        payload = await _json_object(request)
        if isinstance(payload, JSONResponse):
            return payload
        job, n, response_format = _openai_images(payload)
        job_ids = [await asyncio.to_thread(acting.submit_payload, job) for _ in range(n)]
        views = await asyncio.gather(*(_finished_or_latest(acting, job_id, MAX_WAIT_S)
                                       for job_id in job_ids))
        if not all(JobState(view["state"]).terminal for view in views):
            return _error(504, "timeout", f"not finished within {MAX_WAIT_S} s; poll "
                                          f"/v1/jobs/{{id}} for {', '.join(job_ids)}")
        failed = [view for view in views if view["state"] != "succeeded"]
        if failed:
            return _error(502, "generation_failed",
                          f"job {failed[0]['id']} {failed[0]['state']}: {failed[0]['error']}")
        if response_format == "url":
            data = [{"url": view["image_url"]} for view in views]
        else:
            images = await asyncio.gather(*(asyncio.to_thread(acting.result, job_id)
                                            for job_id in job_ids))
            data = [{"b64_json": base64.b64encode(png).decode()} for png in images]
        return JSONResponse({"created": int(time.time()), "data": data})

    @api.get("/v1/jobs", responses={200: {"model": JobPage}, **_errors(401, 422, 503)},
             openapi_extra={**SECURED, "parameters": [
                 {"name": "limit", "in": "query", "required": False,
                  "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                             "default": 20}},
                 {"name": "before", "in": "query", "required": False,
                  "schema": {"type": "number"},
                  "description": "the `next` of the previous page"}]})
    def list_jobs(request: Request) -> dict[str, Any]:
        """This tenant's jobs, newest first, a page at a time (follow ``next``)."""
        acting = tenant_client(request)
        raw_limit, raw_before = (request.query_params.get("limit", "20"),
                                 request.query_params.get("before"))
        try:
            limit = int(raw_limit)
        except ValueError:
            raise InvalidRequest("limit", f"{raw_limit!r} is not a whole number") from None
        try:
            before = float(raw_before) if raw_before is not None else None
        except ValueError:
            raise InvalidRequest("before", f"{raw_before!r} is not a cursor") from None
        page = acting.jobs_page(limit, before)
        return {**page, "jobs": [{**view, "urls": _job_urls(view["id"])}
                                 for view in page["jobs"]]}

    @api.get("/v1/jobs/{job_id}", responses={200: {"model": JobView},
                                             **_errors(401, 404, 422, 503)},
             openapi_extra={**SECURED, "parameters": [
        {"name": "wait", "in": "query", "required": False,
         "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
         "description": "long-poll: answer when the job finishes or after this many seconds"}]})
    async def status(job_id: str, request: Request) -> dict[str, Any]:
        """The job's record: state, progress, route, K, timings, image URL when done."""
        acting = tenant_client(request)
        raw = request.query_params.get("wait", "0")
        try:
            wait_s = float(raw)
        except ValueError:
            raise InvalidRequest("wait", f"{raw!r} is not a number of seconds") from None
        if not 0 <= wait_s <= MAX_WAIT_S:
            raise InvalidRequest("wait", f"{wait_s} is out of range [0, {MAX_WAIT_S}]")
        return {**await _finished_or_latest(acting, job_id, wait_s), "urls": _job_urls(job_id)}

    @api.get("/v1/jobs/{job_id}/events", responses=_errors(401, 404, 422, 503), openapi_extra={
        **SECURED, "responses": {"200": {"content": {"text/event-stream": {}}}},
        "parameters": [{"name": "Last-Event-ID", "in": "header", "required": False,
                        "schema": {"type": "string"},
                        "description": "resume after this event (browsers send it)"}]})
    async def events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events, pushed from the job's event stream (core.jobstore): a
        ``progress`` event at each change of state and at every step, in order, each with
        an ``id`` (a client that reconnects with Last-Event-ID resumes after it); then
        ``finished`` with the final record, and the stream ends."""
        acting = tenant_client(request)
        await asyncio.to_thread(acting.status, job_id)  # 404 before streaming
        after = request.headers.get("last-event-id", "0")
        key = JobStore.events_key(job_id)

        async def stream() -> AsyncIterator[str]:
            nonlocal after
            yield f"retry: {RECONNECT_MS}\n\n"
            while True:
                try:
                    found = await state["events"].xread({key: after},
                                                        block=int(HEARTBEAT_S * 1000))
                except redis.exceptions.RedisError:  # an outage: the client reconnects
                    return
                view = await asyncio.to_thread(acting.status, job_id)
                entries = [entry for _, listed in found for entry in listed]
                if not entries and JobState(view["state"]).terminal:  # its events expired
                    yield f"event: finished\ndata: {json.dumps(view)}\n\n"
                    return
                if not entries:
                    yield ": still waiting\n\n"
                for entry_id, fields in entries:
                    after = entry_id
                    if JobState(fields["state"]).terminal:
                        yield f"id: {entry_id}\nevent: finished\ndata: {json.dumps(view)}\n\n"
                        return
                    shown = {**view, "state": fields["state"], "progress": {
                        "step": int(fields["step"]), "total": int(fields["total"])}}
                    yield f"id: {entry_id}\nevent: progress\ndata: {json.dumps(shown)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.get("/v1/jobs/{job_id}/image", response_class=Response,
             responses=_errors(401, 404, 409, 422, 503), openapi_extra={
        **SECURED, "responses": {"200": {"content": {"image/png": {}}}}})
    def image(job_id: str, request: Request) -> Response:
        """The PNG of a succeeded job (409 before then)."""
        return Response(tenant_client(request).result(job_id), media_type="image/png")

    @api.delete("/v1/jobs/{job_id}", responses={200: {"model": JobView},
                                                **_errors(401, 404, 422, 503)},
                openapi_extra=SECURED)
    def cancel(job_id: str, request: Request) -> dict[str, Any]:
        """Cancel: at once if queued, else at the next denoising step."""
        return tenant_client(request).cancel(job_id)

    @api.get("/v1/webhook-secret", responses=_errors(401), openapi_extra=SECURED)
    def webhook_secret(request: Request) -> dict[str, str]:
        """This tenant's key for checking webhook signatures (see core.webhooks.verify)."""
        acting = tenant_client(request)
        return {"tenant": acting.tenant,
                "secret": tenant_secret(require_secret(acting.settings, "webhook_secret"),
                                        acting.tenant)}

    @api.put("/v1/loras/{name}", status_code=201, responses={
        201: {"model": LoraView}, **_errors(401, 413, 422, 503)}, openapi_extra={
        **SECURED, "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_lora(name: str, request: Request) -> JSONResponse:
        """Upload a LoRA (the safetensors file as the body). It is checked against the
        served model before it is kept: UNet attention LoRA pairs of the right shapes, within
        the size and rank limits. The same name again replaces it."""
        acting = tenant_client(request)
        cap = acting.settings.lora_max_bytes
        data = await _capped_body(request, cap)
        if data is None:
            return _error(413, "too_large", f"body over {cap} bytes (T2I_LORA_MAX_BYTES)")
        entry = await asyncio.to_thread(acting.loras.upload, name, data)
        return JSONResponse(entry, status_code=201)

    @api.get("/v1/loras", responses={200: {"model": LoraList}, **_errors(401, 503)},
             openapi_extra=SECURED)
    def list_loras(request: Request) -> dict[str, Any]:
        """This tenant's LoRAs."""
        return {"loras": tenant_client(request).loras.list()}

    @api.delete("/v1/loras/{name}", responses=_errors(401, 404, 422, 503),
                openapi_extra=SECURED)
    def delete_lora(name: str, request: Request) -> dict[str, str]:
        """Delete a LoRA (jobs already accepted with it then fail, naming it)."""
        tenant_client(request).loras.delete(name)
        return {"deleted": name}

    @api.get("/metrics", response_class=Response,
             responses={"200": {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        """Prometheus metrics of the whole service (no key: scrape it on the inside)."""
        get_client()
        return Response(generate_latest(state["metrics"].registry),
                        media_type=CONTENT_TYPE_LATEST)

    async def check(probe: Callable[[], object]) -> str:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(probes, probe),
                                   HEALTH_CHECK_S)
        except TimeoutError:
            return f"no answer within {HEALTH_CHECK_S} s"
        except T2IError as exc:
            return str(exc)
        return "ok"

    @api.get("/livez")
    def livez() -> dict[str, bool]:
        """Liveness: this process serves requests. Touches no store, so an outage of Redis
        or S3 never gets the API restarted (that is what readiness is for)."""
        return {"ok": True}

    @api.get("/readyz", responses={200: {"model": Health},
                                   503: {"model": Health, "description": "a store is down"}})
    async def readyz() -> JSONResponse:
        """Readiness: Redis and S3 answer, each checked with its own deadline, so this
        answers within about HEALTH_CHECK_S whatever a store does (503 if one does not)."""
        get_client()
        redis_probe, s3_probe = state["probes"]
        checks = dict(zip(("redis", "s3"), await asyncio.gather(
            check(redis_probe.ping), check(s3_probe.ensure_bucket))))
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse({"ok": healthy, "checks": checks}, status_code=200 if healthy else 503)

    api.add_api_route("/healthz", readyz, methods=["GET"], responses={
                          200: {"model": Health},
                          503: {"model": Health, "description": "a store is down"}},
                      description="The same as /readyz (kept for existing probes).")

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=api.title, version=api.version,
                                 description=api.description, routes=api.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


app = create_app()
