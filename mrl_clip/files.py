"""Files written atomically: whole or not at all, whatever kills the writer."""
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError

FULL_DISK_BYTES = 1 << 20  # a write that failed with less than this left on the disk failed for want of space

PARTIAL_FILE = re.compile(r"^\..+\.tmp$")


def atomic_write(path, write) -> Path:
    """`write(tmp_path)` writes a temporary file in the same folder; it is flushed to disk, then renamed over
    `path`, so readers see the old file or the whole new one, never a part. A process killed mid-write leaves
    only a hidden .NAME.*.tmp file, which no reader picks (remove_partial_files clears them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)  # the rename itself survives a crash
    except BaseException as err:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos"), numpy as an OSError without errno
        free = shutil.disk_usage(path.parent).free if isinstance(err, (OSError, RuntimeError)) else None
        if os.path.exists(tmp):
            os.unlink(tmp)
        if free is not None and free < FULL_DISK_BYTES:
            raise UserError(f"cannot write {path}: the disk is full ({free} bytes free on its disk; the partial "
                            "file was removed)") from None
        raise
    return path


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that were killed (call it where one process writes the folder)."""
    folder = Path(folder)
    partial = [folder / n for n in os.listdir(folder) if PARTIAL_FILE.match(n)] if folder.is_dir() else []
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path) -> None:
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_folder(out, write) -> Path:
    """`write(tmp)` fills a temporary folder beside `out` (which must not exist, or be empty); its files are
    flushed, then it is renamed to `out`, so an interrupted run leaves no folder that looks finished."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's folder is private
        fsync_folder(tmp)
        if out.exists():
            out.rmdir()  # empty (the caller checked); rename cannot replace a folder on every platform
        os.rename(tmp, out)
        fsync_folder(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
