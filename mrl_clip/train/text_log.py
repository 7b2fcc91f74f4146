"""open_clip_train's text log: RUN/out.log, or with --log-local RUN/out-RANK on each node's local rank 0 (what
open_clip_train's setup_logging writes). Ours is a copy of the process's stderr lines, appended on resume; a
progress bar's carriage-return redraws keep only their last state, so the file holds one line per bar."""
import sys
from pathlib import Path

from open_clip_train.distributed import is_master


def add_flags(p) -> None:
    p.add_argument("--log-local", action="store_true", default=False,
                   help="log files on local master, otherwise global master only (open_clip's meaning): "
                        "RUN/out-RANK instead of RUN/out.log")


def log_path(args, run_dir: Path):
    """This process's text log, or None (open_clip_train/main.py's rule)."""
    if not is_master(args, local=args.log_local):
        return None
    return Path(run_dir) / (f"out-{args.rank}" if args.log_local else "out.log")


class Tee:
    """Writes go to `stream` as they are and, line by line, to `file`."""

    def __init__(self, stream, file):
        self.stream, self.file, self.pending = stream, file, ""

    def write(self, text):
        self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.file.write(line.rsplit("\r", 1)[-1] + "\n")
        if lines:
            self.file.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def close_file(self):
        if self.pending.strip("\r"):
            self.file.write(self.pending.rsplit("\r", 1)[-1] + "\n")
        self.file.close()

    def __getattr__(self, name):  # isatty, fileno, encoding... of the real stream
        return getattr(self.stream, name)


def start(args, run_dir: Path) -> None:
    """Copy stderr to this process's text log from here on (any earlier copy ends first)."""
    stop()
    path = log_path(args, run_dir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = Tee(sys.stderr, open(path, "a", encoding="utf-8"))


def stop() -> None:
    if isinstance(sys.stderr, Tee):
        tee, sys.stderr = sys.stderr, sys.stderr.stream
        tee.close_file()
