"""Evaluation at every nested dimension: zero-shot, retrieval, linear probes through MRL heads, cascades.

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

from .. import models, quantize
from ..dims import check_dims, parse_int_list
from ..errors import ArgumentParser, UserError
from ..files import write_json
from .report import (
    default_dims,
    format_quantized_tables,
    format_table,
    plot_metrics,
    plot_precisions,
    precision_plot_path,
    render_table,
)

ZEROSHOT_METRICS = ["acc1", "acc5", "mean_per_class_recall"]
PROBE_METRICS = ["lp_acc1", "lp_acc5"]
PROBE_KINDS = ["mrl", "mrl-e", "fixed"]


def add_common(sub):
    sub.add_argument("--model", required=True, help="open_clip model name or local-dir:PATH")
    sub.add_argument("--pretrained", default=None, help="checkpoint file (not needed with local-dir:)")
    sub.add_argument("--compare", action="append", default=[], metavar="MODEL",
                     help="another model to evaluate side by side (repeatable)")
    sub.add_argument("--compare-pretrained", action="append", default=[], metavar="CKPT",
                     help="checkpoint of the matching --compare model ('none' for local-dir:)")
    sub.add_argument("--data", required=True, help="folder in CLIP_benchmark's wds layout")
    sub.add_argument("--split", default="test")
    sub.add_argument("--dims", default=None, help="comma-separated dims (default: 8, 16, ... up to the width)")
    sub.add_argument("--output", default=None, help="write results JSON here")
    sub.add_argument("--plot", default=None, help="write a PNG of each metric against dim here")
    sub.add_argument("--batch-size", type=int, default=256)
    sub.add_argument("--workers", type=int, default=0)
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m mrl_clip.eval", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification accuracy at each dim")
    retrieval = tasks.add_parser("retrieval", help="image-text retrieval recall@K at each dim")
    for sub in (zeroshot, retrieval):
        add_common(sub)
        sub.add_argument("--embedding-precision", default="float32", metavar="P,...",
                         help="also score each dim with the stored side at these precisions: any of "
                              f"{', '.join(quantize.PRECISIONS)} (see mrl_clip.quantize)")
    retrieval.add_argument("--recall-k", default="1,5,10")
    retrieval.add_argument("--funnel", default=None, metavar="DIM:K,...",
                           help="also search through a funnel, e.g. 32:400,768:10 (stage 1 finds K candidates at "
                                "DIM, later stages re-rank them at larger dims), against exact full-width search; "
                                "a stage may name a precision: binary@256:2000,768:10")
    retrieval.add_argument("--stage1", default=None, metavar="SPEC",
                           help="search the funnel's stage 1 through an index structure built as mrl_clip.index "
                                "build builds it (e.g. hnsw32@32, hnsw32-binary@256; its dim and precision must be "
                                "the funnel's first stage's; HNSW efSearch = the stage's K)")
    for name, help_text in (("linear-probe", "linear probes through MRL / MRL-E heads and per-dim baselines"),
                            ("cascade", "adaptive classification: smallest confident dim answers")):
        sub = tasks.add_parser(name, help=help_text)
        add_common(sub)
        sub.add_argument("--train-split", default="train", help="split the probes are trained on")
        sub.add_argument("--cache-dir", default=None, help="feature cache (default: DATA/.mrl_clip_cache)")
        if name == "linear-probe":
            sub.add_argument("--probes", default=",".join(PROBE_KINDS), help="any of mrl, mrl-e, fixed")
            sub.add_argument("--heads-dir", default=None,
                             help="where trained heads are saved (default: beside the checkpoint)")
        else:
            sub.add_argument("--source", choices=["zeroshot", "mrl", "mrl-e"], default="zeroshot",
                             help="zero-shot logits, or an MRL / MRL-E probe's")
    args = parser.parse_args(argv)
    if args.task in ("zeroshot", "retrieval"):
        args.precisions = [p for p in quantize.parse_precisions(args.embedding_precision) if p != "float32"]
    if len(args.compare_pretrained) not in (0, len(args.compare)):
        raise UserError("give --compare-pretrained once for each --compare, or not at all")
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


def dims_for(name: str, requested) -> list:
    width = models.embed_width(name)
    return check_dims(requested, width) if requested else default_dims(width)


def by_dim(metrics: dict) -> dict:
    return {str(m): v for m, v in metrics.items()}


def run_zeroshot(model_name, pretrained, data, dims=None, split="test", device="cpu", batch_size=256, workers=0,
                 precisions=()):
    """{"dims": [...], "metrics": {"<dim>": {...}}} for one model, and with precisions other than float32
    "quantized": {precision: {"<dim>": {...metrics, "bytes_per_vector"}}}."""
    from .zeroshot import (
        encode_classification,
        load_classification_folder,
        quantized_zeroshot_metrics,
        zeroshot_metrics,
    )

    dims = dims_for(model_name, dims)
    model, _, preprocess, tokenizer = models.create(model_name, pretrained, device=device)
    dataset = load_classification_folder(data, preprocess, split)
    features = encode_classification(model, tokenizer, dataset, dims, device, batch_size, workers)
    result = {"dims": dims, "metrics": by_dim(zeroshot_metrics(*features, dims))}
    if precisions:
        result["quantized"] = {p: by_dim(quantized_zeroshot_metrics(*features, dims, p)) for p in precisions}
    return result


def run_retrieval(model_name, pretrained, data, dims=None, split="test", device="cpu", batch_size=256,
                  recall_k=(1, 5, 10), funnel=None, precisions=(), stage1=None):
    """{"dims", "metrics"}; with a funnel spec, "funnel": the same recall@K through funnel search and exact
    full-width search, with ms per query of each; with precisions other than float32, "quantized" as zero-shot's."""
    from ..search.index import format_funnel, parse_funnel
    from ..search.store import parse_stage1
    from .zeroshot_retrieval import (
        encode_pairs,
        funnel_retrieval_metrics,
        load_retrieval_folder,
        quantized_retrieval_metrics,
        retrieval_metrics,
    )

    dims = dims_for(model_name, dims)
    stages = parse_funnel(funnel, models.embed_width(model_name), max(recall_k)) if funnel else None
    spec = parse_stage1(stage1, models.embed_width(model_name)) if stage1 else None
    if spec and not stages:
        raise UserError("--stage1 needs --funnel")
    if spec and (spec.dim, spec.precision) != (stages[0].dim, stages[0].precision):
        raise UserError(f"--stage1 {stage1} is not the funnel's first stage ({format_funnel(stages[:1])})")
    model, _, preprocess, tokenizer = models.create(model_name, pretrained, device=device)
    model.eval()
    images, texts, index = encode_pairs(model, tokenizer, load_retrieval_folder(data, preprocess, split), device,
                                        batch_size)
    metrics = retrieval_metrics(images, texts, index, dims, recall_k)
    result = {"dims": dims, "metrics": by_dim(metrics)}
    if precisions:
        result["quantized"] = {p: by_dim(quantized_retrieval_metrics(images, texts, index, dims, p, recall_k))
                               for p in precisions}
    if stages:
        result["funnel"] = {"stages": format_funnel(stages), "stage1": spec.label() if spec else "flat",
                            **funnel_retrieval_metrics(images, texts, index, stages, recall_k, spec)}
    return result


def format_funnel_table(label, funnel, metric_names) -> str:
    """Exact full-width search and the funnel side by side: recall@K (%) and ms per query each way."""
    rows = []
    for kind, name in (("exact", "exact (full width)"), ("funnel", f"funnel {funnel['stages']}")):
        entry = funnel[kind]
        rows.append([name] + [f"{100 * entry['metrics'][m]:.2f}" for m in metric_names]
                    + [f"{entry['ms_per_query'][side]:.3f}" for side in ("image_retrieval", "text_retrieval")])
    header = ["search"] + metric_names + ["image ms/query", "text ms/query"]
    return f"{label}: faiss search\n" + render_table(header, rows)


def load_with_features(args, name, pretrained, splits):
    """The model, its preprocess and tokenizer, and {split: (full-width image features, labels)} through the
    feature cache (key: model, checkpoint identity, data folder, split; never the dims)."""
    from .probe import cached_features, checkpoint_identity
    from .zeroshot import encode_images, load_classification_folder

    model, _, preprocess, tokenizer = models.create(name, pretrained, device=args.device)
    model.eval()
    cache = args.cache_dir or str(Path(args.data) / ".mrl_clip_cache")
    features = {}
    for split in splits:
        key = {"model": name, "checkpoint": checkpoint_identity(pretrained or name),
               "dataset": str(Path(args.data).resolve()), "split": split}
        features[split] = cached_features(cache, key, lambda: encode_images(
            model, load_classification_folder(args.data, preprocess, split, need_prompts=False).dataset,
            args.device, args.batch_size, args.workers, desc=f"{split} images"))
    return model, preprocess, tokenizer, features


def standardized_probe_data(args, name, pretrained):
    """Train and test features, z-scored with the train statistics, and the class count."""
    from .probe import feature_stats, standardize

    _, _, _, features = load_with_features(args, name, pretrained, [args.train_split, args.split])
    (train_x, train_y), (test_x, test_y) = features[args.train_split], features[args.split]
    mean, std = feature_stats(train_x)
    train_x, test_x = standardize(train_x, test_x)
    return train_x, train_y, test_x, test_y, int(max(train_y.max(), test_y.max())) + 1, {"mean": mean, "std": std}


def heads_path(args, name, pretrained, kind) -> Path:
    if args.heads_dir:
        folder = Path(args.heads_dir)
    elif pretrained:
        folder = Path(pretrained).parent / f"{Path(pretrained).stem}.heads"
    elif models.local_dir(name) is not None:
        folder = models.local_dir(name) / "heads"
    else:
        folder = Path("heads") / name
    return folder / f"{kind}.safetensors"


def run_linear_probe(args, name, pretrained, dims, kinds):
    """{kind: {"dims", "metrics", "probe"}}: heads trained on --train-split, measured on --split, saved beside
    the checkpoint (never inside open_clip's state_dict)."""
    from ..heads import save_heads
    from .probe import probe_metrics, select_and_train

    train_x, train_y, test_x, test_y, num_classes, stats = standardized_probe_data(args, name, pretrained)
    results = {}
    for kind in kinds:
        heads, info = select_and_train(train_x, train_y, dims, num_classes, kind)
        path = heads_path(args, name, pretrained, kind)
        # the heads expect features z-scored with these train statistics
        save_heads(path, heads, {"model": name, "pretrained": pretrained, "kind": kind,
                                 "chosen": info["chosen"], "feature_mean": stats["mean"],
                                 "feature_std": stats["std"]})
        metrics = probe_metrics(heads, test_x, test_y, dims)
        results[kind] = {"dims": dims, "metrics": {str(m): v for m, v in metrics.items()},
                         "probe": {"chosen": info["chosen"], "val_acc1": {str(m): v for m, v in
                                                                          info["val_acc1"].items()},
                                   "heads": str(path)}}
    return results


def run_cascade(args, name, pretrained, dims):
    """Softmax probabilities per dim on a held-out split and on --split, through evaluate_cascade."""
    from .cascade import evaluate_cascade

    if args.source == "zeroshot":
        from .zeroshot import (
            encode_class_prompts,
            load_classification_folder,
            zeroshot_logits,
        )

        model, preprocess, tokenizer, features = load_with_features(args, name, pretrained, [args.split])
        x, y = features[args.split]
        data = load_classification_folder(args.data, preprocess, args.split)
        prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates, args.device)
        probs = {m: zeroshot_logits(x, prompts, m).softmax(dim=1) for m in dims}
        # thresholds are chosen on half of the split (a fixed permutation), reported on the other half
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        held, test = order[: len(y) // 2], order[len(y) // 2:]
        return evaluate_cascade({m: p[held] for m, p in probs.items()}, y[held],
                                {m: p[test] for m, p in probs.items()}, y[test], dims)

    from .probe import select_and_train

    train_x, train_y, test_x, test_y, num_classes, _ = standardized_probe_data(args, name, pretrained)
    # the probe is fitted on 80% of the train split; its thresholds are chosen on the other 20%
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))
    held, fit = order[: len(order) // 5], order[len(order) // 5:]
    heads, _ = select_and_train(train_x[fit], train_y[fit], dims, num_classes, args.source)
    with torch.no_grad():
        held_probs = {m: logits.softmax(dim=1) for m, logits in heads(train_x[held]).items()}
        test_probs = {m: logits.softmax(dim=1) for m, logits in heads(test_x).items()}
    return evaluate_cascade(held_probs, train_y[held], test_probs, test_y, dims)


def format_cascade(label, result) -> str:
    lines = [f"{label}: threshold {result['threshold']} (chosen on held-out) -> acc1 {100 * result['acc1']:.2f} "
             f"with {result['expected_dim']:.1f} expected dims (full width: {100 * result['full_dim_acc1']:.2f})",
             "  threshold   acc1  expected dims"]
    lines += [f"  {p['threshold']:9.3f}  {100 * p['acc1']:5.2f}  {p['expected_dim']:13.1f}" for p in result["frontier"]]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    requested = parse_int_list(args.dims, "--dims") if args.dims else None
    entries = model_list(args)
    results = {}
    if args.task == "zeroshot":
        for label, name, ckpt in entries:
            results[label] = run_zeroshot(name, ckpt, args.data, requested, args.split, args.device,
                                          args.batch_size, args.workers, args.precisions)
        metric_names = ZEROSHOT_METRICS
    elif args.task == "retrieval":
        recall_k = parse_int_list(args.recall_k, "--recall-k")
        if not recall_k or min(recall_k) < 1:
            raise UserError("--recall-k must be positive integers")
        for label, name, ckpt in entries:
            results[label] = run_retrieval(name, ckpt, args.data, requested, args.split, args.device,
                                           args.batch_size, recall_k, args.funnel, args.precisions, args.stage1)
        metric_names = [f"{side}_retrieval_recall@{k}" for k in recall_k for side in ("image", "text")]
    elif args.task == "linear-probe":
        kinds = [k.strip() for k in args.probes.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in PROBE_KINDS]
        if unknown or not kinds:
            raise UserError(f"--probes takes {', '.join(PROBE_KINDS)}; got {args.probes!r}")
        for label, name, ckpt in entries:
            for kind, result in run_linear_probe(args, name, ckpt, dims_for(name, requested), kinds).items():
                results[f"{label} [{kind}]"] = result
        metric_names = PROBE_METRICS
    else:
        for label, name, ckpt in entries:
            dims = dims_for(name, requested)
            results[label] = {"dims": dims, "source": args.source,
                              "cascade": run_cascade(args, name, ckpt, dims)}
            print(format_cascade(label, results[label]["cascade"]))
        if args.output:
            write_json({"task": "cascade", "data": args.data, "split": args.split, "models": results}, args.output)
        return 0

    print(format_table(results, metric_names))
    if any("quantized" in result for result in results.values()):
        print("\n" + format_quantized_tables(results, metric_names))
    for label, result in results.items():
        if "funnel" in result:
            print("\n" + format_funnel_table(label, result["funnel"], metric_names))
    if args.output:
        report = {"task": args.task, "data": args.data, "split": args.split, "models": results}
        if len(entries) == 1 and args.task in ("zeroshot", "retrieval"):
            # the single-model fields of earlier versions, so their readers keep working
            first = next(iter(results.values()))
            report.update(model=entries[0][1], pretrained=entries[0][2], dims=first["dims"], metrics=first["metrics"])
            if "quantized" in first:
                report["quantized"] = first["quantized"]
        write_json(report, args.output)
    if args.plot:
        plot_metrics(results, metric_names, args.plot, title=f"{args.task}: metric vs embedding dim")
        if any("quantized" in result for result in results.values()):
            plot_precisions(results, metric_names, precision_plot_path(args.plot),
                            title=f"{args.task}: metric vs bytes per vector, one line per precision")
    return 0
