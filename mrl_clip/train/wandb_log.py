"""--report-to wandb (open_clip's flag) with --wandb-project-name and --wandb-notes: Weights & Biases, from rank 0.

wandb.init as open_clip_train/main.py calls it (project, name and id = --name, notes, config = the flags,
resume='auto' with --resume latest), its local files where wandb puts them (./wandb, or $WANDB_DIR/wandb: not in
RUN, whose wandb symlinks open_clip's fsspec --remote-sync cannot copy). The scalars are TensorBoard's (tensorboard_log.py:
train/loss, train/loss_dim{m}, train/lr, train/scale, train/samples_per_second, val/{metric}_dim{m}), logged at
the optimizer step. WANDB_MODE=offline keeps the run on disk (wandb sync uploads it later).
"""
from ..errors import UserError


def add_flags(p) -> None:
    p.add_argument("--wandb-project-name", type=str, default="open-clip",
                   help="with --report-to wandb: the W&B project (open_clip's default open-clip)")
    p.add_argument("--wandb-notes", type=str, default="", help="with --report-to wandb: the run's notes")


class WandbWriter:
    """The SummaryWriter calls the run makes (add_scalar, flush, close) on a wandb run."""

    def __init__(self, run):
        self.run = run

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class Writers:
    """Several writers as one (--report-to all: TensorBoard and W&B)."""

    def __init__(self, writers: list):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def make_writer(args) -> WandbWriter:
    try:
        import wandb
    except ImportError:
        raise UserError("--report-to wandb needs the wandb package (pip install wandb)") from None
    run = wandb.init(project=args.wandb_project_name, name=args.name, id=args.name, notes=args.wandb_notes, tags=[],
                     resume="auto" if args.resume == "latest" else None, config=vars(args))
    return WandbWriter(run)


def combined(writers: list):
    """None, the one writer, or Writers over them."""
    return None if not writers else writers[0] if len(writers) == 1 else Writers(writers)
