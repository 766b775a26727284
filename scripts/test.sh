#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite against real servers and workers.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
