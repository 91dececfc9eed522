#!/bin/bash
# Multi-node GPU pretraining with SLURM: the same train.py and config as on a laptop.
#
#   sbatch scripts/slurm_train.sh                                   # defaults below
#   CONFIG=configs/bert_base_clipped_softmax.py WORKDIR=/shared/runs/bert_cs \
#     sbatch --nodes=4 scripts/slurm_train.sh --config.mesh.fsdp=8
#
# One process per GPU (JAX's SLURM convention: process i of a node drives GPU SLURM_LOCALID);
# jax.distributed.initialize() reads the SLURM variables, so no addresses are needed.
# WORKDIR must be on a filesystem every node sees (checkpoints, metrics, tokenizer, data cache).
# Resubmitting the same job resumes from the newest readable checkpoint. SLURM sends SIGTERM
# two minutes before the time limit (--signal): train.py then saves a checkpoint and exits 143.
#
#SBATCH --job-name=oqt-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${CONFIG:-configs/opt_125m_gated_attention.py}
WORKDIR=${WORKDIR:-${HOME}/oqt_runs/$(basename "${CONFIG}" .py)}
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
VENV=${VENV:-${REPO}/.venv}

cd "${REPO}"
if [[ -f "${VENV}/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "${VENV}/bin/activate"
fi
mkdir -p "${WORKDIR}"

# Each process sees all GPUs of its node and uses the one of its local rank; let XLA
# take most of the GPU memory and keep the HF libraries off the network on compute nodes.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}
export TOKENIZERS_PARALLELISM=false

echo "$(date) job ${SLURM_JOB_ID}: ${SLURM_NNODES} nodes x ${SLURM_NTASKS_PER_NODE} processes," \
     "config ${CONFIG}, workdir ${WORKDIR}"

srun --kill-on-bad-exit=1 --cpu-bind=none \
  python train.py --config "${CONFIG}" --workdir "${WORKDIR}" --distributed=yes \
    --progress=false "$@"
