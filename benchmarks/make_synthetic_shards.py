"""Random-image caption shards at any resolution, for throughput runs where no data set is at hand (GPU boxes).

    python benchmarks/make_synthetic_shards.py --out /tmp/shards --shards 8 --per-shard 1000 --size 224
"""
import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.shards import write_shards  # noqa: E402


def samples(count, size, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
        # smooth blobs (16x16 noise upsampled) compress and decode like photos; white noise would not
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        yield {"__key__": f"syn{i:08d}", "jpg": buf.getvalue(), "txt": f"a photo of thing number {i % 1000}."}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    total = args.shards * args.per_shard
    write_shards(samples(total, args.size, args.seed), args.out, "train", args.per_shard, total=total)


if __name__ == "__main__":
    main()
