#!/usr/bin/env bash
# Install everything (see install.sh) and run the test suite. Extra arguments go to pytest,
# e.g.  bash launch/test.sh -m "not slow"   or   bash launch/test.sh tests/test_lora.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec .venv/bin/python -m pytest -q "$@"
