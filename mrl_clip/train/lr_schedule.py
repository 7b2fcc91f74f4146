"""open_clip_train's learning-rate schedules for mrl_clip.train: --lr-scheduler {cosine,const,const-cooldown} with
--epochs-cooldown, --lr-cooldown-end and --lr-cooldown-power, and --skip-scheduler. The schedule functions are
open_clip_train.scheduler's own, built with the arguments open_clip_train/main.py gives them (steps are optimizer
steps: batches per epoch // accum-freq, times the epochs)."""
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from ..errors import UserError

SCHEDULERS = ("cosine", "const", "const-cooldown")


def add_flags(p) -> None:
    p.add_argument("--lr-scheduler", type=str, default="cosine",
                   help="cosine (default), const, or const-cooldown (needs --epochs-cooldown): open_clip_train's "
                        "schedules, each after --warmup steps of linear warm-up")
    p.add_argument("--epochs-cooldown", type=int, default=None,
                   help="with --lr-scheduler const-cooldown: the last N epochs decay the lr to --lr-cooldown-end")
    p.add_argument("--lr-cooldown-end", type=float, default=0.0, help="the lr at the end of the cooldown")
    p.add_argument("--lr-cooldown-power", type=float, default=1.0,
                   help="the cooldown's decay power (1: linear, as open_clip)")
    p.add_argument("--skip-scheduler", action="store_true",
                   help="no schedule: --lr throughout, without warm-up (open_clip's flag)")


def check_flags(args) -> None:
    if args.lr_scheduler not in SCHEDULERS:
        raise UserError(f"--lr-scheduler takes {', '.join(SCHEDULERS)}, got '{args.lr_scheduler}'")
    if args.lr_scheduler == "const-cooldown":
        if args.epochs_cooldown is None:
            raise UserError("--lr-scheduler const-cooldown needs --epochs-cooldown (the number of cooldown epochs)")
        if not 0 < args.epochs_cooldown <= args.epochs:
            raise UserError(f"--epochs-cooldown must be between 1 and --epochs ({args.epochs}), "
                            f"got {args.epochs_cooldown}")
    elif args.epochs_cooldown is not None:
        raise UserError("--epochs-cooldown only applies with --lr-scheduler const-cooldown (open_clip would ignore it)")
    if not args.lr_cooldown_power > 0:
        raise UserError(f"--lr-cooldown-power must be above 0, got {args.lr_cooldown_power}")
    if not args.lr_cooldown_end >= 0:
        raise UserError(f"--lr-cooldown-end must be 0 or more, got {args.lr_cooldown_end}")


def make(args, optimizer, steps_per_epoch: int):
    """step -> lr, setting it on the optimizer (unless --skip-scheduler), as open_clip_train/main.py builds it."""
    if args.skip_scheduler:
        return lambda step: optimizer.param_groups[0]["lr"]
    total_steps = steps_per_epoch * args.epochs
    if args.lr_scheduler == "cosine":
        return cosine_lr(optimizer, args.lr, args.warmup, total_steps)
    if args.lr_scheduler == "const":
        return const_lr(optimizer, args.lr, args.warmup, total_steps)
    return const_lr_cooldown(optimizer, args.lr, args.warmup, total_steps, steps_per_epoch * args.epochs_cooldown,
                             args.lr_cooldown_power, args.lr_cooldown_end)
