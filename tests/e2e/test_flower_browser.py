"""Flower in a real browser (Debian's headless Chromium, driven by Playwright): behind basic
auth, it lists the stack's triage and GPU workers and the tasks they ran, as rendered in
the page's DOM. Set T2I_SCREENSHOT_DIR to keep the screenshots (the README's comes from it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra import servers
from infra.servers import running

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without these, Chromium keeps trying to reach Google's hosts, which this network refuses.
QUIET = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def flower(stack, base_dir: Path) -> Iterator[str]:
    with running(servers.flower(stack), log_dir=base_dir / "logs"):
        yield f"http://127.0.0.1:{stack.flower_port}"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/test.sh installs it with apt)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=QUIET,
                                              chromium_sandbox=False)
        yield launched
        launched.close()


def test_flower_shows_workers_and_succeeded_tasks(flower: str, browser, api: httpx.Client,
                                                  stack, tmp_path: Path) -> None:
    assert httpx.get(flower).status_code == 401
    ids = [api.post("/v1/jobs", json={"prompt": f"a watched {animal}", "steps": 3, "width": 64,
                                      "height": 64}).json()["id"] for animal in ("owl", "cat")]
    for job_id in ids:
        assert api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()["state"] == "succeeded"
    user, _, password = stack.flower_auth.partition(":")
    context = browser.new_context(http_credentials={"username": user, "password": password},
                                  viewport={"width": 1280, "height": 720})
    page = context.new_page()
    shots = Path(os.environ.get("T2I_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)

    page.goto(f"{flower}/workers")
    page.wait_for_selector("text=gpu-test@", timeout=30_000)
    workers = page.text_content("body")  # the DOM's text: inner_text breaks long names
    assert "triage-test@" in workers and "gpu-test@" in workers
    page.screenshot(path=str(shots / "flower-workers.png"))

    page.goto(f"{flower}/tasks")
    page.wait_for_selector("td:has-text('gen.full')", timeout=30_000)
    table = page.text_content("body")
    assert table.count("triage.route") >= 2 and table.count("gen.full") >= 2
    assert "SUCCESS" in table and "FAILURE" not in table
    page.screenshot(path=str(shots / "flower-tasks.png"), full_page=True)
    context.close()


def test_every_flower_page_needs_the_password_and_task_messages_carry_no_prompt(
        flower: str, api: httpx.Client, stack) -> None:
    """Flower's own /metrics and /healthcheck skip its basic auth; ours do not. And what
    Flower shows of each task (its message's arguments) names jobs, never their prompts."""
    for path in ("/metrics", "/healthcheck", "/api/tasks", "/"):
        assert httpx.get(flower + path).status_code == 401, path
    auth = tuple(stack.flower_auth.split(":", 1))
    assert httpx.get(f"{flower}/metrics", auth=auth).status_code == 200
    prompt = "a secret recipe for plum jam"
    job_id = api.post("/v1/jobs", json={"prompt": prompt, "steps": 3}).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()["state"] == "succeeded"
    deadline, tasks = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        tasks = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=30).json()
        mine = {t["name"] for t in tasks.values() if job_id in str(t.get("args"))}
        if {"triage.route", "gen.full", "cache.register"} <= mine:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Flower did not show the job's three tasks: {tasks}")
    assert "plum jam" not in json.dumps(tasks)
