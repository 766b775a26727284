"""Structured logs: one JSON object per line, carrying the id of the job being worked on.

The job id travels in a context variable set around each job task (``enter_job``), so
every line logged inside, by our code or a library, names the job without each call
passing it. ``T2I_LOG_FORMAT=text`` keeps plain lines (with the id too) for a terminal.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

_job: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("t2i_job",
                                                                             default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [job %(job_id)s %(stage)s] %(message)s"


def enter_job(job_id: str, stage: str) -> contextvars.Token:
    """Name the job in every line logged from here until ``leave_job(token)``."""
    return _job.set((job_id, stage))


def leave_job(token: contextvars.Token) -> None:
    _job.reset(token)


@contextlib.contextmanager
def job_context(job_id: str, stage: str) -> Iterator[None]:
    token = enter_job(job_id, stage)
    try:
        yield
    finally:
        leave_job(token)


class JobContextFilter(logging.Filter):
    """Adds ``job_id`` and ``stage`` to every record ('-' outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id, record.stage = _job.get() or ("-", "-")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        job = _job.get()
        if job:
            line["job_id"], line["stage"] = job
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"T2I_LOG_FORMAT={log_format!r}: use json or text")


def install(handlers: list[logging.Handler], log_format: str) -> None:
    """Give ``handlers`` the chosen format and the job-id filter."""
    chosen = formatter(log_format)
    for handler in handlers:
        handler.setFormatter(chosen)
        handler.addFilter(JobContextFilter())


class _RootHandler(logging.StreamHandler):
    """Marks the handler ``configure`` added, so a second call adds none."""


def configure(log_format: str, level: int = logging.INFO) -> None:
    """For processes that do not set up logging themselves (the API): root logs to stderr."""
    root = logging.getLogger()
    if not any(isinstance(h, _RootHandler) for h in root.handlers):
        handler = _RootHandler()
        install([handler], log_format)
        root.addHandler(handler)
    root.setLevel(level)
