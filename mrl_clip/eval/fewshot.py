"""n-shot and long-tailed classification at every nested dim, from frozen features (the MRL paper's few-shot and
long-tail evaluations, in a form a small machine can run).

n-shot: n train images are drawn per class (seeded, without replacement), and the test split is classified at
each dim m by
- nearest class mean (SimpleShot's "CL2N"): the m-prefixes re-normalised, each class's mean of them as its
  centroid, the nearest centroid by Euclidean distance (scikit-learn's NearestCentroid on the re-normalised
  prefixes; ties to the lowest class);
- a linear probe on the n shots: mrl_clip.eval.probe's multinomial logistic regression per dim (z-scored with the
  shots' own statistics; weight decay PROBE_WEIGHT_DECAY, there being no validation split to choose it on).
Each is averaged over `draws` seeded draws and reported with its standard deviation across them.

Long tail: the train split is cut to Zipf-like class counts (class of rank r keeps round(largest / (r + 1) ** s)
images, at least 1; ranks are a seeded permutation of the classes) and both classifiers are measured on the test
images of the frequent half of the classes (the lower ranks) and of the rare half apart.

    python -m mrl_clip.eval fewshot --model local-dir:runs/demo/mrl/export --data runs/demo/data/fashion_mnist_test \
        --shots 1,5,10 --draws 5 [--long-tail-largest 100] --output fewshot.json --plot fewshot.png

Features come through linear-probe's feature cache (the same full-width encodings of --train-split and --split).
"""
import numpy as np
import torch

from ..dims import parse_int_list
from ..errors import UserError
from ..prefix import normalized_prefix
from .probe import add_feature_flags, load_with_features, standardize, train_mrl_probe
from .report import dims_for, write_report

DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_DRAWS = 5
PROBE_WEIGHT_DECAY = 1e-2


def class_counts(labels, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=num_classes)


def check_shots(shots, labels, num_classes: int) -> list:
    shots = sorted(set(shots))
    smallest = int(class_counts(labels, num_classes).min())
    if not shots or shots[0] < 1:
        raise UserError(f"--shots takes positive integers, got {shots}")
    if shots[-1] > smallest:
        raise UserError(f"--shots {shots[-1]} is more than the {smallest} train images of the smallest class")
    return shots


def draw_shots(labels, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` train images per class, drawn without replacement."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                           for c in np.unique(labels)])


def nearest_class_mean(train_x, train_y, test_x, dim: int, num_classes: int) -> np.ndarray:
    """Predicted class per test row: the nearest (Euclidean) mean of the re-normalised train prefixes."""
    train, test = normalized_prefix(np.asarray(train_x), dim), normalized_prefix(np.asarray(test_x), dim)
    train_y = np.asarray(train_y)
    present = np.unique(train_y)
    centroids = np.stack([train[train_y == c].mean(axis=0) for c in present]).astype(np.float64)
    distances = ((test.astype(np.float64)[:, None, :] - centroids[None]) ** 2).sum(-1)
    return present[distances.argmin(axis=1)]


def probe_predictions(train_x, train_y, test_x, dims, num_classes: int) -> dict:
    """{dim: predicted class per test row} of MRL probe heads fitted on these train rows."""
    train, test = standardize(torch.as_tensor(np.asarray(train_x)), torch.as_tensor(np.asarray(test_x)))
    heads = train_mrl_probe(train, torch.as_tensor(np.asarray(train_y)).long(), dims, num_classes,
                            weight_decay=PROBE_WEIGHT_DECAY)
    with torch.no_grad():
        return {m: logits.argmax(dim=1).numpy() for m, logits in heads(test).items()}


def accuracies(train_x, train_y, test_x, test_y, dims, num_classes: int, masks: dict) -> dict:
    """{dim: {"ncm_acc1{suffix}", "lp_acc1{suffix}"}} for each {suffix: boolean mask over the test rows}."""
    test_y = np.asarray(test_y)
    probe = probe_predictions(train_x, train_y, test_x, dims, num_classes)
    results = {}
    for m in dims:
        ncm = nearest_class_mean(train_x, train_y, test_x, m, num_classes)
        results[m] = {}
        for suffix, mask in masks.items():
            results[m][f"ncm_acc1{suffix}"] = float(np.mean(ncm[mask] == test_y[mask]))
            results[m][f"lp_acc1{suffix}"] = float(np.mean(probe[m][mask] == test_y[mask]))
    return results


def mean_and_spread(per_draw: list, dims, prefix: str) -> dict:
    """{dim: {prefix + name: mean over draws, prefix + name + "_std": their standard deviation}}."""
    out = {m: {} for m in dims}
    for m in dims:
        for name in per_draw[0][m]:
            values = np.array([draw[m][name] for draw in per_draw])
            out[m][f"{prefix}{name}"] = float(values.mean())
            out[m][f"{prefix}{name}_std"] = float(values.std())
    return out


def fewshot_metrics(train_x, train_y, test_x, test_y, dims, shots=DEFAULT_SHOTS, draws=DEFAULT_DRAWS) -> dict:
    """{dim: {"fewshot{n}_ncm_acc1", "fewshot{n}_lp_acc1" and their "_std"}} over `draws` seeded draws."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    everything = {"": np.ones(len(test_y), dtype=bool)}
    results = {m: {} for m in dims}
    for n in check_shots(shots, train_y, num_classes):
        per_draw = []
        for seed in range(draws):
            picked = draw_shots(train_y, n, seed)
            per_draw.append(accuracies(np.asarray(train_x)[picked], train_y[picked], test_x, test_y, dims,
                                       num_classes, everything))
        for m, values in mean_and_spread(per_draw, dims, f"fewshot{n}_").items():
            results[m].update(values)
    return results


def zipf_counts(num_classes: int, largest: int, exponent: float = 1.0) -> np.ndarray:
    """Images kept per class rank: round(largest / (rank + 1) ** exponent), at least 1."""
    return np.maximum(1, np.round(largest / (np.arange(num_classes) + 1.0) ** exponent)).astype(int)


def long_tail_subset(labels, largest: int, exponent: float, seed: int) -> tuple:
    """(train indices with Zipf-like class counts, rank of each class): rank r keeps zipf_counts(...)[r]."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    available = class_counts(labels, num_classes)
    if largest > available.min():
        raise UserError(f"--long-tail-largest {largest} is more than the {int(available.min())} train images of "
                        f"the smallest class")
    rng = np.random.default_rng(seed)
    rank = np.empty(num_classes, dtype=int)
    rank[rng.permutation(num_classes)] = np.arange(num_classes)
    counts = zipf_counts(num_classes, largest, exponent)
    picked = [rng.choice(np.flatnonzero(labels == c), counts[rank[c]], replace=False) for c in range(num_classes)]
    return np.concatenate(picked), rank


def long_tail_metrics(train_x, train_y, test_x, test_y, dims, largest: int, exponent: float = 1.0,
                      draws: int = DEFAULT_DRAWS) -> dict:
    """{dim: {"longtail_{ncm,lp}_acc1_{frequent,rare}" and their "_std"}}: the frequent half of the classes
    (ranks below C / 2) and the rare half, measured apart on the test split."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    per_draw = []
    for seed in range(draws):
        picked, rank = long_tail_subset(train_y, largest, exponent, seed)
        frequent = rank[test_y] < num_classes // 2
        per_draw.append(accuracies(np.asarray(train_x)[picked], train_y[picked], test_x, test_y, dims,
                                   num_classes, {"_frequent": frequent, "_rare": ~frequent}))
    return mean_and_spread(per_draw, dims, "longtail_")


def add_flags(sub):
    add_feature_flags(sub)
    sub.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)), help="train images per class")
    sub.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="seeded draws averaged per shot count")
    sub.add_argument("--long-tail-largest", type=int, default=0,
                     help="also the long-tailed split: the most frequent class keeps this many train images "
                          "(0: off)")
    sub.add_argument("--long-tail-exponent", type=float, default=1.0, help="Zipf exponent of the long tail")


def fewshot_entry(args, name, ckpt, dims, shots) -> dict:
    _, _, _, features = load_with_features(args, name, ckpt, [args.train_split, args.split])
    (train_x, train_y), (test_x, test_y) = (tuple(t.numpy() for t in features[s]) for s in (args.train_split,
                                                                                             args.split))
    metrics = fewshot_metrics(train_x, train_y, test_x, test_y, dims, shots, args.draws)
    if args.long_tail_largest:
        tail = long_tail_metrics(train_x, train_y, test_x, test_y, dims, args.long_tail_largest,
                                 args.long_tail_exponent, args.draws)
        metrics = {m: {**metrics[m], **tail[m]} for m in dims}
    return {"dims": dims, "metrics": {str(m): v for m, v in metrics.items()}}


def run_task(args, entries, requested) -> int:
    """`eval fewshot`: each model's n-shot (and long-tail) accuracies at each dim, mean and spread over draws."""
    shots = parse_int_list(args.shots, "--shots")
    if args.draws < 1 or args.long_tail_largest < 0 or args.long_tail_exponent <= 0:
        raise UserError("--draws must be at least 1, --long-tail-largest not negative, --long-tail-exponent positive")
    results = {label: fewshot_entry(args, name, ckpt, dims_for(name, requested), shots)
               for label, name, ckpt in entries}
    names = [f"fewshot{n}_{kind}_acc1" for n in sorted(set(shots)) for kind in ("ncm", "lp")]
    if args.long_tail_largest:
        names += [f"longtail_{kind}_acc1_{part}" for kind in ("ncm", "lp") for part in ("frequent", "rare")]
    write_report(args, results, names)
    return 0
