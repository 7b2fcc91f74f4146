# Sourced by the sbatch scripts: torch.distributed's rendezvous from SLURM's variables, and pre-emption.
#
# Each srun task is one rank: open_clip_train's init_distributed_device reads SLURM_PROCID / SLURM_LOCALID /
# SLURM_NTASKS; the rendezvous is MASTER_ADDR:MASTER_PORT (the first node of the job, a port from the job id).
# Pre-emption: `#SBATCH --signal=B:USR1@120` warns this batch shell; it passes USR1 to the ranks (through srun),
# they checkpoint and exit with 75, and the job requeues itself; the requeued job (same job id, same run folder)
# starts again with --resume latest.

die() { echo "error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit this script with sbatch (no SLURM_JOB_ID)"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
EXIT_PREEMPTED=75

check_inputs() {  # the mistakes worth a clear message before any rank starts
  "$PYTHON" -c "import mrl_clip" 2>/dev/null \
    || die "$PYTHON cannot import mrl_clip: activate the environment (conda env create -f environment.yml) or set PYTHON"
  if [ -z "${TRAIN_DATA:-}" ]; then die "set TRAIN_DATA to your shards, e.g. TRAIN_DATA='/data/shards/{00000..01023}.tar'"; fi
  if [ -n "${DS_CONFIG:-}" ] && [ ! -f "$DS_CONFIG" ]; then die "DeepSpeed config not found: $DS_CONFIG"; fi
}

run_ranks() {  # srun ARGS... ; requeues the job when it was pre-empted
  local preempted=0 rc srun_pid
  trap 'preempted=1; echo "pre-emption warning (USR1): ranks checkpoint and stop" >&2; kill -USR1 "$srun_pid" 2>/dev/null' USR1
  echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS ranks on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
  srun --kill-on-bad-exit=1 "$@" &
  srun_pid=$!
  while :; do
    wait "$srun_pid"; rc=$?
    # a trap interrupts wait with a status above 128 while srun still runs: wait again
    if [ "$rc" -le 128 ] || ! kill -0 "$srun_pid" 2>/dev/null; then break; fi
  done
  trap - USR1
  if [ "$rc" = "$EXIT_PREEMPTED" ] || [ "$preempted" = 1 ]; then
    echo "requeueing job $SLURM_JOB_ID; it resumes from its latest checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
