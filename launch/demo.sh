#!/usr/bin/env bash
# Install everything (see install.sh) and run the main job on the embedded default model.
# Extra arguments go to `smooth-jax demo`, e.g.  bash launch/demo.sh --out my_demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec .venv/bin/smooth-jax demo "$@"
