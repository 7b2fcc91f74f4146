"""open_clip_train's epoch checkpoints for mrl_clip.train: --save-frequency, --save-most-recent and
--delete-previous-checkpoint.

They are off unless one of the three flags is given (step checkpoints, --save-every-n-steps, are what a resume
reads); then open_clip_train/main.py's meaning, with its default --save-frequency 1: at the end of epoch N, when
N % save-frequency == 0 or N is the last epoch, RUN/checkpoints/epoch_N.pt; with --save-most-recent,
RUN/checkpoints/epoch_latest.pt at every epoch end; with --delete-previous-checkpoint, the previous epoch_N.pt
goes once the new one is written (open_clip removes epoch_{N-1}.pt at every epoch end, even one that wrote none).

An epoch file is the step checkpoint of the step that ends the epoch, under another name: the run saves a step
checkpoint there (so --resume latest is never behind an epoch file) and copies it. A plain run's epoch_N.pt is
that step_N.pt (open_clip's keys: epoch, name, state_dict, optimizer, plus ours); a DeepSpeed run's is the fp32
weights rebuilt from checkpoints/deepspeed/step_N (no optimizer: DeepSpeed's own folder is what resumes).
Writes are atomic, by rank 0.
"""
import re
import shutil
import sys

from ..checkpoint import prune_checkpoints
from ..errors import UserError
from ..files import atomic_torch_save, atomic_write
from .convert_deepspeed import open_clip_checkpoint, step_tag
from .deepspeed_engine import DeepSpeedEngine

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
LATEST = "epoch_latest.pt"  # open_clip_train's LATEST_CHECKPOINT_NAME


def add_flags(p) -> None:
    p.add_argument("--save-frequency", type=int, default=None,
                   help="write RUN/checkpoints/epoch_N.pt every N epochs and after the last (open_clip's; off "
                        "unless this or --save-most-recent / --delete-previous-checkpoint is given, then 1)")
    p.add_argument("--save-most-recent", action="store_true",
                   help="write RUN/checkpoints/epoch_latest.pt at every epoch end")
    p.add_argument("--delete-previous-checkpoint", action="store_true",
                   help="keep only the newest epoch_N.pt")


def check_flags(args) -> None:
    if args.save_frequency is not None and args.save_frequency < 0:
        raise UserError(f"--save-frequency must be 0 or more, got {args.save_frequency}")
    if args.save_frequency is None and (args.save_most_recent or args.delete_previous_checkpoint):
        args.save_frequency = 1  # open_clip_train's default
    args.epoch_checkpoints = args.save_frequency is not None


def due(run) -> bool:
    """Whether run.step ends an epoch that writes an epoch file."""
    args = run.args
    if not getattr(args, "epoch_checkpoints", False) or run.step % run.steps_per_epoch:
        return False
    epoch = run.step // run.steps_per_epoch
    return epoch == args.epochs or args.save_most_recent or (args.save_frequency > 0 and
                                                               epoch % args.save_frequency == 0)


def write(run) -> None:
    """The epoch files of the epoch run.step ends (after its step checkpoint is saved)."""
    args = run.args
    if args.rank != 0 or not due(run):
        return
    epoch = run.step // run.steps_per_epoch
    folder = run.checkpoint_dir
    numbered = epoch == args.epochs or (args.save_frequency > 0 and epoch % args.save_frequency == 0)
    targets = ([folder / f"epoch_{epoch}.pt"] if numbered else []) + ([folder / LATEST] if args.save_most_recent
                                                                       else [])
    if isinstance(run.engine, DeepSpeedEngine):
        checkpoint = open_clip_checkpoint(folder / "deepspeed", step_tag(run.step))
        for target in targets:
            atomic_torch_save(checkpoint, target)
    else:
        source = folder / f"step_{run.step}.pt"
        for target in targets:
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    if numbered and args.delete_previous_checkpoint:
        prune_checkpoints(folder, 1, EPOCH_FILE)
    print(f"epoch {epoch}: {', '.join(str(t) for t in targets)}", file=sys.stderr)

