"""Where one rank's training stream stands (StreamPosition): what a checkpoint keeps of it for an exact resume,
gathered from every rank, and read back for this rank."""
from dataclasses import dataclass, field

import torch


@dataclass
class StreamPosition:
    """Where one rank's training stream stands, per logical worker: what a checkpoint needs to resume it exactly,
    and the running totals --max-bad-fraction is checked against."""
    epoch: int = 0
    batches: int = 0                                  # batches taken this epoch
    consumed: dict = field(default_factory=dict)      # worker -> samples read this epoch (good and bad)
    bad: dict = field(default_factory=dict)           # worker -> bad samples and shard errors this epoch
    read_before: int = 0                              # samples read in earlier epochs
    bad_before: int = 0
    workers: int = 1                                  # the loader's worker count the positions belong to

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.read_before, self.bad_before = self.samples_read, self.bad_samples
            self.epoch, self.batches, self.consumed, self.bad = epoch, 0, {}, {}

    def update(self, report: dict) -> list[str]:
        """Take a batch's report; returns the names of the bad samples it brings."""
        worker = int(report["worker"])
        self.batches += 1
        self.consumed[worker], self.bad[worker] = int(report["consumed"]), int(report["bad"])
        return list(report["new_bad"])

    @property
    def samples_read(self) -> int:
        return self.read_before + sum(self.consumed.values())

    @property
    def bad_samples(self) -> int:
        return self.bad_before + sum(self.bad.values())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "read_before": self.read_before,
                "bad_before": self.bad_before, "workers": self.workers, "consumed": dict(self.consumed),
                "bad": dict(self.bad)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "StreamPosition":
        return cls(epoch=int(state["epoch"]), batches=int(state["batches"]), read_before=int(state["read_before"]),
                   bad_before=int(state["bad_before"]), workers=int(state["workers"]),
                   consumed={int(w): int(n) for w, n in state["consumed"].items()},
                   bad={int(w): int(n) for w, n in state["bad"].items()})


def gather_positions(position: StreamPosition, distributed: bool, world_size: int) -> list[dict]:
    """Every rank's stream position (one per rank, in rank order) for the checkpoint rank 0 writes."""
    if not distributed:
        return [position.state_dict()]
    positions = [None] * world_size
    torch.distributed.all_gather_object(positions, position.state_dict())
    return positions


def position_for_rank(positions: list, rank: int, world_size: int, workers: int) -> StreamPosition:
    """This rank's stream position from a checkpoint's `positions` (every rank's, RunState.data); a fresh one when
    they are not for this number of ranks and workers (older checkpoints, or a resume on another layout: the stream
    then skips by batch count, which takes the right number of batches but not the same samples)."""
    if not positions or len(positions) != world_size or positions[rank].get("workers") != max(1, workers):
        return StreamPosition(workers=max(1, workers))
    return StreamPosition.from_state_dict(positions[rank])
