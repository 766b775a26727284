#!/usr/bin/env bash
# Set up (scripts/setup.sh), start the local stack, and submit the first prompts of the
# trace through it; prints a table of results and where the images are.
# Extra arguments go to `t2i demo` (see .venv/bin/t2i demo --help), e.g. -n 20 --size 128.
# Stop the stack afterwards with: .venv/bin/t2i-stack down
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/t2i-stack up
exec .venv/bin/t2i demo "$@"
