#!/usr/bin/env bash
# Set up everything on a fresh machine: redis-server (apt), a virtualenv in .venv with
# torch 2.13.0 (installed first, so no multi-GB CUDA build is pulled) and this project, at
# the exact versions in constraints.txt.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${T2I_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! command -v redis-server >/dev/null; then
    echo "==> installing redis-server (apt)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "==> installing torch==2.13.0"
    "${PIP[@]}" "torch==2.13.0"
fi
if ! "$VENV/bin/python" -c "import celeryconfig, pytest" 2>/dev/null \
        || [ pyproject.toml -nt "$VENV/.t2i-installed" ] \
        || [ constraints.txt -nt "$VENV/.t2i-installed" ]; then
    echo "==> installing t2i-serve and its dependencies (a few minutes the first time)"
    "${PIP[@]}" -c constraints.txt -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import celeryconfig, diffusers, chromadb, pytest"
    touch "$VENV/.t2i-installed"
fi
echo "==> ready: $VENV"
