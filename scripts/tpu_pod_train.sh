#!/bin/bash
# Pretraining on a multi-host Cloud TPU VM slice (e.g. v4-32, v5p-64): the same train.py and
# config as on a laptop, started on every host of the slice at once.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b ./scripts/tpu_pod_train.sh setup   # once: install
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/runs/opt125m_gated \
#     ./scripts/tpu_pod_train.sh train --config.mesh.fsdp=-1 --config.mesh.data=1
#
# jax.distributed.initialize() finds the other hosts through the TPU metadata (--distributed=yes).
# WORKDIR must be a path every host sees: a Filestore/NFS mount or a gcsfuse-mounted bucket
# (the `setup` step can mount one: set BUCKET). Rerunning `train` resumes from the newest
# readable checkpoint; a preempted slice keeps its checkpoints in WORKDIR.

set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=${PROJECT}}
CONFIG=${CONFIG:-configs/opt_125m_gated_attention.py}
WORKDIR=${WORKDIR:-/mnt/oqt_runs/$(basename "${CONFIG}" .py)}
REPO_URL=${REPO_URL:-}                 # git URL of this repository (for `setup`)
REPO_DIR=${REPO_DIR:-oqt_jax}          # checkout folder in the home directory of every host
BUCKET=${BUCKET:-}                     # optional: gcsfuse-mount gs://BUCKET at /mnt/oqt_runs

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG} \
    --worker=all --command="$1"
}

case "${1:-train}" in
  setup)
    : "${REPO_URL:?set REPO_URL to clone the repository on every host}"
    on_all_workers "set -e
      [ -d ${REPO_DIR} ] || git clone ${REPO_URL} ${REPO_DIR}
      cd ${REPO_DIR} && git pull --ff-only
      python3 -m pip install -U pip
      python3 -m pip install -r requirements.txt 'jax[tpu]==0.10.2' -e .
      if [ -n '${BUCKET}' ]; then
        sudo mkdir -p /mnt/oqt_runs && sudo chown \$USER /mnt/oqt_runs
        mountpoint -q /mnt/oqt_runs || gcsfuse --implicit-dirs ${BUCKET} /mnt/oqt_runs
      fi"
    ;;
  train)
    shift || true
    extra=''
    if [[ $# -gt 0 ]]; then
      extra=$(printf ' %q' "$@")
    fi
    on_all_workers "cd ${REPO_DIR} && TOKENIZERS_PARALLELISM=false \
      python3 train.py --config ${CONFIG} --workdir ${WORKDIR} --distributed=yes \
      --progress=false ${extra} 2>&1 | tee -a \$HOME/oqt_train_\$(hostname).log"
    ;;
  *)
    echo "usage: $0 setup|train [train.py flags...]" >&2
    exit 2
    ;;
esac
