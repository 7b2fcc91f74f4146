"""Zero-shot evaluation at every nested dim against the same evaluation at one dim.

    python benchmarks/eval_dims.py [--quick] [--images 2000] [--repeats 5] [--threads 2]

MRL-Tiny-28-P7-768 (768-d, so the default dims are the eight 8, 16, ..., 768) through `mrl_clip.eval.zeroshot`'s
run_zeroshot — model creation, reading the CLIP_benchmark folder, encoding images and prompts, the metrics — with
all eight dims and with the full width only, interleaved (A B, B A, ...); the result is the median of per-round
time ratios. It also times the metrics alone on encoded features, the only part that grows with the dims.
Weights are untrained (timing does not depend on them). Writes benchmarks/results/eval_dims.json.
"""
import argparse
import statistics
import time

import torch
from common import CACHE, machine, median_ratio, write_result

from mrl_clip.eval.report import default_dims, render_table
from mrl_clip.eval.zeroshot import run_zeroshot
from mrl_clip.models import embed_width
from pipelines import fashion_mnist

MODEL = "MRL-Tiny-28-P7-768"


def metrics_only_seconds(folder, runs) -> dict:
    """The part that grows with the number of dims: metrics from already encoded features (median of 5)."""
    from mrl_clip import models
    from mrl_clip.eval.zeroshot import (
        encode_class_prompts,
        encode_images,
        load_classification_folder,
        zeroshot_metrics,
    )

    model, _, preprocess, tokenizer = models.create(MODEL)
    model.eval()
    data = load_classification_folder(str(folder), preprocess)
    features, labels = encode_images(model, data.dataset)
    prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates)
    out = {}
    for name, dims in runs.items():
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            zeroshot_metrics(features, labels, prompts, dims)
            seconds.append(time.perf_counter() - started)
        out[name] = statistics.median(seconds)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 images, 1 round: checks the script runs")
    p.add_argument("--images", type=int, default=None, help="test images evaluated (default 2,000)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 8)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    images = args.images or (200 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 8)
    torch.set_num_threads(args.threads)
    folder = CACHE / f"eval_dims_{images}"
    if not (folder / "test" / "nshards.txt").is_file():
        fashion_mnist.build_eval_folder(fashion_mnist.DEBIAN_DIR, folder, limit=images)

    width = embed_width(MODEL)
    runs = {"all": default_dims(width), "one": [width]}
    run_zeroshot(MODEL, None, str(folder), runs["one"])  # warm-up: first reads, allocator, lazy imports
    machine_at_start = machine(args.threads)  # load average just before the timed rounds
    times = {name: [] for name in runs}
    for round_ in range(repeats):
        order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]  # A B, B A, ...: order effects cancel
        for name in order:
            started = time.perf_counter()
            run_zeroshot(MODEL, None, str(folder), runs[name])
            times[name].append(time.perf_counter() - started)
    ratio = median_ratio(times["all"], times["one"])
    metrics_s = metrics_only_seconds(folder, runs)
    table = [[f"{len(dims)} dims ({','.join(map(str, dims))})", f"{statistics.median(times[name]):.2f}"]
             for name, dims in runs.items()]
    print(f"{MODEL}, {images} Fashion-MNIST test images, {args.threads} threads, {repeats} interleaved rounds")
    print(render_table(["zero-shot evaluation", "median s"], table))
    print(f"ratio (8 dims / 1 dim), median of rounds: {ratio:.3f}  (goal <= 1.1); the metrics alone, from encoded "
          f"features: {1000 * metrics_s['all']:.1f} ms for 8 dims, {1000 * metrics_s['one']:.1f} ms for 1")
    write_result("eval_dims", {"benchmark": "eval_dims", "model": MODEL, "images": images, "repeats": repeats,
                               "dims": runs, "median_s": {k: statistics.median(v) for k, v in times.items()},
                               "seconds": times, "median_ratio": ratio,
                               "metrics_only_median_s": metrics_s, "goal": "<= 1.1",
                               "machine": machine_at_start}, args.quick)


if __name__ == "__main__":
    main()
