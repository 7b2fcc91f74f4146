"""Pre-emption: SLURM sends SIGUSR1 some time before it stops a job (`#SBATCH --signal=USR1@120`). The trainer
finishes its step, checkpoints and exits with EXIT_PREEMPTED; the sbatch script then requeues the job, which
resumes from that checkpoint."""
import signal

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


class PreemptionSignal:
    def __init__(self, signum=signal.SIGUSR1):
        self.received = False
        self.signum = signum
        signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def agreed(self, device) -> bool:
        """True on every rank once any rank got the signal, so all ranks stop at the same step."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
