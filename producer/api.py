"""The HTTP API (FastAPI). Run: ``uvicorn producer.api:app`` (the local stack does)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from core.errors import (InvalidRequest, JobNotFinished, JobNotFound, ObjectMissing,
                         T2IError, TransientError)
from producer.client import Client

MAX_BODY_BYTES = 64 * 1024


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status)


def create_app(client: Client | None = None) -> FastAPI:
    api = FastAPI(title="t2i-serve", version="0.1.0",
                  description="Text-to-image jobs with approximate latent caching.")
    state: dict[str, Client] = {}

    def get_client() -> Client:
        if "client" not in state:
            state["client"] = client or Client()
        return state["client"]

    @api.exception_handler(T2IError)
    async def on_error(_: Request, exc: T2IError) -> JSONResponse:
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
        job_id = get_client().submit(params.pop("prompt"), **params)
        return JSONResponse({"id": job_id, "state": "queued",
                             "status_url": f"/v1/jobs/{job_id}",
                             "image_url": f"/v1/jobs/{job_id}/image"}, status_code=202)

    @api.get("/v1/jobs/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        return get_client().status(job_id)

    @api.get("/v1/jobs/{job_id}/image", response_class=Response)
    def image(job_id: str) -> Response:
        return Response(get_client().result(job_id), media_type="image/png")

    @api.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str) -> dict[str, Any]:
        return get_client().cancel(job_id)

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
