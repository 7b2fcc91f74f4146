"""Evaluation at every nested dimension.

    python -m mrl_clip.eval zeroshot --model MRL-Tiny-28 --pretrained runs/mrl/checkpoints/step_400.pt \
        --data runs/demo/data/fashion_mnist_test --dims 8,16,32,64,128,256 --output results.json

Every image and prompt is encoded once at full width; each dim is a slice of those features, re-normalised.
"""
import argparse
import sys

import torch

from . import models
from .dims import check_dims, parse_int_list
from .errors import ArgumentParser, run_cli
from .report import default_dims, format_table, plot_metric, write_json
from .zeroshot import evaluate_zeroshot, load_classification_folder

ZEROSHOT_METRICS = ["acc1", "acc5", "mean_per_class_recall"]


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m mrl_clip.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    zs = tasks.add_parser("zeroshot", help="zero-shot classification accuracy at each dim")
    zs.add_argument("--model", required=True, help="open_clip model name or local-dir:PATH")
    zs.add_argument("--pretrained", default=None, help="checkpoint file (not needed with local-dir:)")
    zs.add_argument("--data", required=True, help="folder in CLIP_benchmark's wds layout")
    zs.add_argument("--split", default="test")
    zs.add_argument("--dims", default=None, help="comma-separated dims (default: 8, 16, ... up to the width)")
    zs.add_argument("--output", default=None, help="write results JSON here")
    zs.add_argument("--plot", default=None, help="write a PNG of acc1 against dim here")
    zs.add_argument("--batch-size", type=int, default=256)
    zs.add_argument("--workers", type=int, default=0)
    zs.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def run_zeroshot(model_name, pretrained, data, dims=None, split="test", device="cpu", batch_size=256, workers=0):
    """{"dims": [...], "metrics": {"<dim>": {...}}} for one model."""
    width = models.embed_width(model_name)
    dims = check_dims(dims, width) if dims else default_dims(width)
    model, _, preprocess, tokenizer = models.create(model_name, pretrained, device=device)
    dataset = load_classification_folder(data, preprocess, split)
    metrics = evaluate_zeroshot(model, tokenizer, dataset, dims, device, batch_size, workers)
    return {"dims": dims, "metrics": {str(m): v for m, v in metrics.items()}}


def main(argv=None):
    args = parse_args(argv)
    dims = parse_int_list(args.dims, "--dims") if args.dims else None
    result = run_zeroshot(args.model, args.pretrained, args.data, dims, args.split, args.device,
                          args.batch_size, args.workers)
    label = args.model if not args.pretrained else f"{args.model} ({args.pretrained})"
    print(format_table({label: result}, ZEROSHOT_METRICS))
    if args.output:
        write_json({"task": "zeroshot", "model": args.model, "pretrained": args.pretrained, "data": args.data,
                    "split": args.split, **result}, args.output)
    if args.plot:
        plot_metric({args.model: result}, "acc1", args.plot, title="zero-shot top-1 vs dim")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
