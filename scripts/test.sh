#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint and type check (configured in pyproject.toml), and run the
# whole test suite against real servers and workers.
# Test-only system packages come from apt: Chromium (Flower in a browser) and docker-compose
# (validates infra/compose.yaml; no Docker daemon is used).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v chromium >/dev/null || ! command -v docker-compose >/dev/null; then
    echo "==> installing chromium and docker-compose (apt, for tests)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium docker-compose >/dev/null
fi
echo "==> lint (ruff) and type check (mypy)"
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -ra "$@"
