#!/usr/bin/env bash
# Set up smooth-jax in a virtual environment at ./.venv, or at $VENV (idempotent; re-running is fast).
#   bash launch/install.sh             runtime + the PyTorch extra (diffusers' PyTorch side, peft, pytest)
#   bash launch/install.sh --no-torch  runtime only
#   bash launch/install.sh --cuda      + jax's CUDA 12 plugin (GPU nodes)
#   bash launch/install.sh --tpu       + libtpu (TPU VMs)
#   bash launch/install.sh --plan      + the 'plan' extra: libtpu and jax's CUDA plugin, to compile for TPU pods
#                                       and GPU nodes on any machine (smooth-jax plan). With it installed, jax
#                                       logs "Could not find cuda drivers" (and, unless JAX_PLATFORMS=cpu or
#                                       JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1, a CUDA version-check traceback) at
#                                       start-up on machines without CUDA; CPU work is unaffected.
#   bash launch/install.sh --pytest    + pytest alone (with --no-torch: run tests that need no PyTorch)
# Python 3.10+ is needed; PYTHON overrides the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA="[test]"
ACCEL=""
PLAN=""
PYTEST=""
VENV=${VENV:-.venv}
for arg in "$@"; do
  case "$arg" in
    --no-torch) EXTRA="" ;;
    --cuda) ACCEL="jax[cuda12]==0.10.2" ;;
    --tpu) ACCEL="jax[tpu]==0.10.2" ;;
    --plan) PLAN=1 ;;
    --pytest) PYTEST=1 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# Some machines configure local package mirrors that pip reports as "Location ... is ignored"
# on every package; drop that noise but keep pip's exit status.
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored" >&2); }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install -e ".${EXTRA}"
# The real CLIP BPE vocabulary (for the offline SD tokenizer) ships in clip-anytorch. Only its
# data file is used; --no-deps keeps its torch/torchvision requirements out.
pip_install --no-deps clip-anytorch==2.6.0
[ -z "$ACCEL" ] || pip_install "$ACCEL"
[ -z "$PLAN" ] || pip_install -e ".[plan]"
[ -z "$PYTEST" ] || pip_install pytest
"$VENV/bin/python" -c "import smooth_jax, jax, flax, diffusers; print('smooth-jax', smooth_jax.__version__, '| jax', jax.__version__, '| flax', flax.__version__, '| diffusers', diffusers.__version__)"
