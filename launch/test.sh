#!/usr/bin/env bash
# Install everything (see install.sh) and run the test suite. Extra arguments go to pytest,
# e.g.  bash launch/test.sh -m "not slow"   or   bash launch/test.sh tests/test_lora.py
#
# Without arguments it then runs tests/test_plan.py (ahead-of-time compiles for TPU pods and GPU
# nodes) in a second venv, .venv-plan, that has the 'plan' extra (libtpu, jax's CUDA compiler
# plugin): installed in .venv they would make every JAX process log TPU/CUDA start-up errors.
# PLAN_TESTS=0 skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
if [ "$#" -gt 0 ] || [ "${PLAN_TESTS:-1}" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
VENV=.venv-plan bash launch/install.sh --no-torch --plan --pytest
exec .venv-plan/bin/python -m pytest -q tests/test_plan.py
