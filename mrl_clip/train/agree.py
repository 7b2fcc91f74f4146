"""What every rank must decide alike — stop for pre-emption, stop for too much bad data — without a per-step host
sync: each step starts a non-blocking all-reduce of this rank's numbers on a gloo group (CPU tensors, so no GPU
stream is synchronised) and reads the one it started the step before. Every rank reads the same totals at the same
step, one step after they were sent. One process reads its own numbers at once."""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .preempt import PreemptionSignal


@dataclass
class Agreed:
    preempted: bool     # any rank got the pre-emption signal
    bad_samples: int    # over all ranks
    samples_read: int


class RankAgreement:
    def __init__(self, preemption: PreemptionSignal, distributed: bool):
        self.preemption = preemption
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.pending = None  # (work, tensor) of the all-reduce started last step

    def exchange(self, bad_samples: int, samples_read: int) -> Agreed:
        mine = torch.tensor([int(self.preemption.received), bad_samples, samples_read], dtype=torch.int64)
        if self.group is None:
            return Agreed(bool(mine[0]), int(mine[1]), int(mine[2]))
        agreed = Agreed(False, 0, 0)
        if self.pending is not None:
            work, totals = self.pending
            work.wait()
            agreed = Agreed(bool(totals[0]), int(totals[1]), int(totals[2]))
        self.pending = (dist.all_reduce(mine, group=self.group, async_op=True), mine)  # a sum: flags add up too
        return agreed

    def close(self) -> None:
        """Wait for the last exchange (before the process group goes)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
