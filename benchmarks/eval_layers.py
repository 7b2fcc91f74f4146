"""The (layer, dim) grid's encoding cost, and what a shallower tower buys.

    python benchmarks/eval_layers.py [--quick] [--rounds 5] [--threads 1]

Two towers: the ALIGN-Lite0-MiniLM-384 text tower (MiniLM, 6 layers; 256 Fashion-MNIST captions, batch 128) and a
ViT: MRL-Tiny-28's image tower (28 px, 4-px patches: 49 tokens + class, width 128) deepened to 12 blocks (512
Fashion-MNIST test images, batch 256). Inputs are tokenised / decoded before the clock starts, so the times are the
tower's alone (what the eval's data reading adds would only bring the ratios nearer 1). Weights are untrained
(timing does not depend on them). In one process, per round:
(a) grid vs full: mrl_clip.eval.depths.encode_batch reading every exit 1..depth in one pass against the
    ordinary full-depth encode (encode_text / encode_image), back to back, order alternating;
(b) depth: a copy of the tower cut to its first l blocks, encoded the ordinary way (what a deployed shallower
    tower costs), against the full tower, every depth in a rotating order.
Each ratio is the median of per-round ratios (benchmarks/common.py). Writes benchmarks/results/eval_layers.json.
"""
import argparse
import copy
import statistics
import time

import torch
from common import machine, median_ratio, write_result
from tqdm import tqdm

from mrl_clip.eval.depths import encode_batch
from mrl_clip.eval.report import render_table
from mrl_clip.layers import tower_depth
from pipelines import fashion_mnist

VIT_CFG = {"image_size": 28, "layers": 12, "width": 128, "patch_size": 4}
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}


def minilm(count: int) -> dict:
    """The ALIGN-Lite text tower and `count` tokenised captions in batches of 128."""
    from mrl_clip import models
    from mrl_clip.towers import ALIGN_LITE

    model, _, _, tokenizer = models.create(ALIGN_LITE)
    captions = [f"item {i}: " + fashion_mnist.CAPTION_TEMPLATES[i % len(fashion_mnist.CAPTION_TEMPLATES)].format(
        c=fashion_mnist.CLASSNAMES[i % 10]) for i in range(count)]
    batches = [tokenizer(captions[i:i + 128]) for i in range(0, count, 128)]
    return {"name": "MiniLM text tower (ALIGN-Lite0-MiniLM-384)", "model": model.eval(), "tower": "text",
            "batches": batches, "samples": count}


def tiny_vit(count: int) -> dict:
    """MRL-Tiny-28's image tower deepened to 12 blocks and `count` preprocessed test images in batches of 256."""
    import open_clip

    model = open_clip.model.CLIP(embed_dim=256, vision_cfg=VIT_CFG, text_cfg=TEXT_CFG).eval()
    images, _ = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")
    pixels = torch.from_numpy(images[:count]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    batches = list(pixels.split(256))
    return {"name": "ViT, 12 blocks (MRL-Tiny-28's image tower deepened)", "model": model, "tower": "image",
            "batches": batches, "samples": count}


def cut(model, tower: str, layers: int):
    """A copy whose `tower` keeps its first `layers` blocks (a ViT's resblocks, an HF text tower's encoder)."""
    model = copy.deepcopy(model)
    if tower == "image":
        model.visual.transformer.resblocks = model.visual.transformer.resblocks[:layers]
    else:
        model.text.transformer.encoder.layer = model.text.transformer.encoder.layer[:layers]
        model.text.transformer.config.num_hidden_layers = layers
    return model


@torch.no_grad()
def seconds(model, tower, batches, layers=None) -> float:
    started = time.perf_counter()
    for batch in batches:
        encode_batch(model, tower, batch, layers)
    return time.perf_counter() - started


def measure(case: dict, rounds: int) -> dict:
    """(a) and (b) for one tower, interleaved in `rounds` rounds."""
    model, tower, batches = case["model"], case["tower"], case["batches"]
    depth = tower_depth(model, tower)
    all_exits = list(range(1, depth + 1))
    shallower = {l: cut(model, tower, l) for l in all_exits[:-1]}
    seconds(model, tower, batches)  # warm-up: allocator, lazy inits
    grid, full, per_depth = [], [], {l: [] for l in all_exits}
    for round_ in tqdm(range(rounds), desc=case["tower"] + " rounds", leave=False):
        pair = [("grid", all_exits), ("full", None)]
        for name, layers in pair if round_ % 2 == 0 else pair[::-1]:
            (grid if name == "grid" else full).append(seconds(model, tower, batches, layers))
        order = all_exits[round_ % depth:] + all_exits[:round_ % depth]
        for l in order:
            per_depth[l].append(seconds(shallower.get(l, model), tower, batches))
    return {"tower": case["name"], "samples": case["samples"], "depth": depth,
            "grid_vs_full": {"exits": all_exits, "median_s": {"grid": statistics.median(grid),
                                                              "full": statistics.median(full)},
                             "seconds": {"grid": grid, "full": full}, "median_ratio": median_ratio(grid, full)},
            "depth_vs_full": {str(l): {"median_s": statistics.median(per_depth[l]),
                                       "median_ratio": median_ratio(per_depth[l], per_depth[depth]),
                                       "seconds": per_depth[l]} for l in all_exits}}


def print_tables(results: list, rounds: int, threads: int) -> None:
    print(f"(a) encoding every exit 1..depth in one pass vs full depth only ({threads} threads, {rounds} rounds)")
    print(render_table(["tower", "samples", "grid s", "full s", "ratio"], [
        [r["tower"], str(r["samples"]), f"{r['grid_vs_full']['median_s']['grid']:.3f}",
         f"{r['grid_vs_full']['median_s']['full']:.3f}", f"{r['grid_vs_full']['median_ratio']:.3f}"]
        for r in results]))
    for r in results:
        print(f"\n(b) {r['tower']}: encode time of the first l blocks vs all {r['depth']}")
        print(render_table(["layers", "median s", "ratio to full"], [
            [l, f"{v['median_s']:.3f}", f"{v['median_ratio']:.3f}"] for l, v in r["depth_vs_full"].items()]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 texts and images, 1 round: checks the script runs")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the 2 cores are shared, and one thread per process is steadier)")
    args = p.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    cases = [minilm(64 if args.quick else 256), tiny_vit(64 if args.quick else 512)]
    machine_at_start = machine(args.threads)
    results = [measure(case, rounds) for case in cases]
    print_tables(results, rounds, args.threads)
    write_result("eval_layers", {"benchmark": "eval_layers", "rounds": rounds, "results": results,
                                 "machine": machine_at_start}, args.quick)


if __name__ == "__main__":
    main()
