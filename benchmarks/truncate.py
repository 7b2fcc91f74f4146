"""Size on disk and encode time of a truncated export (`python -m mrl_clip truncate`) against its full model.

    python benchmarks/truncate.py [--quick] [--rounds 5] [--batch 16] [--threads 2]

Three cuts, each source exported as training exports it and cut by mrl_clip.truncate, both folders then loaded by
plain open_clip (`create_model_and_transforms("local-dir:...")`):
- ALIGN-Lite0-MiniLM-384 (pretrained towers from the Hugging Face cache) at --dim 48: its timm image tower and HF
  text tower are cut in dim only (docs/truncate.md says why), so this is what a dim cut alone buys;
- MRL-Tiny-28 at --dim 32 --image-layers 1 --text-layers 1 (of 2);
- ViT-B-32-768 at --dim 128 --image-layers 6 --text-layers 6 (of 12), untrained weights (size and time do not
  depend on them).
Per cut: the folder's bytes, and encode_image / encode_text of one batch (random pixels through the model's own
preprocessing; captions), full and cut interleaved (A B, B A, ...), the median of per-round time ratios. Writes
benchmarks/results/truncate.json.
"""
import argparse
import statistics
import time

import numpy as np
import torch
from common import CACHE, machine, median_ratio, write_result

CAPTIONS = ["a photo of a sandal", "an ankle boot on a white background", "a red pullover", "a pair of trousers"]
CUTS = [("ALIGN-Lite0-MiniLM-384", {"dim": 48}),
        ("MRL-Tiny-28", {"dim": 32, "image_layers": 1, "text_layers": 1}),
        ("ViT-B-32-768", {"dim": 128, "image_layers": 6, "text_layers": 6})]


def source_export(name: str, folder):
    """`name` exported once under runs/bench/truncate/ (ALIGN with its pretrained towers, the others untrained),
    with the nesting record of a run trained at halvings of the width (ALIGN: its --dims 12..384)."""
    from mrl_clip import models
    from mrl_clip.checkpoint import export_local_dir, nesting_record
    from mrl_clip.eval.report import default_dims
    from mrl_clip.towers import ALIGN_LITE, ALIGN_LITE_DIMS

    if not (folder / "open_clip_config.json").is_file():
        torch.manual_seed(0)
        model = models.create(name)[0].eval()
        dims = ALIGN_LITE_DIMS if name == ALIGN_LITE else default_dims(models.embed_width(name))
        export_local_dir(model, models.model_config(name), folder, nesting_record(dims))
    return folder


def encoders(folder, batch: int):
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 96, 128, 3), dtype=np.uint8)
    images = torch.stack([preprocess(Image.fromarray(a)) for a in pixels])
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")((CAPTIONS * batch)[:batch])
    return {"image": lambda: model.encode_image(images), "text": lambda: model.encode_text(tokens)}


def timed(fn) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - started


def main():
    from mrl_clip.eval.report import render_table
    from mrl_clip.truncate import folder_bytes, truncate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MRL-Tiny-28 only, 1 round: checks the script runs")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--batch", type=int, default=16, help="images and captions encoded per call")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    cuts = [c for c in CUTS if c[0] == "MRL-Tiny-28"] if args.quick else CUTS
    machine_at_start = machine(args.threads)
    results, table = [], []
    for name, cut in cuts:
        source = source_export(name, CACHE / "truncate" / name)
        flags = "_".join(f"{k}{v}" for k, v in cut.items())
        out = CACHE / "truncate" / f"{name}-{flags}"
        if not (out / "open_clip_config.json").is_file():
            truncate(f"local-dir:{source}", out, **cut)
        full, small = encoders(source, args.batch), encoders(out, args.batch)
        seconds = {side: {"full": [], "cut": []} for side in ("image", "text")}
        for side in seconds:
            timed(full[side]), timed(small[side])  # warm-up
            for round_ in range(rounds):
                order = [("full", full), ("cut", small)]
                for which, enc in (order if round_ % 2 == 0 else order[::-1]):
                    seconds[side][which].append(timed(enc[side]))
        sizes = {"full": folder_bytes(source), "cut": folder_bytes(out)}
        ratios = {side: median_ratio(s["cut"], s["full"]) for side, s in seconds.items()}
        results.append({"model": name, "cut": cut, "bytes": sizes, "size_ratio": sizes["cut"] / sizes["full"],
                        "seconds": seconds, "median_ms_per_item": {
                            side: {k: 1000 * statistics.median(v) / args.batch for k, v in s.items()}
                            for side, s in seconds.items()}, "time_ratio": ratios})
        flags_text = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cut.items())
        r = results[-1]["median_ms_per_item"]
        table.append([f"{name} {flags_text}", f"{sizes['full'] / 1e6:.1f} -> {sizes['cut'] / 1e6:.1f}",
                      f"{sizes['cut'] / sizes['full']:.3f}",
                      f"{r['image']['full']:.2f} -> {r['image']['cut']:.2f}", f"{ratios['image']:.3f}",
                      f"{r['text']['full']:.2f} -> {r['text']['cut']:.2f}", f"{ratios['text']:.3f}"])
    print(f"batch {args.batch}, {args.threads} threads, {rounds} interleaved rounds; ratios are cut / full")
    print(render_table(["cut", "MB on disk", "size ratio", "image ms/item", "image time ratio", "text ms/item",
                        "text time ratio"], table))
    write_result("truncate", {"benchmark": "truncate", "batch": args.batch, "rounds": rounds, "cuts": results,
                              "machine": machine_at_start}, args.quick)


if __name__ == "__main__":
    main()
