"""An asyncio client of the HTTP API, for async web backends (FastAPI, aiohttp, ...).

    async with AsyncClient("http://127.0.0.1:8000", api_key) as t2i:
        job_id = await t2i.submit("a red fox in snow", idempotency_key=request_id)
        async for event, job in t2i.events(job_id):   # or: job = await t2i.wait(job_id)
            ...
        png = await t2i.result(job_id)

Errors are the project's (core.errors), as with the sync client.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from core.errors import (
    AddonNotFound,
    ApiUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    JobNotFinished,
    JobNotFound,
    T2IError,
    Timeout,
    Unauthorized,
)
from core.jobs import JobState

LONG_POLL_S = 30.0


def _raise_for(response: httpx.Response, job_id: str = "", lora: str = "") -> None:
    """Turn an error answer into the project's error."""
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "", "message": response.text[:200]}
    message = error.get("message", "")
    if response.status_code == 401:
        raise Unauthorized(message)
    if response.status_code == 404:
        raise AddonNotFound(lora) if lora else JobNotFound(job_id)
    if response.status_code == 413:
        raise InvalidRequest("body", message)
    if response.status_code == 409:
        if error.get("code") == "idempotency_conflict":
            raise IdempotencyConflict(message)
        raise JobNotFinished(message)
    if response.status_code == 422:
        raise InvalidRequest(error.get("field") or "body", message)
    if response.status_code == 503:
        raise ApiUnavailable(message)
    raise T2IError(f"HTTP {response.status_code}: {message}")


class AsyncClient:
    def __init__(self, base_url: str, api_key: str, timeout_s: float = 30.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s + LONG_POLL_S,
                                       headers={"Authorization": f"Bearer {api_key}"})

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, job_id: str = "", lora: str = "",
                    **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        _raise_for(response, job_id, lora)
        return response

    async def submit(self, prompt: str, *, idempotency_key: str | None = None,
                     webhook_url: str | None = None, **params: Any) -> str:
        """Submit a job; with ``idempotency_key``, a retry returns the same job."""
        body = {"prompt": prompt, **params}
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = await self._call("POST", "/v1/jobs", json=body, headers=headers)
        return response.json()["id"]

    async def status(self, job_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        response = await self._call("GET", f"/v1/jobs/{job_id}", job_id,
                                    params={"wait": wait_s} if wait_s else None)
        return response.json()

    async def wait(self, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """Long-poll until the job finished (succeeded, failed or cancelled)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            job = await self.status(job_id, wait_s=max(0.0, min(LONG_POLL_S, left)))
            if JobState(job["state"]).terminal:
                return job
            if time.monotonic() >= deadline:
                raise Timeout(f"job {job_id} still {job['state']} after {timeout:.0f}s")

    async def events(self, job_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event, job) pairs from the server-sent events: ``progress`` ..., ``finished``."""
        try:
            async with self._http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response, job_id)
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        event = line[len("event: "):]
                    elif line.startswith("data: "):
                        yield event, json.loads(line[len("data: "):])
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"events of {job_id}: {exc}") from exc

    async def result(self, job_id: str) -> bytes:
        return (await self._call("GET", f"/v1/jobs/{job_id}/image", job_id)).content

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return (await self._call("DELETE", f"/v1/jobs/{job_id}", job_id)).json()

    async def upload_lora(self, name: str, data: bytes) -> dict[str, Any]:
        return (await self._call("PUT", f"/v1/loras/{name}", lora=name, content=data, headers={
            "Content-Type": "application/octet-stream"})).json()

    async def list_loras(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/loras")).json()["loras"]

    async def delete_lora(self, name: str) -> None:
        await self._call("DELETE", f"/v1/loras/{name}", lora=name)
