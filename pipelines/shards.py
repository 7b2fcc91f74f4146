"""Writing image-caption WebDataset shards, with open_clip's sizes.json beside them."""
import io
import json
import os
from pathlib import Path
from typing import Iterable

import webdataset as wds
from PIL import Image
from tqdm import tqdm


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(samples: Iterable[dict], folder: Path, prefix: str, shard_size: int, total=None) -> dict:
    """Write samples ({"__key__", "png"/"jpg"/..., "txt"}) to FOLDER/PREFIX-0000.tar, ... and sizes.json.
    Returns {shard file name: sample count}. Shards are written to a temporary name and renamed when whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    writer = None
    index = 0
    for sample in tqdm(samples, total=total, desc=f"writing {prefix} shards", unit="sample"):
        if writer is None or sizes[name] >= shard_size:
            if writer is not None:
                writer.close()
                os.replace(tmp_path, folder / name)
            name = f"{prefix}-{index:04d}.tar"
            tmp_path = folder / f".{name}.tmp"
            writer = wds.TarWriter(str(tmp_path))
            sizes[name] = 0
            index += 1
        writer.write(sample)
        sizes[name] += 1
    if writer is not None:
        writer.close()
        os.replace(tmp_path, folder / name)
    sizes_path = folder / "sizes.json"
    old = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    old = {k: v for k, v in old.items() if not k.startswith(f"{prefix}-")}
    sizes_path.write_text(json.dumps({**old, **sizes}, indent=1))
    return sizes


def brace_pattern(folder: Path, prefix: str, count: int) -> str:
    return str(Path(folder) / f"{prefix}-{{0000..{count - 1:04d}}}.tar")
