"""The CLI's client of a deployment's HTTP API (`t2i --api-url URL --api-key KEY ...`): the
calls the CLI makes, with the sync Client's names and errors, over producer.aio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from core.errors import Timeout
from core.jobs import JobState
from producer.aio import AsyncClient

T = TypeVar("T")
POLL_S = 0.2  # how often a wait with a progress bar asks


class ApiClient:
    def __init__(self, base_url: str, api_key: str) -> None:
        self._base_url, self._api_key = base_url, api_key

    def _run(self, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
        async def session() -> T:
            async with AsyncClient(self._base_url, self._api_key) as t2i:
                return await call(t2i)
        return asyncio.run(session())

    def submit(self, prompt: str, **params: Any) -> str:
        return self._run(lambda t2i: t2i.submit(prompt, **params))

    def status(self, job_id: str) -> dict[str, Any]:
        return self._run(lambda t2i: t2i.status(job_id))

    def wait(self, job_id: str, timeout: float = 300.0,
             watch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job finished, showing each view to ``watch``."""
        async def follow(t2i: AsyncClient) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                view = await t2i.status(job_id)
                if watch is not None:
                    watch(view)
                if JobState(view["state"]).terminal:
                    return view
                if time.monotonic() >= deadline:
                    raise Timeout(f"job {job_id} still {view['state']} after {timeout:.0f}s")
                await asyncio.sleep(POLL_S)
        return self._run(follow)

    def result(self, job_id: str) -> bytes:
        return self._run(lambda t2i: t2i.result(job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._run(lambda t2i: t2i.cancel(job_id))

    def upload_lora(self, name: str, data: bytes) -> dict[str, Any]:
        return self._run(lambda t2i: t2i.upload_lora(name, data))

    def list_loras(self) -> list[dict[str, Any]]:
        return self._run(lambda t2i: t2i.list_loras())

    def delete_lora(self, name: str) -> None:
        self._run(lambda t2i: t2i.delete_lora(name))
