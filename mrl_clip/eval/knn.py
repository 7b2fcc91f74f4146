"""k-nearest-neighbour classification at every nested dim: the MRL paper's headline metric for its ALIGN and
ResNet models is 1-NN top-1 on ImageNet (the train split as the database).

For each dim m, both sides are sliced to their first m dims and re-normalised; a test image's neighbours are the
k train images of highest cosine similarity (faiss brute-force inner product). k = 1 takes the nearest label;
k > 1 votes with each neighbour's cosine similarity as its weight. Ties in the vote go to the lowest class index,
as scikit-learn's KNeighborsClassifier (scipy's mode / weighted_mode) breaks them, so that with
`weights="uniform"` (k = 1) or `weights=lambda d: 1 - d` (cosine distance back to similarity) it predicts the same.
Metric names follow CLIP_benchmark's style: knn{k}_acc1.

    python -m mrl_clip.eval knn --model local-dir:runs/demo/mrl/export --data runs/demo/data/fashion_mnist_test \
        --k 1,20 --output knn.json --plot knn.png

Features come through linear-probe's feature cache (the same full-width encodings of --train-split and --split).
`--image-layers L,...` adds the (layer, dim) grid of a transformer image tower (mrl_clip.eval.depths): database and
queries both read at the same depth, a row per depth.
"""
from functools import partial

import faiss
import numpy as np

from ..dims import parse_int_list
from ..errors import UserError
from ..prefix import normalized_prefix
from .depths import add_layer_flags, at_exit, grid_entry, grid_for, grid_metrics, requested_layers
from .probe import add_feature_flags, load_with_features
from .report import by_dim, dims_for, write_report

DEFAULT_KS = (1, 20)


def metric_names(ks) -> list:
    return [f"knn{k}_acc1" for k in ks]


def positive_ks(ks) -> list:
    """Distinct positive k in increasing order (checked before anything is encoded)."""
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise UserError(f"--k takes positive integers, got {ks}")
    return ks


def check_ks(ks, database_size: int) -> list:
    """positive_ks, none above the number of database (train) vectors."""
    ks = positive_ks(ks)
    if ks[-1] > database_size:
        raise UserError(f"--k {ks[-1]} is more than the {database_size} train images")
    return ks


def neighbours(train_x, test_x, dim: int, k: int) -> tuple:
    """(similarities, ids) [tests, k], most similar first: cosine of the re-normalised dim-prefixes."""
    database = normalized_prefix(np.asarray(train_x), dim)
    queries = normalized_prefix(np.asarray(test_x), dim)
    return faiss.knn(queries, database, k, metric=faiss.METRIC_INNER_PRODUCT)


def vote(similarities, ids, train_y, k: int, num_classes: int) -> np.ndarray:
    """Predicted class per test row from its first k neighbours: the nearest one's label for k = 1, else the class
    with the largest sum of similarities (ties: the lowest class)."""
    labels = np.asarray(train_y)[ids[:, :k]]
    if k == 1:
        return labels[:, 0]
    totals = np.zeros((len(labels), num_classes), dtype=np.float64)
    np.add.at(totals, (np.arange(len(labels))[:, None], labels), similarities[:, :k].astype(np.float64))
    return totals.argmax(axis=1)


def knn_metrics(train_x, train_y, test_x, test_y, dims, ks=DEFAULT_KS) -> dict:
    """{dim: {"knn{k}_acc1": top-1 accuracy}} with the train features as the database; one search per dim at the
    largest k, each smaller k reads the first columns of it."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    ks = check_ks(ks, len(train_y))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results = {}
    for dim in dims:
        similarities, ids = neighbours(train_x, test_x, dim, ks[-1])
        results[dim] = {f"knn{k}_acc1": float(np.mean(vote(similarities, ids, train_y, k, num_classes) == test_y))
                        for k in ks}
    return results


def add_flags(sub):
    add_feature_flags(sub)
    sub.add_argument("--k", default=",".join(map(str, DEFAULT_KS)),
                     help="neighbour counts (1: the nearest label; more: votes weighted by cosine similarity)")
    add_layer_flags(sub, towers=("image",))


def knn_at_exit(grid, train_x, train_y, test_x, test_y, dims, ks, i, _text_index=None) -> dict:
    """knn_metrics with both sides read at image exit i of the grid (the features themselves without one)."""
    return knn_metrics(at_exit(train_x, grid, "image", i).numpy(), train_y.numpy(),
                       at_exit(test_x, grid, "image", i).numpy(), test_y.numpy(), dims, ks)


def knn_result(args, name, ckpt, dims, ks, layers, source=None) -> dict:
    """One model's {"dims", "metrics"} (and its grid with layers), --train-split as the database."""
    model, _, _, features = load_with_features(args, name, ckpt, [args.train_split, args.split], layers, source)
    grid = grid_for(model, layers)
    (train_x, train_y), (test_x, test_y) = features[args.train_split], features[args.split]
    metrics_at = partial(knn_at_exit, grid, train_x, train_y, test_x, test_y, dims, ks)
    result = {"dims": dims, "metrics": by_dim(metrics_at(-1, None))}
    if grid:
        result.update(grid_entry(grid, grid_metrics(grid, metrics_at), towers=("image",)))
    return result


def run_task(args, entries, requested) -> int:
    """`eval knn`: each model's k-NN top-1 at each dim, --train-split as the database, --split as the queries."""
    ks = positive_ks(parse_int_list(args.k, "--k"))
    layers = requested_layers(args)
    results = {label: knn_result(args, name, ckpt, dims_for(name, requested), ks, layers)
               for label, name, ckpt in entries}
    write_report(args, results, metric_names(ks))
    return 0
