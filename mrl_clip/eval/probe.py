"""Linear probes at every nested dim of frozen features: MRL, MRL-E and independent fixed-feature baselines.

Features are standardized coordinate-wise with the train statistics (so slicing a prefix commutes with it),
then a multinomial logistic regression is fitted by full-batch L-BFGS to
    objective = sum_m w_m * mean CE(logits_m, y) + weight_decay / 2 * sum ||W||^2   (biases not penalised)
which for one dim is sklearn's LogisticRegression with C = 1 / (weight_decay * N). A convex problem solved to
convergence leaves one hyper-parameter, weight_decay (no learning rate, epochs or batch size to tune).

On frozen features MRL's separate heads are independent problems: with equal weights "mrl" and "fixed" fit the
same per-dim objective (up to solver tolerance), and a dim weight w_m only rescales that head's penalty to
weight_decay / w_m. MRL-E's shared weight couples the dims. So with a frozen backbone, the MRL-vs-fixed-feature
difference comes from the backbone's training, not from the probe.
"""
import hashlib
import itertools
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import models
from ..dims import check_dims, check_weights
from ..errors import UserError
from ..files import atomic_torch_save
from ..adaptor import adaptor_identity
from ..heads import MRLHeads, save_heads
from .depths import grid_for
from .report import by_dim, dims_for, write_report
from .zeroshot import encode_images, load_classification_folder, top1_top5

KINDS = ("mrl", "mrl-e", "fixed")
METRICS = ["lp_acc1", "lp_acc5"]
DEFAULT_GRID = {"weight_decay": [0.0, 1e-4, 1e-3, 1e-2, 1e-1]}
CACHE_KEY_FIELDS = ("model", "checkpoint", "dataset", "split")


def feature_stats(train):
    """Coordinate-wise train mean and std (std floored so constant coordinates do not blow up)."""
    train = train.float()
    return train.mean(dim=0), train.std(dim=0, unbiased=False).clamp_min(1e-6)


def standardize(train, *others):
    """z-score every coordinate with the train mean/std; returns (train, *others) standardized."""
    mean, std = feature_stats(train)
    return tuple((x.float() - mean) / std for x in (train, *others))


def _check_inputs(x, y, dims, num_classes):
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise UserError(f"features {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    dims = check_dims(dims, width=x.shape[1])
    if x.shape[0] == 0:
        raise UserError("no training samples for the linear probe")
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return dims


def _fit(heads: MRLHeads, x, y, weights, weight_decay, max_iter, chunk_size):
    """Full-batch L-BFGS from zero (the problem is convex, so no random init is needed and the result is
    deterministic). The loss is accumulated over row chunks only to bound memory; the step is full-batch."""
    x, y = x.float(), y.long()
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
    heads.train()
    penalised = heads.linear_weights()
    opt = torch.optim.LBFGS(heads.parameters(), lr=1.0, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)
    n = x.shape[0]

    def closure():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, n, chunk_size):
            logits = heads(x[i:i + chunk_size])
            target = y[i:i + chunk_size]
            loss = sum(w * F.cross_entropy(logits[m], target, reduction="sum") for m, w in zip(heads.dims, weights))
            (loss / n).backward()
            total += loss.item() / n
        if weight_decay:
            penalty = 0.5 * weight_decay * sum(w.pow(2).sum() for w in penalised)
            penalty.backward()
            total += penalty.item()
        return torch.tensor(total)

    opt.step(closure)
    heads.eval()
    return heads


def train_mrl_probe(train_x, train_y, dims, num_classes, efficient=False, weights=None, weight_decay=1e-4,
                    max_iter=1000, chunk_size=16384) -> MRLHeads:
    """MRL (or MRL-E) heads trained jointly on the weighted sum over dims of the cross-entropies."""
    dims = _check_inputs(train_x, train_y, dims, num_classes)
    weights = check_weights(weights, dims)
    heads = MRLHeads(dims, num_classes, efficient=efficient)
    return _fit(heads, train_x, train_y, weights, weight_decay, max_iter, chunk_size)


def train_fixed_feature_probes(train_x, train_y, dims, num_classes, weight_decay=1e-4, max_iter=1000,
                               chunk_size=16384) -> MRLHeads:
    """The baseline: an independent Linear probe per dim m on x[:, :m], each trained alone (own optimiser, own
    loss), returned packed as MRLHeads(efficient=False) so evaluation and saving treat it like the others."""
    dims = _check_inputs(train_x, train_y, dims, num_classes)
    packed = MRLHeads(dims, num_classes, efficient=False)
    for m, slot in zip(dims, packed.heads):
        alone = _fit(MRLHeads([m], num_classes), train_x, train_y, [1.0], weight_decay, max_iter, chunk_size)
        slot.load_state_dict(alone.heads[0].state_dict())
    return packed.eval()


def train_probe(kind, train_x, train_y, dims, num_classes, weights=None, **hparams) -> MRLHeads:
    if kind == "fixed":
        return train_fixed_feature_probes(train_x, train_y, dims, num_classes, **hparams)
    if kind in ("mrl", "mrl-e"):
        return train_mrl_probe(train_x, train_y, dims, num_classes, efficient=kind == "mrl-e", weights=weights,
                               **hparams)
    raise UserError(f"probe kind must be one of {', '.join(KINDS)}, got {kind!r}")


@torch.no_grad()
def probe_metrics(heads: MRLHeads, x, y, dims=None) -> dict:
    """{dim: {"lp_acc1", "lp_acc5"}} with CLIP_benchmark's top-k accuracy; lp_acc5 is nan under 5 classes."""
    dims = heads.dims if dims is None else list(dims)
    missing = [m for m in dims if m not in heads.dims]
    if missing:
        raise UserError(f"the probe heads have no dims {missing} (they have {heads.dims})")
    heads.eval()
    logits = heads(x.float())
    y = torch.as_tensor(y).long()
    results = {}
    for m in dims:
        acc1, acc5 = top1_top5(logits[m], y)
        results[m] = {"lp_acc1": acc1, "lp_acc5": acc5}
    return results


def select_and_train(train_x, train_y, dims, num_classes, kind, grid=None, val_fraction=0.2, seed=0,
                     weights=None, **fixed):
    """Pick hyper-parameters on a validation split carved from train (by mean val top-1 over dims; ties go to
    the earlier grid entry), then retrain on all of train with them.
    `grid` maps hyper-parameter names of `train_mrl_probe` to lists of values (default DEFAULT_GRID); `fixed`
    passes others unchanged (e.g. max_iter); `seed` fixes the split. The split is carved from features already
    standardized with all-train statistics, a negligible leak that keeps one standardization per run.
    Returns (heads, {"chosen": {name: value}, "val_acc1": {dim: acc} at the chosen values, "tried": [...]})."""
    grid = DEFAULT_GRID if grid is None else grid
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise UserError(f"the probe hyper-parameter grid has an empty entry: {grid}")
    dims = _check_inputs(train_x, train_y, dims, num_classes)
    n = train_x.shape[0]
    n_val = int(round(n * val_fraction))
    if not 0 < n_val < n:
        raise UserError(f"val_fraction {val_fraction} of {n} training samples leaves an empty split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, fit_idx = order[:n_val], order[n_val:]

    names = list(grid)
    tried, best = [], None
    for values in itertools.product(*(grid[k] for k in names)):
        hp = dict(zip(names, values))
        heads = train_probe(kind, train_x[fit_idx], train_y[fit_idx], dims, num_classes, weights=weights,
                            **fixed, **hp)
        val = {m: r["lp_acc1"] for m, r in probe_metrics(heads, train_x[val_idx], train_y[val_idx]).items()}
        mean = sum(val.values()) / len(val)
        tried.append({**hp, "val_mean_acc1": mean})
        if best is None or mean > best[0]:
            best = (mean, hp, val)
    _, chosen, val_acc1 = best
    heads = train_probe(kind, train_x, train_y, dims, num_classes, weights=weights, **fixed, **chosen)
    return heads, {"chosen": chosen, "val_acc1": val_acc1, "tried": tried}


def checkpoint_identity(checkpoint) -> dict:
    """What makes a checkpoint distinct for caching: a file's resolved path + size + mtime_ns, a folder's
    (a `local-dir:` export) files likewise, or otherwise the string itself (a pretrained tag such as 'openai')."""
    path = models.local_dir(str(checkpoint)) or Path(str(checkpoint))
    if path.is_file():
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"path": str(path.resolve()),
                "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    return {"name": str(checkpoint)}


def cache_path(cache_dir, key: dict) -> Path:
    missing = [k for k in CACHE_KEY_FIELDS if k not in key]
    if missing:
        raise ValueError(f"feature cache key lacks {missing}: {sorted(key)}")
    if "dims" in key:
        # features are cached at full width and sliced per dim, so dims in the key would only split the cache
        raise ValueError("feature cache key must not hold dims")
    text = json.dumps(key, sort_keys=True, default=str)
    return Path(cache_dir) / f"features-{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt"


def cached_features(cache_dir, key: dict, compute: Callable):
    """(features, labels) at full width: from the cache file for `key`, or `compute()` then stored.
    The key holds model, checkpoint identity (see `checkpoint_identity`), dataset folder and split: caching by
    model + dataset alone (as CLIP_benchmark does) would serve one checkpoint's features for another."""
    path = cache_path(cache_dir, key)
    key_text = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("key") == key_text:
                return entry["features"], entry["labels"]
        except Exception:
            pass  # unreadable or foreign: recompute and overwrite
    features, labels = compute()
    features, labels = features.float().cpu(), torch.as_tensor(labels).long().cpu()
    atomic_torch_save({"features": features, "labels": labels, "key": key_text}, path)
    return features, labels


def load_with_features(args, name, pretrained, splits, layers=None, source=None):
    """The model, its preprocess and tokenizer, and {split: (full-width image features, labels)} through the
    feature cache (key: model, checkpoint identity, data folder, split; never the dims). `layers` {tower: depths}
    (mrl_clip.eval.depths) gives image features [exits, N, width] at each depth of its grid instead. `source` (a
    mrl_clip.eval.named.NamedSet) reads a data set by name instead of the --data folder."""
    model, _, preprocess, tokenizer = models.create(name, pretrained, device=args.device, adaptor=args.adaptor)
    model.eval()
    grid = grid_for(model, layers or {})
    image_layers = grid and grid.depths("image")
    if source is None:
        cache = args.cache_dir or str(Path(args.data) / ".mrl_clip_cache")
        dataset_key = str(Path(args.data).resolve())
    else:
        from .named import default_cache_dir
        cache, dataset_key = args.cache_dir or default_cache_dir(), source.key

    def encode(split):
        if source is None:
            folder = load_classification_folder(args.data, preprocess, split, need_prompts=False)
            dataset, collate = folder.dataset, None
        else:
            dataset, collate = source.build(preprocess, split, prompts=False), source.collate_fn()
        return encode_images(model, dataset, args.device, args.batch_size, args.workers, desc=f"{split} images",
                             layers=image_layers, collate_fn=collate)

    features = {}
    for split in splits:
        key = {"model": name, "checkpoint": checkpoint_identity(pretrained or name),
               "dataset": dataset_key, "split": split,
               **({"adaptor": adaptor_identity(args.adaptor)} if args.adaptor else {}),
               **({"image_layers": image_layers} if image_layers else {})}
        features[split] = cached_features(cache, key, lambda: encode(split))
    return model, preprocess, tokenizer, features


def standardized_probe_data(args, name, pretrained, source=None):
    """Train and test features, z-scored with the train statistics, and the class count."""
    _, _, _, features = load_with_features(args, name, pretrained, [args.train_split, args.split], source=source)
    (train_x, train_y), (test_x, test_y) = features[args.train_split], features[args.split]
    mean, std = feature_stats(train_x)
    train_x, test_x = standardize(train_x, test_x)
    return train_x, train_y, test_x, test_y, int(max(train_y.max(), test_y.max())) + 1, {"mean": mean, "std": std}


def heads_path(args, name, pretrained, kind) -> Path:
    """--heads-dir, else beside the checkpoint (CKPT.heads/), else inside a local-dir: export (EXPORT/heads/)."""
    if args.heads_dir:
        folder = Path(args.heads_dir)
    elif pretrained:
        folder = Path(pretrained).parent / f"{Path(pretrained).stem}.heads"
    elif models.local_dir(name) is not None:
        folder = models.local_dir(name) / "heads"
    else:
        folder = Path("heads") / name
    return folder / f"{kind}.safetensors"


def run_linear_probe(args, name, pretrained, dims, kinds, source=None):
    """{kind: {"dims", "metrics", "probe"}}: heads trained on --train-split, measured on --split, saved beside
    the checkpoint (never inside open_clip's state_dict)."""
    train_x, train_y, test_x, test_y, num_classes, stats = standardized_probe_data(args, name, pretrained, source)
    results = {}
    for kind in kinds:
        heads, info = select_and_train(train_x, train_y, dims, num_classes, kind)
        path = heads_path(args, name, pretrained, kind)
        # the heads expect features z-scored with these train statistics
        save_heads(path, heads, {"model": name, "pretrained": pretrained, "kind": kind,
                                 "chosen": info["chosen"], "feature_mean": stats["mean"],
                                 "feature_std": stats["std"]})
        metrics = probe_metrics(heads, test_x, test_y, dims)
        results[kind] = {"dims": dims, "metrics": by_dim(metrics),
                         "probe": {"chosen": info["chosen"], "val_acc1": by_dim(info["val_acc1"]),
                                   "heads": str(path)}}
    return results


def add_feature_flags(sub):
    """The flags of the tasks that fit on cached image features (linear-probe, cascade)."""
    sub.add_argument("--train-split", default="train", help="split the probes are trained on")
    sub.add_argument("--cache-dir", default=None, help="feature cache (default: DATA/.mrl_clip_cache)")


def add_flags(sub):
    add_feature_flags(sub)
    sub.add_argument("--probes", default=",".join(KINDS), help="any of mrl, mrl-e, fixed")
    sub.add_argument("--heads-dir", default=None, help="where trained heads are saved (default: beside the checkpoint)")


def probe_kinds(text: str) -> list:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"--probes takes {', '.join(KINDS)}; got {text!r}")
    return kinds


def run_task(args, entries, requested) -> int:
    """`eval linear-probe`: each model's probes of each kind at each dim, reported together (a row block per
    model and kind)."""
    kinds = probe_kinds(args.probes)
    results = {}
    for label, name, ckpt in entries:
        for kind, result in run_linear_probe(args, name, ckpt, dims_for(name, requested), kinds).items():
            results[f"{label} [{kind}]"] = result
    write_report(args, results, METRICS)
    return 0
