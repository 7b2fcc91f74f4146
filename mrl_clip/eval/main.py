"""Evaluation at every nested dimension: zero-shot, retrieval, linear probes through MRL heads, cascades, k-NN and
few-shot classification.

    python -m mrl_clip.eval zeroshot --model MRL-Tiny-28 --pretrained runs/demo/mrl/checkpoints/step_400.pt \
        --data runs/demo/data/fashion_mnist_test --dims 8,16,32,64,128,256 --output results.json --plot acc.png \
        --compare local-dir:runs/demo/standard/export

Every image and text is encoded once at full width; each dim is a slice of those features, re-normalised.
`--data` is a folder in CLIP_benchmark's WebDataset layout. Output: a table (dims as rows, a column block per
model), JSON {"task", "models": {label: {"dims", "metrics": {"<dim>": {...}}}}} and a plot of each metric.

zeroshot and retrieval take --embedding-precision float32,float16,int8,binary: each precision other than float32
adds the same metrics at every dim with the stored side quantised (mrl_clip.quantize: the images for zero-shot,
the searched side for retrieval; int8 calibrated on that side, scored float query . decoded vector; binary as
sign bits and Hamming distance), in the JSON as "quantized": {"int8": {"<dim>": {..., "bytes_per_vector"}}}
beside "metrics", a table per precision, and a second plot (PLOT_precision.png) against bytes per vector.
"""
import argparse
from pathlib import Path

import torch

from .. import models, nesting
from ..dims import parse_int_list
from ..errors import ArgumentParser, UserError
from ..layers import FLAGS, check_layers
from . import cascade, fewshot, knn, named, probe, zeroshot, zeroshot_retrieval
from ..search.index import parse_funnel
from .depths import requested_layers
from .report import dims_for

# task -> (one line of help, add_flags(subparser): its own flags, run_task(args, entries, requested dims))
TASKS = {
    "zeroshot": ("zero-shot classification accuracy at each dim", zeroshot.add_flags, zeroshot.run_task),
    "retrieval": ("image-text retrieval recall@K at each dim", zeroshot_retrieval.add_flags,
                  zeroshot_retrieval.run_task),
    "linear-probe": ("linear probes through MRL / MRL-E heads and per-dim baselines", probe.add_flags,
                     probe.run_task),
    "cascade": ("adaptive classification: smallest confident dim answers", cascade.add_flags, cascade.run_task),
    "knn": ("k-nearest-neighbour top-1 with the train split as the database", knn.add_flags, knn.run_task),
    "fewshot": ("n-shot and long-tailed classification (nearest class mean, probe)", fewshot.add_flags,
                fewshot.run_task),
}


def add_common(sub, named_sets=False):
    sub.add_argument("--model", required=True, help="open_clip model name or local-dir:PATH")
    sub.add_argument("--pretrained", default=None, help="checkpoint file (not needed with local-dir:)")
    sub.add_argument("--compare", action="append", default=[], metavar="MODEL",
                     help="another model to evaluate side by side (repeatable)")
    sub.add_argument("--compare-pretrained", action="append", default=[], metavar="CKPT",
                     help="checkpoint of the matching --compare model ('none' for local-dir:)")
    sub.add_argument("--data", required=not named_sets, help="folder in CLIP_benchmark's wds layout")
    sub.add_argument("--split", default="test")
    sub.add_argument("--dims", default=None, help="comma-separated dims (default: 8, 16, ... up to the width)")
    sub.add_argument("--output", default=None, help="write results JSON here")
    sub.add_argument("--plot", default=None, help="write a PNG of each metric against dim here")
    sub.add_argument("--adaptor", default=None, help="a Matryoshka adaptor file (python -m mrl_clip adapt) every "
                     "model's embeddings go through before each dim is sliced")
    sub.add_argument("--batch-size", type=int, default=256)
    sub.add_argument("--workers", type=int, default=0)
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m mrl_clip.eval", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    for name, (help_text, add_flags, _) in TASKS.items():
        sub = tasks.add_parser(name, help=help_text)
        add_common(sub, named_sets=name in named.TASKS)
        add_flags(sub)
        if name in named.TASKS:
            named.add_flags(sub)
    args = parser.parse_args(argv)
    if len(args.compare_pretrained) not in (0, len(args.compare)):
        raise UserError("give --compare-pretrained once for each --compare, or not at all")
    if args.task in named.TASKS:
        named.check_flags(args)
    return args


def short_labels(names: list) -> list:
    """The shortest path suffixes that tell the models apart ('mrl/export' rather than a long local-dir path)."""
    parts = [(models.local_dir(n) or Path(n)).parts or (n,) for n in names]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{n} #{i + 1}" for i, n in enumerate(names)]


def model_list(args) -> list:
    """[(label, name, pretrained)] for --model and each --compare."""
    pretrained = args.compare_pretrained or [None] * len(args.compare)
    entries = [(args.model, args.pretrained)] + [
        (name, None if ckpt in (None, "none") else ckpt) for name, ckpt in zip(args.compare, pretrained)]
    labels = short_labels([ckpt or name for name, ckpt in entries])
    return [(label, name, ckpt) for label, (name, ckpt) in zip(labels, entries)]


def warn_untrained(args, entries, requested) -> None:
    """One warning line per model asked for dims (--dims, or the default ladder) or depths (--image-layers,
    --text-layers) it was not trained to nest (mrl_clip.nesting); the evaluation runs as asked."""
    layers = requested_layers(args)
    said = set()
    for _, name, ckpt in entries:
        cfg = models.model_config(name)
        depths = {}
        for tower, asked in layers.items():
            full = nesting.config_depth(cfg, tower) if asked else None
            if full:  # a tower without layers: the task refuses its flag in one line
                depths[tower] = (check_layers(asked, full, FLAGS[tower], must_end_at_depth=False), full)
        who = name + (f" --pretrained {ckpt}" if ckpt else "")
        nesting.warn(who, nesting.of_model(name, ckpt, args.adaptor), int(cfg["embed_dim"]),
                     dims_for(name, requested), depths, said)


def check_funnel(args, entries) -> None:
    if getattr(args, "funnel", None):
        k = max(parse_int_list(args.recall_k, "--recall-k"))
        for _, name, _ in entries:
            parse_funnel(args.funnel, models.embed_width(name), k)


def main(argv=None):
    args = parse_args(argv)
    requested = parse_int_list(args.dims, "--dims") if args.dims else None
    _, _, run_task = TASKS[args.task]
    if getattr(args, "dataset", None):
        run_task = named.run_task
    entries = model_list(args)
    check_funnel(args, entries)  # a bad --funnel is the one line, before any warning
    warn_untrained(args, entries, requested)
    return run_task(args, entries, requested)
