#!/usr/bin/env bash
# A TPU pod slice: the same command on every worker (gcloud ... ssh --worker=all).
#   TPU=my-v5e-16 ZONE=us-west4-a bash launch/tpu_pod.sh setup
#   TPU=my-v5e-16 ZONE=us-west4-a bash launch/tpu_pod.sh train --config configs/sd15_tpu_v5e_16.py \
#       --workdir gs-fuse-or-nfs/runs/sd15 --config.model=/data/stable-diffusion-v1-5 --config.data.path=/data/laion
# The workdir must be a path every worker sees (NFS, a GCS FUSE mount): orbax writes one checkpoint
# from all hosts. jax.distributed finds the pod's hosts itself (SMOOTH_JAX_DISTRIBUTED=auto).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-smooth-jax}
what=${1:?setup or train}; shift
case "$what" in
  setup) cmd="cd $REPO && bash launch/install.sh --tpu" ;;
  train) cmd="cd $REPO && SMOOTH_JAX_DISTRIBUTED=auto .venv/bin/smooth-jax train $(printf '%q ' "$@")" ;;
  *) echo "usage: $0 setup|train [smooth-jax train args]" >&2; exit 2 ;;
esac
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$cmd"
