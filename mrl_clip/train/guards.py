"""When a long run should stop rather than go on: too much bad data, or a loss that stays non-finite.

Both raise TrainingHalted (one line, exit code 3) naming the step and the last checkpoint, which they never touch.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import TrainingHalted

# below this many samples read, one bad sample would already be a large fraction
BAD_FRACTION_MIN_SAMPLES = 1000
# bad samples named on stderr per process; log.jsonl names them all
MAX_PRINTED_BAD_SAMPLES = 20
_printed_bad = 0


LastCheckpoint = Optional[Callable[[], Optional[Path]]]  # the newest checkpoint `--resume` takes, if any


def last_checkpoint_text(last_checkpoint: LastCheckpoint) -> str:
    path = last_checkpoint() if last_checkpoint else None
    return f"last checkpoint {path} is intact" if path else "no checkpoint was written"


@dataclass
class NonFiniteSteps:
    """Counts skipped steps (non-finite loss or gradient); `max_in_row` of them in a row stop the run."""
    max_in_row: int
    in_row: int = 0
    total: int = 0
    first_in_row: int = 0

    def update(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_row = 0
            return
        self.total += 1
        self.in_row += 1
        if self.in_row == 1:
            self.first_in_row = step

    def check(self, step: int, last_checkpoint: LastCheckpoint = None) -> None:
        if self.in_row >= self.max_in_row:
            raise TrainingHalted(
                f"the loss or its gradient was not finite at steps {self.first_in_row}..{step} "
                f"({self.in_row} in a row, --max-nonfinite-steps {self.max_in_row}); stopped at step {step}; "
                f"{last_checkpoint_text(last_checkpoint)} (lower --lr, or set --grad-clip-norm, then --resume)")

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total, "first_in_row": self.first_in_row}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total, self.first_in_row = int(state["in_row"]), int(state["total"]), \
            int(state["first_in_row"])


def check_bad_fraction(bad: int, read: int, max_fraction: float, step: int, min_samples: int,
                       last_checkpoint: LastCheckpoint = None) -> None:
    """Stop once more than `max_fraction` of the samples read were bad (shard errors count as one each)."""
    if read < min_samples or bad <= max_fraction * read:
        return
    raise TrainingHalted(
        f"{bad} bad samples among {read} read ({100 * bad / read:.1f}%) exceed --max-bad-fraction {max_fraction}; "
        f"stopped at step {step}; {last_checkpoint_text(last_checkpoint)} (the bad samples are named in log.jsonl)")


def log_bad_samples(names: list, step: int, log_file=None) -> None:
    """Each bad sample (shard:key: what was wrong) as a log.jsonl record; the first few also on stderr."""
    global _printed_bad
    for name in names:
        if log_file is not None:
            log_file.write(json.dumps({"step": step, "bad_sample": name}) + "\n")
        if _printed_bad < MAX_PRINTED_BAD_SAMPLES:
            _printed_bad += 1
            more = "; further ones go to log.jsonl only" if _printed_bad == MAX_PRINTED_BAD_SAMPLES else ""
            print(f"warning: skipped bad sample {name}{more}", file=sys.stderr)
