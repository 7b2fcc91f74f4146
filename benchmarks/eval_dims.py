"""Zero-shot evaluation at every nested dim against the same evaluation at one dim.

    python benchmarks/eval_dims.py [--quick] [--images 2000] [--repeats 5] [--threads 2]

MRL-Tiny-28-P7-768 (768-d, so the default dims are the eight 8, 16, ..., 768) through `mrl_clip.eval`'s
run_zeroshot — model creation, reading the CLIP_benchmark folder, encoding images and prompts, the metrics — with
all eight dims and with the full width only, interleaved; the result is the median of per-round time ratios.
Weights are untrained (timing does not depend on them). Writes benchmarks/results/eval_dims.json.
"""
import argparse
import statistics
import time

import torch

from common import CACHE, machine, median_ratio, write_result
from mrl_clip.eval import run_zeroshot
from mrl_clip.models import embed_width
from mrl_clip.report import default_dims, render_table
from pipelines import fashion_mnist

MODEL = "MRL-Tiny-28-P7-768"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 images, 1 round: checks the script runs")
    p.add_argument("--images", type=int, default=None, help="test images evaluated (default 2,000)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    images = args.images or (200 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    folder = CACHE / f"eval_dims_{images}"
    if not (folder / "test" / "nshards.txt").is_file():
        fashion_mnist.build_eval_folder(fashion_mnist.DEBIAN_DIR, folder, limit=images)

    width = embed_width(MODEL)
    runs = {"all": default_dims(width), "one": [width]}
    run_zeroshot(MODEL, None, str(folder), runs["one"])  # warm-up: first reads, allocator, lazy imports
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, dims in runs.items():
            started = time.perf_counter()
            run_zeroshot(MODEL, None, str(folder), dims)
            times[name].append(time.perf_counter() - started)
    ratio = median_ratio(times["all"], times["one"])
    table = [[f"{len(dims)} dims ({','.join(map(str, dims))})", f"{statistics.median(times[name]):.2f}"]
             for name, dims in runs.items()]
    print(f"{MODEL}, {images} Fashion-MNIST test images, {args.threads} threads, {repeats} interleaved rounds")
    print(render_table(["zero-shot evaluation", "median s"], table))
    print(f"ratio (8 dims / 1 dim), median of rounds: {ratio:.3f}  (goal <= 1.1)")
    write_result("eval_dims", {"benchmark": "eval_dims", "model": MODEL, "images": images, "repeats": repeats,
                               "dims": runs, "median_s": {k: statistics.median(v) for k, v in times.items()},
                               "seconds": times, "median_ratio": ratio, "goal": "<= 1.1",
                               "machine": machine(args.threads)}, args.quick)


if __name__ == "__main__":
    main()
