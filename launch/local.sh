#!/usr/bin/env bash
# One host, all its devices (CPU, one GPU node, or one TPU VM):
#   bash launch/local.sh --config configs/tiny.py --workdir runs/tiny [--config.a.b=v ...]
# On a CPU, SMOOTH_JAX_CPU_DEVICES=8 splits the host into 8 devices to try a mesh config.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SMOOTH_JAX_CPU_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${SMOOTH_JAX_CPU_DEVICES}"
fi
exec .venv/bin/smooth-jax train "$@"
