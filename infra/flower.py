"""Flower behind basic auth on every page: ``python -m infra.flower [flower options]``.

Flower leaves ``/metrics`` and ``/healthcheck`` open even with ``--basic-auth`` (they are
meant for scrapers); here they need the same credentials as the rest, which Prometheus can
send too. Everything else is ``celery -A workers.app flower``.
"""

from __future__ import annotations

import sys

import tornado.web


def require_auth_everywhere() -> None:
    from flower.views.monitor import Healthcheck, Metrics

    for handler in (Metrics, Healthcheck):
        handler.get = tornado.web.authenticated(handler.get)


def main() -> None:
    from celery.bin.celery import main as celery

    require_auth_everywhere()
    sys.argv = ["celery", "-A", "workers.app", "flower", *sys.argv[1:]]
    celery()


if __name__ == "__main__":
    main()
