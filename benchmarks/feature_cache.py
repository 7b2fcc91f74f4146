"""--feature-cache on ALIGN-Lite0-MiniLM-384 with both towers locked (the demo's act 2): a training step from the
cache against the same step from images and tokens, and the one-off build against the epochs it serves.

    python benchmarks/feature_cache.py [--samples 64] [--batch-size 16] [--rounds 4] [--threads 2]

One process, CPU. The model is locked as the trainer locks it (--lock-image --lock-image-freeze-bn-stats
--lock-text --lock-text-freeze-layer-norm --deterministic-towers). Per round, back to back: an uncached step
(decode + transform + tokenise a batch, then loop.train_step through both towers) and a cached step (the batch's
features read from the memory-mapped cache, then train_step with the trunks swapped out); the ratio is the median
of per-round ratios (benchmarks/common.py). Build: feature_cache.build_shard over a shard of --samples pairs, per
sample; break-even epochs = build time / time a cached epoch saves. Prints a table and writes
benchmarks/results/feature_cache.json.
"""
import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, machine, median_ratio, write_result  # noqa: E402

from mrl_clip import models  # noqa: E402
from mrl_clip.loss import MatryoshkaClipLoss  # noqa: E402
from mrl_clip.towers import ALIGN_LITE, ALIGN_LITE_DIMS  # noqa: E402
from mrl_clip.train import feature_cache, finetune, locked_towers  # noqa: E402
from mrl_clip.train.loop import train_step  # noqa: E402
from mrl_clip.train.plain_engine import PlainEngine, make_optimizer  # noqa: E402
from mrl_clip.train.stream import sample_inputs, sample_name, tarfile_to_samples_nothrow  # noqa: E402

LOCKS = SimpleNamespace(model=ALIGN_LITE, lock_image=True, lock_image_unlocked_groups=0,
                        lock_image_freeze_bn_stats=True, lock_text=True, lock_text_unlocked_layers=0,
                        lock_text_freeze_layer_norm=True, grad_checkpointing=False)


def small_shard(samples: int) -> str:
    from pipelines import fashion_mnist

    folder = CACHE / f"feature_cache_shard_{samples}"
    if not (folder / "sizes.json").is_file():
        fashion_mnist.build_train_shards(fashion_mnist.DEBIAN_DIR, folder, shard_size=samples, limit=samples)
    return str(folder / "train-0000.tar")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = models.create(ALIGN_LITE, pretrained_image=True)
    finetune.apply(model, LOCKS)
    trunks, _ = locked_towers.fully_locked(model, LOCKS)
    locked_towers.pin_eval(trunks)
    shard = small_shard(args.samples)
    samples = list(tarfile_to_samples_nothrow([{"url": shard}], handler=lambda exn: True))

    lookup, build_s = feature_cache.FeatureLookup(), {}
    with tempfile.TemporaryDirectory() as root:
        for trunk in trunks:
            builder = feature_cache.Builder(trunk, preprocess, tokenizer, args.batch_size, "cpu", nullcontext)
            built, build_s[trunk.tower] = timed(lambda: feature_cache.build_shard(builder, shard))
            folder = Path(root) / trunk.tower
            folder.mkdir()
            feature_cache.write_shard(folder, "s", *built)
            entry, _ = feature_cache.read_shard(folder, "s")
            lookup.shards[trunk.tower] = {shard: entry}
        engine = PlainEngine(model, make_optimizer(model, 1e-4, 0.2, (0.9, 0.98), 1e-6),
                             torch.amp.GradScaler("cpu", enabled=False))
        engine.train()
        loss = MatryoshkaClipLoss(ALIGN_LITE_DIMS)
        batch = samples[:args.batch_size]

        def step(features):
            inputs = [sample_inputs(s, sample_name(s), preprocess, tokenizer, 0, 0, features) for s in batch]
            images, texts = torch.stack([i for i, _ in inputs]), torch.stack([t for _, t in inputs])
            with locked_towers.swapped(model, trunks) if features else nullcontext():
                train_step(engine, loss, [(images, texts)])

        step(None), step(lookup)  # warm-up
        plain, cached = [], []
        for _ in range(args.rounds):
            plain.append(timed(lambda: step(None))[1])
            cached.append(timed(lambda: step(lookup))[1])
    ratio = median_ratio(plain, cached)
    per_sample_build = sum(build_s.values()) / len(samples)
    saved_per_sample = (statistics.median(plain) - statistics.median(cached)) / args.batch_size
    disk = {"image": 4 * 1280, "text": 4 * 384}
    result = {"model": ALIGN_LITE, "batch_size": args.batch_size, "samples_built": len(samples),
              "rounds": args.rounds, "uncached_step_s": statistics.median(plain),
              "cached_step_s": statistics.median(cached), "speedup": ratio,
              "build_s_per_sample": per_sample_build, "build_s_by_tower": build_s,
              "step_s_saved_per_sample": saved_per_sample,
              "break_even_epochs": per_sample_build / saved_per_sample if saved_per_sample > 0 else None,
              "disk_bytes_per_sample": disk, "machine": machine(args.threads)}
    print(f"| {ALIGN_LITE}, batch {args.batch_size}, {args.threads} threads | seconds |\n|---|---|\n"
          f"| uncached step (decode, transform, tokenise, both towers) | {result['uncached_step_s']:.3f} |\n"
          f"| cached step (features from the memory-mapped cache) | {result['cached_step_s']:.3f} |\n"
          f"| speedup (median of per-round ratios) | {ratio:.1f}x |\n"
          f"| build, per sample (both towers, once) | {per_sample_build:.4f} |\n"
          f"| saved per sample per epoch | {saved_per_sample:.4f} |\n"
          f"| break-even (epochs the build must serve) | {result['break_even_epochs']:.2f} |\n"
          f"| disk per sample | {disk['image']} B image + {disk['text']} B text |")
    write_result("feature_cache", result, quick=False)


if __name__ == "__main__":
    main()
