#!/usr/bin/env bash
# The demo model through the cluster path on CPU ranks (DeepSpeed ZeRO-2 fp32, gloo) — what CI runs.
#
#   TRAIN_DATA='data/fashion_mnist_train/train-{0000..0011}.tar' sbatch slurm/train_tiny.sh [extra mrl_clip.train flags]
#
# Environment: TRAIN_DATA (required), OUTPUT_DIR (runs/slurm), RUN_NAME (job name + id, stable across requeues),
# DS_CONFIG (configs/ds_zero2_fp32.json; empty: plain DDP), PYTHON (python). Extra arguments go to mrl_clip.train
# after the defaults below, so they override them (e.g. --max-steps 40 --batch-size 32), open_clip's fine-tuning
# flags too (e.g. --pretrained runs/demo/tiny/checkpoints/step_N.pt --lock-image --lock-text
# --lock-text-freeze-layer-norm --lock-text-unlocked-layers 1); a requeued job resumes with the same ones.
#SBATCH --job-name=mrl-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source slurm/common.sh
DS_CONFIG=${DS_CONFIG-configs/ds_zero2_fp32.json}
check_inputs

run_ranks "$PYTHON" -m mrl_clip.train \
  --model MRL-Tiny-28 --train-data "$TRAIN_DATA" --dims 8,16,32,64,128,256 \
  --batch-size 64 --epochs 1 --lr 1e-3 --warmup 10 --workers 1 --threads "${SLURM_CPUS_PER_TASK:-1}" \
  --local-loss --gather-with-grad --device cpu \
  ${DS_CONFIG:+--deepspeed "$DS_CONFIG"} \
  --output-dir "${OUTPUT_DIR:-runs/slurm}" --name "${RUN_NAME:-$SLURM_JOB_NAME-$SLURM_JOB_ID}" \
  --save-every-n-steps 20 --resume latest "$@"
