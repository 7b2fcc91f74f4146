"""Writing image-caption WebDataset shards, with open_clip's sizes.json beside them."""
import io
import itertools
import json
import shutil
import warnings
from pathlib import Path
from typing import Iterable

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mrl_clip.files import atomic_write, write_json


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: Iterable[dict]) -> int:
    """One shard, written to a temporary name and renamed when whole; returns its sample count."""
    count = 0

    def write(tmp):
        nonlocal count
        with wds.TarWriter(tmp) as writer:
            for sample in samples:
                writer.write(sample)
                count += 1

    atomic_write(path, write)
    return count


def write_shards(samples: Iterable[dict], folder: Path, prefix: str, shard_size: int, total=None) -> dict:
    """Write samples ({"__key__", "png"/"jpg"/..., "txt"}) to FOLDER/PREFIX-0000.tar, ... and sizes.json.
    Returns {shard file name: sample count}."""
    folder = Path(folder)
    stream = iter(tqdm(samples, total=total, desc=f"writing {prefix} shards", unit="sample"))
    sizes: dict[str, int] = {}
    while (first := next(stream, None)) is not None:
        name = f"{prefix}-{len(sizes):04d}.tar"
        sizes[name] = write_tar(folder / name, itertools.chain([first], itertools.islice(stream, shard_size - 1)))
    sizes_path = folder / "sizes.json"
    old = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    old = {k: v for k, v in old.items() if not k.startswith(f"{prefix}-")}
    write_json({**old, **sizes}, sizes_path)
    return sizes


def brace_pattern(folder: Path, prefix: str, count: int) -> str:
    return str(Path(folder) / f"{prefix}-{{0000..{count - 1:04d}}}.tar")


def write_retrieval_folder(pairs: list, folder: Path) -> Path:
    """A CLIP_benchmark retrieval folder (dataset_type.txt, test/nshards.txt, test/0.tar with png + txt, keys
    s0000000, ... in the order of `pairs`) from (PIL image, [caption, ...]) pairs, through CLIP_benchmark's own
    converter; written beside `folder` and renamed into place when whole."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_retrieval_dataset

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():  # its DataLoader asks for 8 workers whatever the machine has
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        convert_retrieval_dataset(pairs, "test", str(tmp), transform=PIL_to_bytes("png"), image_format="png",
                                  verbose=False)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
