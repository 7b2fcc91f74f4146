"""Ranks agree on stopping (pre-emption) and on bad-data totals without a per-step host sync: two gloo
processes, the signal reaching one of them."""
import json
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from mrl_clip.train.agree import Agreed, RankAgreement
from mrl_clip.train.preempt import PreemptionSignal

from .test_distributed import free_port

STEPS, SIGNAL_AT = 6, 3  # rank 1 gets the signal just before its step 3 exchange


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    preemption = PreemptionSignal()
    agreement = RankAgreement(preemption, distributed=True)
    seen = []
    for step in range(1, STEPS + 1):
        if rank == 1 and step == SIGNAL_AT:
            preemption.received = True  # what the SIGUSR1 handler sets
        agreed = agreement.exchange(bad_samples=step * (rank + 1), samples_read=100 * step)
        seen.append([agreed.preempted, agreed.bad_samples, agreed.samples_read])
    agreement.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


def test_ranks_read_the_same_totals_one_step_late(tmp_path):
    mp.spawn(rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]  # every rank decides alike, at the same step
    # step s reads what the ranks sent at step s - 1: bad (s-1)*1 + (s-1)*2, read 2 * 100 * (s-1)
    expected = [[False, 0, 0]] + [[s - 1 >= SIGNAL_AT, 3 * (s - 1), 200 * (s - 1)] for s in range(2, STEPS + 1)]
    assert seen[0] == expected


def test_one_process_reads_its_own_numbers_at_once():
    """Not one step late as with ranks: each exchange returns the numbers it was given, the first one included."""
    preemption = PreemptionSignal()
    agreement = RankAgreement(preemption, distributed=False)
    assert agreement.exchange(2, 50) == Agreed(preempted=False, bad_samples=2, samples_read=50)
    preemption.received = True
    agreed = agreement.exchange(3, 60)
    assert (agreed.preempted, agreed.bad_samples, agreed.samples_read) == (True, 3, 60)
