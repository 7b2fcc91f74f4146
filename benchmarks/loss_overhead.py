"""Cost of the Matryoshka loss in a whole training step, against open_clip's ClipLoss at full width.

    python benchmarks/loss_overhead.py [--quick] [--model MRL-Tiny-28] [--batch-size 128] [--repeats 40] [--device cpu]

Same model, batch, optimizer and threads; the two steps are interleaved (A B A B ...) so drift in machine load hits
both alike; the result is the median of the per-pair time ratios. Prints a table and writes
benchmarks/results/loss_overhead[_<device>].json.
"""
import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402
from open_clip_train.precision import get_autocast  # noqa: E402

from mrl_clip import models  # noqa: E402
from mrl_clip.eval.report import default_dims  # noqa: E402
from mrl_clip.loss import MatryoshkaClipLoss  # noqa: E402
from mrl_clip.train.loop import train_step  # noqa: E402
from mrl_clip.train.plain_engine import PlainEngine  # noqa: E402


class OpenClipLoss(torch.nn.Module):
    """open_clip's loss behind our loss's interface: normalised features in, (total, {dim: loss}) out."""

    def __init__(self, width):
        super().__init__()
        self.width, self.loss = width, ClipLoss()

    def forward(self, image_features, text_features, logit_scale):
        loss = self.loss(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logit_scale)
        return loss, {self.width: loss.detach()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="MRL-Tiny-28")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="3 pairs: checks the script runs")
    p.add_argument("--repeats", type=int, default=None, help="interleaved pairs (default 40)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="amp_bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile-loss", action="store_true", help="torch.compile both losses")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 40)
    if args.quick:
        args.warmup = 1
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _, _, _ = models.create(args.model, device=args.device)
    cfg = models.model_config(args.model)
    width, size = cfg["embed_dim"], cfg["vision_cfg"]["image_size"]
    context = cfg["text_cfg"].get("context_length", 77)
    dims = default_dims(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine = PlainEngine(model, optimizer, torch.amp.GradScaler(enabled=False))
    autocast = get_autocast(args.precision, device_type=torch.device(args.device).type)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, size, size, generator=g).to(args.device)
    texts = torch.randint(0, cfg["text_cfg"]["vocab_size"], (args.batch_size, context), generator=g).to(args.device)
    losses = {"open_clip ClipLoss": OpenClipLoss(width), f"Matryoshka {len(dims)} dims": MatryoshkaClipLoss(dims)}
    if args.compile_loss:
        losses = {name: torch.compile(loss) for name, loss in losses.items()}

    def timed(loss_fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(engine, loss_fn, [(images, texts)], autocast or nullcontext)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for loss_fn in losses.values():
            timed(loss_fn)
    machine_at_start = machine()  # load average just before the timed pairs
    times = {name: [] for name in losses}
    for _ in range(args.repeats):
        for name, loss_fn in losses.items():
            times[name].append(timed(loss_fn))
    base, ours = times.values()
    ratios = [b / a for a, b in zip(base, ours)]
    result = {"benchmark": "loss_overhead", "model": args.model, "compiled_loss": args.compile_loss,
              "batch_size": args.batch_size, "dims": dims,
              "device": args.device, "precision": args.precision, "repeats": args.repeats,
              "median_step_s": {name: statistics.median(t) for name, t in times.items()},
              "median_ratio": statistics.median(ratios), "goal": "<= 1.03", "machine": machine_at_start}
    print(f"{args.model}, batch {args.batch_size}, {args.device} {args.precision}, {args.repeats} interleaved pairs"
          + (", losses compiled" if args.compile_loss else ""))
    for name, t in times.items():
        print(f"  {name:<24} median step {1000 * statistics.median(t):8.1f} ms")
    print(f"  ratio (Matryoshka / open_clip), median of pairs: {result['median_ratio']:.3f}  (goal <= 1.03)")
    name = f"loss_overhead_{args.device.split(':')[0]}" + ("_compiled" if args.compile_loss else "")
    write_result(name, result, args.quick, path=args.out)


if __name__ == "__main__":
    main()
