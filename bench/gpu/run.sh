#!/usr/bin/env bash
# The GPU benchmark in one command, for a bare machine with python3 (3.11 or later), torch,
# transformers and Pillow and no network (bench/gpu/prepare.sh fetched the rest beforehand,
# into bench/gpu/wheels):
#
#   bench/gpu/run.sh                       # SD 1.5's architecture, fp16, 512 px, batches 1-16
#   bench/gpu/run.sh --out $OUT/gpu-step.json
#
# Arguments go to `python -m bench.gpu_step` (see its --help; --model tiny --device cpu
# --size 64 --steps 10 --k 5 --batches 1,2 --timed-steps 2 is the dry run used in the tests).
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-python3}"
if ! "$python" -c 'import diffusers' 2>/dev/null; then
    site="${TMPDIR:-/tmp}/t2i-bench-site"
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" bench/gpu/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" -m bench.gpu_step "$@"
