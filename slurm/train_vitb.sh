#!/usr/bin/env bash
# ViT-B-32 towers with a 768-d Matryoshka embedding (ViT-B-32-768) on N nodes x G GPUs, DeepSpeed ZeRO-2, bf16 autocast.
#
#   TRAIN_DATA='/data/laion/{00000..41407}.tar' TRAIN_NUM_SAMPLES=400000000 sbatch --nodes 4 slurm/train_vitb.sh
#
# Environment: TRAIN_DATA (required), TRAIN_NUM_SAMPLES (default: sizes.json beside the shards), OUTPUT_DIR
# (runs/slurm), RUN_NAME (job name + id: a requeued job keeps it and resumes), DS_CONFIG
# (configs/ds_zero2_autocast_bf16.json: fp32 weights, bf16 autocast, as open_clip's amp_bf16; empty: plain DDP
# with --precision amp_bf16), PYTHON (python). Extra arguments go to
# mrl_clip.train after the defaults below and override them (e.g. --epochs 10 --lr 1e-3).
# Change nodes / GPUs per node on the sbatch command line or here; ranks = nodes x ntasks-per-node.
# Fine-tuning takes open_clip's flags the same way; a requeued job gets the same ones, so it resumes with the same
# parameters locked (a resume with other --lock-* flags is refused):
#   TRAIN_DATA=... sbatch slurm/train_vitb.sh --pretrained runs/slurm/base/checkpoints/step_N.pt --lock-image \
#     --lock-image-unlocked-groups 2 --grad-checkpointing --lr 1e-4 --warmup 500
#SBATCH --job-name=mrl-vitb32
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source slurm/common.sh
DS_CONFIG=${DS_CONFIG-configs/ds_zero2_autocast_bf16.json}
check_inputs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

precision=()
[ -z "$DS_CONFIG" ] && precision=(--precision amp_bf16)
run_ranks "$PYTHON" -m mrl_clip.train \
  --model ViT-B-32-768 --train-data "$TRAIN_DATA" \
  ${TRAIN_NUM_SAMPLES:+--train-num-samples "$TRAIN_NUM_SAMPLES"} --dataset-resampled \
  --dims 32,64,128,256,512,768 --batch-size 256 --epochs 32 \
  --lr 5e-4 --wd 0.2 --warmup 2000 --beta2 0.98 --eps 1e-6 \
  --workers $(( ${SLURM_CPUS_PER_TASK:-10} > 2 ? ${SLURM_CPUS_PER_TASK:-10} - 2 : 1 )) \
  --local-loss --gather-with-grad --device cuda \
  ${DS_CONFIG:+--deepspeed "$DS_CONFIG"} "${precision[@]}" \
  --output-dir "${OUTPUT_DIR:-runs/slurm}" --name "${RUN_NAME:-$SLURM_JOB_NAME-$SLURM_JOB_ID}" \
  --save-every-n-steps 1000 --log-every-n-steps 50 --resume latest "$@"
