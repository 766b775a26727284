#!/usr/bin/env bash
# Fetch, here (where the package index is reachable), the wheels bench/gpu/run.sh installs
# on a GPU machine that has python3 with torch and transformers but no network: diffusers,
# pure Python, at the version this project's environment uses. They land in
# bench/gpu/wheels/ (git-ignored; carry that folder to the GPU machine with the tree).
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-.venv/bin/python}"
version="$("$python" -c 'import diffusers; print(diffusers.__version__)')"
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d bench/gpu/wheels \
    "diffusers==${version}"
ls -l bench/gpu/wheels
