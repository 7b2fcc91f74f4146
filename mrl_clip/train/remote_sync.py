"""--remote-sync, --remote-sync-frequency, --remote-sync-protocol (open_clip's flags), with open_clip_train's own
file_utils.remote_sync: rank 0 copies LOGS/NAME to REMOTE/NAME once before training (a failure stops the run
there), then every --remote-sync-frequency seconds in a background process, and a last time when the run ends
(finished, pre-empted or stopped by an error). s3 runs `aws s3 sync` (the aws CLI must be on PATH); fsspec copies
each file whose size differs on the remote (open_clip's rule: a file rewritten at the same size, such as DeepSpeed's
`latest` pointer, is not copied again). Both skip epoch_latest.pt, as open_clip does. --resume latest reads the
local folder, not the remote.
"""
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def add_flags(p) -> None:
    p.add_argument("--remote-sync", type=str, default=None,
                   help="copy LOGS/NAME to REMOTE/NAME (an s3:// URL, or any fsspec URL or folder)")
    p.add_argument("--remote-sync-frequency", type=int, default=300, help="seconds between remote syncs")
    p.add_argument("--remote-sync-protocol", choices=["s3", "fsspec"], default="s3",
                   help="s3 (aws s3 sync, open_clip's default) or fsspec")


def check_flags(args) -> None:
    if args.remote_sync is None:
        return
    if args.remote_sync_frequency < 1:
        raise UserError(f"--remote-sync-frequency must be at least 1 (seconds), got {args.remote_sync_frequency}")
    if args.remote_sync_protocol == "s3" and shutil.which("aws") is None:
        raise UserError("--remote-sync-protocol s3 runs `aws s3 sync` (as open_clip does), and no aws CLI is on "
                        "PATH: install it, or use --remote-sync-protocol fsspec")


def remote_dir(args) -> str:
    return f"{args.remote_sync.rstrip('/')}/{args.name}"


@contextmanager
def syncing(args, run_dir: Path):
    """Rank 0 keeps REMOTE/NAME in step with run_dir while the body runs; other ranks, or no --remote-sync: no-op."""
    if args.remote_sync is None or args.rank != 0:
        yield
        return
    from open_clip_train.file_utils import remote_sync, start_sync_process

    local, remote = str(run_dir), remote_dir(args)
    if not remote_sync(local, remote, args.remote_sync_protocol):
        raise UserError(f"--remote-sync: the first sync of {local} to {remote} ({args.remote_sync_protocol}) failed")
    process = start_sync_process(args.remote_sync_frequency, local, remote, args.remote_sync_protocol)
    process.start()
    try:
        yield
    finally:
        process.terminate()
        process.join()
        if not remote_sync(local, remote, args.remote_sync_protocol):
            print(f"warning: the final remote sync of {local} to {remote} failed", file=sys.stderr)
