"""WebDataset loader throughput against what the demo's training step consumes.

    python benchmarks/loader.py [--quick] [--rounds 5] [--workers 2] [--threads 2]

The loader is mrl_clip.data's training stream (read shards, decode PNG, open_clip's train transform, tokenize,
batch) over the Fashion-MNIST shards with --workers workers; the step is the demo's (MRL-Tiny-28, batch 128,
Matryoshka loss over 8..256, AdamW, --threads torch threads) on batches of the same shape. Rounds alternate
(loader: drain the batches the workers prefetched meanwhile, then time --batches batches; step: time --steps
steps); the result is the median over rounds of loader samples/s / step samples/s. Writes
benchmarks/results/loader.json.
"""
import argparse
import statistics
import time

import torch
from common import fmnist_shards, machine, median_ratio, write_result

from mrl_clip import models
from mrl_clip.eval.report import default_dims, render_table
from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train.stream import StreamSettings, make_train_stream
from mrl_clip.train.loop import train_step
from mrl_clip.train.plain_engine import PlainEngine, make_optimizer

MODEL = "MRL-Tiny-28"
BATCH = 128


def batches_forever(urls, samples, preprocess, tokenizer, workers):
    settings = StreamSettings(urls, preprocess, tokenizer, BATCH, samples, workers=workers)
    epoch = 1
    while True:
        yield from make_train_stream(settings, epoch).loader
        epoch += 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,048 samples, 1 short round: checks the script runs")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--batches", type=int, default=None, help="loader batches timed per round (default 20)")
    p.add_argument("--steps", type=int, default=None, help="training steps timed per round (default 5)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    n_batches, n_steps = args.batches or (4 if args.quick else 20), args.steps or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    urls, samples = fmnist_shards(args.quick)

    model, preprocess_train, _, tokenizer = models.create(MODEL)
    model.train()
    cfg = models.model_config(MODEL)
    dims = default_dims(cfg["embed_dim"])
    loss_fn = MatryoshkaClipLoss(dims)
    optimizer = make_optimizer(model, lr=1e-3, wd=0.2, betas=(0.9, 0.98), eps=1e-6)
    engine = PlainEngine(model, optimizer, torch.amp.GradScaler(enabled=False))
    stream = batches_forever(urls, samples, preprocess_train, tokenizer, args.workers)
    images, texts, _ = next(stream)  # workers started; the step trains on real batch shapes and values
    prefetched = args.workers * 2    # torch DataLoader's prefetch_factor 2 per worker

    def step():
        train_step(engine, loss_fn, [(images, texts)])

    step()
    machine_at_start = machine(args.threads)  # load average just before the timed rounds
    loader_rate, step_rate = [], []
    for _ in range(rounds):
        for _ in range(prefetched):  # queued while the steps ran: not the loader's speed
            next(stream)
        started = time.perf_counter()
        for _ in range(n_batches):
            next(stream)
        loader_rate.append(n_batches * BATCH / (time.perf_counter() - started))
        started = time.perf_counter()
        for _ in range(n_steps):
            step()
        step_rate.append(n_steps * BATCH / (time.perf_counter() - started))
    ratio = median_ratio(loader_rate, step_rate)
    print(f"{MODEL}, batch {BATCH}, {args.workers} loader workers, {args.threads} torch threads, {rounds} rounds")
    print(render_table(["", "median samples/s"], [
        [f"loader (decode + preprocess + tokenize, {args.workers} workers)", f"{statistics.median(loader_rate):.0f}"],
        [f"training step (dims {dims[0]}..{dims[-1]})", f"{statistics.median(step_rate):.0f}"]]))
    print(f"ratio (loader / step), median of rounds: {ratio:.2f}  (goal >= 3)")
    write_result("loader", {"benchmark": "loader", "model": MODEL, "batch_size": BATCH, "workers": args.workers,
                            "dims": dims, "rounds": rounds, "loader_samples_per_s": loader_rate,
                            "step_samples_per_s": step_rate, "median_ratio": ratio, "goal": ">= 3",
                            "machine": machine_at_start}, args.quick)


if __name__ == "__main__":
    main()
