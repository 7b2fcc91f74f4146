"""--report-to tensorboard (open_clip's flag): TensorBoard scalars in RUN/tensorboard, written by rank 0.

Tags follow open_clip_train's: train/loss, train/lr, train/scale (exp(logit_scale), as open_clip logs it),
train/samples_per_second, plus train/loss_dim{m} for each nested dim; validation writes val/{metric}_dim{m}
(validate.py). Every scalar's step is the optimizer step (open_clip steps its val scalars by epoch; ours also run
every N steps). A resumed run drops what an earlier attempt wrote past the checkpoint it resumes from (the
SummaryWriter's purge_step), so each step keeps one value.
"""
from pathlib import Path
from typing import Optional

from ..errors import UserError

SUPPORTED = ("tensorboard", "wandb", "all")


def add_flags(p) -> None:
    p.add_argument("--report-to", default="",
                   help="'tensorboard': scalars per dim in RUN/tensorboard; 'wandb': the same scalars to Weights & "
                        "Biases (wandb_log.py); 'all': both (open_clip's values, comma-separated too)")


def check_flags(args) -> None:
    """args.report_to becomes the list of what was asked for ('all': tensorboard and wandb, as open_clip)."""
    asked = [v.strip() for v in args.report_to.split(",") if v.strip()]
    for value in asked:
        if value not in SUPPORTED:
            raise UserError(f"--report-to takes tensorboard, wandb or all, got '{value}'")
    args.report_to = ["tensorboard", "wandb"] if "all" in asked else asked


def make_writer(run_dir: Path, resumed_step: int) -> Optional[object]:
    """A SummaryWriter on RUN/tensorboard; after a resume at step N, what was written past N is dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)


def write_train(writer, record: dict) -> None:
    """The scalars of one log.jsonl training record."""
    step = record["step"]
    writer.add_scalar("train/loss", record["loss"], step)
    for m, value in record["loss_dim"].items():
        writer.add_scalar(f"train/loss_dim{m}", value, step)
    for name, value in record.get("loss_layer", {}).items():  # a 2D run's earlier exits
        writer.add_scalar(f"train/loss_{name}", value, step)
    writer.add_scalar("train/lr", record["lr"], step)
    writer.add_scalar("train/scale", record["logit_scale"], step)
    writer.add_scalar("train/samples_per_second", record["samples_per_s"], step)
    writer.flush()
