"""The HTTP API (FastAPI). Run: ``uvicorn producer.api:app`` (the local stack does)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from celeryconfig import api_key_tenants
from core import logs
from core.errors import (IdempotencyConflict, InvalidRequest, JobNotFinished, JobNotFound,
                         ObjectMissing, T2IError, TransientError, Unauthorized)
from core.jobs import JobState
from core.webhooks import tenant_secret
from producer.client import Client
from producer.metrics import ApiMetrics

MAX_BODY_BYTES = 64 * 1024
MAX_WAIT_S = 60.0        # longest long-poll
WATCH_POLL_S = 0.25      # how often a long-poll or event stream re-reads the job
HEARTBEAT_S = 15.0       # an idle event stream sends a comment line this often


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
    webhook_url: str | None = Field(None, description="http(s) URL POSTed the job when it "
                                    "finishes, signed (X-T2I-Signature)")


SECURED = {"security": [{"bearer": []}, {"apiKey": []}]}


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status)


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

    def get_client() -> Client:
        if "client" not in state:
            state["client"] = client or Client()
            settings = state["client"].settings
            state["tenants"] = api_key_tenants(settings)
            state["metrics"] = ApiMetrics(settings.redis_url, settings.broker)
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

    @api.exception_handler(T2IError)
    async def on_error(_: Request, exc: T2IError) -> JSONResponse:
        if isinstance(exc, Unauthorized):
            response = _error(401, "unauthorized", str(exc))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if isinstance(exc, InvalidRequest):
            return _error(422, "invalid_request", str(exc), exc.field)
        if isinstance(exc, JobNotFound):
            return _error(404, "not_found", str(exc))
        if isinstance(exc, (JobNotFinished, ObjectMissing)):
            return _error(409, "no_image", str(exc))
        if isinstance(exc, IdempotencyConflict):
            return _error(409, "idempotency_conflict", str(exc), "Idempotency-Key")
        if isinstance(exc, TransientError):
            return _error(503, "unavailable", str(exc))
        return _error(500, "internal", str(exc))

    @api.post("/v1/jobs", status_code=202, openapi_extra={
        **SECURED, "requestBody": {"required": True, "content": {
            "application/json": {"schema": JobSubmission.model_json_schema()}}},
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "maxLength": 128},
                        "description": "a retry with the same key returns the same job"}]})
    async def submit(request: Request) -> JSONResponse:
        """Submit a job. It is validated before anything is enqueued."""
        acting = tenant_client(request)
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip() != "application/json":
            return _error(415, "unsupported_media_type",
                          f"content-type {content_type!r}: send application/json")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, "too_large", f"body of {len(body)} bytes, at most {MAX_BODY_BYTES}")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, "bad_json", f"body is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            raise InvalidRequest("body", f"must be a JSON object, got {type(payload).__name__}")
        if "prompt" not in payload:
            raise InvalidRequest("prompt", "is required")
        if "idempotency_key" in payload:  # a header, never a body field
            raise InvalidRequest("idempotency_key", "unknown field; send the Idempotency-Key "
                                                    "header instead")
        params = dict(payload)
        job_id = await asyncio.to_thread(
            acting.submit, params.pop("prompt"),
            idempotency_key=request.headers.get("idempotency-key"), **params)
        return JSONResponse({"id": job_id, "state": "queued",
                             "status_url": f"/v1/jobs/{job_id}",
                             "image_url": f"/v1/jobs/{job_id}/image"}, status_code=202)

    @api.get("/v1/jobs/{job_id}", openapi_extra={**SECURED, "parameters": [
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
        deadline = time.monotonic() + wait_s
        while True:
            view = await asyncio.to_thread(acting.status, job_id)
            if JobState(view["state"]).terminal or time.monotonic() >= deadline:
                return view
            await asyncio.sleep(WATCH_POLL_S)

    @api.get("/v1/jobs/{job_id}/events", openapi_extra={
        **SECURED, "responses": {"200": {"content": {"text/event-stream": {}}}}})
    async def events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: a ``progress`` event at each change of state or step, then
        ``finished`` with the final record, then the stream ends."""
        acting = tenant_client(request)
        first = await asyncio.to_thread(acting.status, job_id)  # 404 before streaming

        async def stream() -> AsyncIterator[str]:
            view, last, quiet_since = first, None, time.monotonic()
            while True:
                seen = (view["state"], view["progress"]["step"], view["route"])
                if JobState(view["state"]).terminal:
                    yield f"event: finished\ndata: {json.dumps(view)}\n\n"
                    return
                if seen != last:
                    last, quiet_since = seen, time.monotonic()
                    yield f"event: progress\ndata: {json.dumps(view)}\n\n"
                elif time.monotonic() - quiet_since >= HEARTBEAT_S:
                    quiet_since = time.monotonic()
                    yield ": still waiting\n\n"
                await asyncio.sleep(WATCH_POLL_S)
                view = await asyncio.to_thread(acting.status, job_id)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.get("/v1/jobs/{job_id}/image", response_class=Response, openapi_extra={
        **SECURED, "responses": {"200": {"content": {"image/png": {}}}}})
    def image(job_id: str, request: Request) -> Response:
        """The PNG of a succeeded job (409 before then)."""
        return Response(tenant_client(request).result(job_id), media_type="image/png")

    @api.delete("/v1/jobs/{job_id}", openapi_extra=SECURED)
    def cancel(job_id: str, request: Request) -> dict[str, Any]:
        """Cancel: at once if queued, else at the next denoising step."""
        return tenant_client(request).cancel(job_id)

    @api.get("/v1/webhook-secret", openapi_extra=SECURED)
    def webhook_secret(request: Request) -> dict[str, str]:
        """This tenant's key for checking webhook signatures (see core.webhooks.verify)."""
        acting = tenant_client(request)
        return {"tenant": acting.tenant,
                "secret": tenant_secret(acting.settings.webhook_secret, acting.tenant)}

    @api.get("/metrics", response_class=Response,
             responses={"200": {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        """Prometheus metrics of the whole service (no key: scrape it on the inside)."""
        get_client()
        return Response(generate_latest(state["metrics"].registry),
                        media_type=CONTENT_TYPE_LATEST)

    @api.get("/healthz")
    def healthz() -> JSONResponse:
        checks: dict[str, str] = {}
        client_ = get_client()
        for name, probe in (("redis", client_.jobs.ping), ("s3", client_.objects.ensure_bucket)):
            try:
                probe()
                checks[name] = "ok"
            except T2IError as exc:
                checks[name] = str(exc)
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse({"ok": healthy, "checks": checks}, status_code=200 if healthy else 503)

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
