"""Pre-emption: SLURM sends SIGUSR1 some time before it stops a job (`#SBATCH --signal=USR1@120`). The trainer
finishes its step, checkpoints and exits with EXIT_PREEMPTED; the sbatch script then requeues the job, which
resumes from that checkpoint. The ranks agree on the step through agree.RankAgreement."""
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


class PreemptionSignal:
    def __init__(self, signum=signal.SIGUSR1):
        self.received = False
        signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = True
