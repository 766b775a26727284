"""t2i-gpu-worker [celery worker options, e.g. -n gpu0@%h --loglevel INFO]

A GPU worker with the pool T2I_GPU_BATCH asks for: one job per pool process (`-c 1 -P
prefork`), or, above 1, that many task threads whose jobs one batcher thread advances
together (`-c N -P threads`). Compose and Kubernetes run it; the local stack
(infra.servers) starts its GPU workers with the same command line, ``celery_command``.
"""

from __future__ import annotations

import os
import sys

from core.settings import Settings, load_settings
from infra.servers import celery_argv
from workers.queues import GPU_QUEUES


def gpu_pool(config: Settings) -> tuple[int, str]:
    """(concurrency, pool) of a GPU worker for ``config.gpu_batch``."""
    return (config.gpu_batch, "threads") if config.gpu_batch > 1 else (1, "prefork")


def celery_command(config: Settings, options: list[str]) -> list[str]:
    """The worker's command line: the GPU queues, the pool for T2I_GPU_BATCH, ``options``."""
    concurrency, pool = gpu_pool(config)
    node = [] if "-n" in options else ["-n", "gpu@%h"]
    return celery_argv("worker", "-Q", ",".join(GPU_QUEUES), "-c", str(concurrency),
                       "-P", pool, *node, *options)


def main(argv: list[str] | None = None) -> int:
    options = sys.argv[1:] if argv is None else argv
    if options[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    command = celery_command(load_settings(), options)
    os.execv(command[0], command)  # this process becomes the worker
