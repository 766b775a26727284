"""The HTTP API (FastAPI). Run: ``uvicorn producer.api:app`` (the local stack does)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from celeryconfig import api_key_tenants
from core.errors import (InvalidRequest, JobNotFinished, JobNotFound, ObjectMissing,
                         T2IError, TransientError, Unauthorized)
from producer.client import Client

MAX_BODY_BYTES = 64 * 1024


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
            state["tenants"] = api_key_tenants(state["client"].settings)
        return state["client"]

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
        if isinstance(exc, TransientError):
            return _error(503, "unavailable", str(exc))
        return _error(500, "internal", str(exc))

    @api.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
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
        params = dict(payload)
        job_id = acting.submit(params.pop("prompt"), **params)
        return JSONResponse({"id": job_id, "state": "queued",
                             "status_url": f"/v1/jobs/{job_id}",
                             "image_url": f"/v1/jobs/{job_id}/image"}, status_code=202)

    @api.get("/v1/jobs/{job_id}")
    def status(job_id: str, request: Request) -> dict[str, Any]:
        return tenant_client(request).status(job_id)

    @api.get("/v1/jobs/{job_id}/image", response_class=Response)
    def image(job_id: str, request: Request) -> Response:
        return Response(tenant_client(request).result(job_id), media_type="image/png")

    @api.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str, request: Request) -> dict[str, Any]:
        return tenant_client(request).cancel(job_id)

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

    return api


app = create_app()
