#!/usr/bin/env bash
# Set up (scripts/setup.sh), start the local stack with the scene-world model (trained here
# by quality.world_model, committed), and run one user's session of scene prompts (edits
# and re-rolls, so later jobs resume from cached latents); prints a table (route, K) and
# writes the images and a contact sheet.
# Extra arguments go to `t2i demo` (see .venv/bin/t2i demo --help), e.g. -n 20, or
# --trace ../shared/data/sd-discord-trace.csv.gz with T2I_MODEL=tiny for real prompts.
# Stop the stack afterwards with: .venv/bin/t2i-stack down
set -euo pipefail
cd "$(dirname "$0")/.."
export T2I_MODEL="${T2I_MODEL:-scene}"
scripts/setup.sh
.venv/bin/t2i-stack up
exec .venv/bin/t2i demo "$@"
