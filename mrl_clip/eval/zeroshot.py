"""Zero-shot classification at every nested dim from one full-width encoding.

Metric conventions are CLIP_benchmark's (its `accuracy`, sklearn's balanced accuracy as mean_per_class_recall,
logits = 100 * image @ classifier, classifier = normalised mean of normalised prompt embeddings); the one
difference is that each dim m slices the full-width features first and re-normalises the prefix.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_classification import accuracy
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import models, quantize
from ..errors import UserError
from ..prefix import normalized_prefix, normalized_prefix_tensor
from .depths import (
    add_layer_flags,
    at_exit,
    encode_batch,
    full_depth,
    grid_entry,
    grid_for,
    grid_metrics,
    requested_layers,
)
from .report import by_dim, dims_for, write_report

METRICS = ["acc1", "acc5", "mean_per_class_recall"]


@dataclass
class ClassificationSet:
    dataset: object      # iterable of (image tensor, label)
    classnames: list
    templates: list
    collate_fn: object = None   # the DataLoader's (CLIP_benchmark's get_dataset_collate_fn for a named set)


def check_wds_folder(folder: str, split: str) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"data folder not found: {folder}")
    if not (root / split / "nshards.txt").is_file():
        raise UserError(f"{folder} is not a CLIP_benchmark wds folder: no {split}/nshards.txt")
    return root


def load_classification_folder(folder: str, transform, split: str = "test", need_prompts=True) -> ClassificationSet:
    """A folder in CLIP_benchmark's wds layout, read with CLIP_benchmark's own reader."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    root = check_wds_folder(folder, split)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt") if need_prompts else ():
        if not (root / name).is_file():
            raise UserError(f"{folder} has no {name} (needed for zero-shot classification)")
    dataset = build_wds_dataset(root.name, transform=transform, split=split, data_dir=str(root))
    return ClassificationSet(dataset, dataset.classes, dataset.templates)


@torch.no_grad()
def encode_images(model, dataset, device="cpu", batch_size=256, workers=0, desc="images", layers=None,
                  collate_fn=None):
    """Full-width, unnormalised image features [N, width] and labels; with `layers`, features [exits, N, width]
    at each depth (mrl_clip.eval.depths)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn)
    features, labels = [], []
    for images, target in tqdm(loader, desc=f"encoding {desc}", unit="batch", leave=False):
        features.append(encode_batch(model, "image", images.to(device), layers))
        labels.append(torch.as_tensor(target))
    if not features:
        raise UserError("the evaluation data holds no samples")
    return torch.cat(features, dim=-2), torch.cat(labels)


@torch.no_grad()
def encode_class_prompts(model, tokenizer, classnames, templates, device="cpu", layers=None):
    """[classes, templates, width] unnormalised text features of every prompt; with `layers`, [exits, classes,
    templates, width]."""
    out = []
    for name in tqdm(classnames, desc="encoding class prompts", leave=False):
        tokens = tokenizer([t.format(c=name) for t in templates]).to(device)
        out.append(encode_batch(model, "text", tokens, layers))
    return torch.stack(out, dim=-3)


def classifier_at(prompt_features, dim):
    """CLIP_benchmark's zero-shot classifier, built from the dim-m prefixes: [classes, m]."""
    per_prompt = normalized_prefix_tensor(prompt_features, dim)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def zeroshot_logits(image_features, prompt_features, dim):
    """CLIP_benchmark's logits (100 x cosine) from the dim-m prefixes."""
    return 100.0 * normalized_prefix_tensor(image_features, dim) @ classifier_at(prompt_features, dim).T


def top1_top5(logits, labels) -> tuple:
    """CLIP_benchmark's top-1 and top-5 accuracy; top-5 is nan under 5 classes, as in CLIP_benchmark."""
    if logits.shape[1] >= 5:
        acc1, acc5 = accuracy(logits, labels, topk=(1, 5))
        return acc1, acc5
    (acc1,) = accuracy(logits, labels, topk=(1,))
    return acc1, float("nan")


def classification_metrics(logits, labels) -> dict:
    acc1, acc5 = top1_top5(logits, labels)
    recall = balanced_accuracy_score(labels.numpy(), logits.argmax(dim=1).numpy())
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(recall)}


def zeroshot_metrics(image_features, labels, prompt_features, dims) -> dict:
    """{dim: {"acc1", "acc5", "mean_per_class_recall"}} from one full-width encoding."""
    return {m: classification_metrics(zeroshot_logits(image_features, prompt_features, m), labels) for m in dims}


def quantized_zeroshot_metrics(image_features, labels, prompt_features, dims, precision) -> dict:
    """The same metrics with the images stored at `precision` (mrl_clip.quantize): the images are the database
    (int8 calibrated on them), each class's classifier the query; binary ties go to the lower class index."""
    results = {}
    for m in dims:
        images = normalized_prefix(image_features.numpy(), m)
        classifier = classifier_at(prompt_features, m).numpy()
        scores = quantize.similarity(classifier, images, precision).T          # [images, classes]
        scores = quantize.ranking_scores(np.ascontiguousarray(scores), precision, m)
        results[m] = {**classification_metrics(torch.from_numpy(scores), labels),
                      "bytes_per_vector": quantize.bytes_per_vector(precision, m)}
    return results


def encode_classification(model, tokenizer, data: ClassificationSet, dims, device="cpu", batch_size=256,
                          workers=0, grid=None) -> tuple:
    """Full-width image features, labels and prompt features, once for every dim (and with a depths.Grid, at
    each of its depths: [exits, ...] for a layered tower)."""
    model.eval()
    image_features, labels = encode_images(model, data.dataset, device, batch_size, workers,
                                           layers=grid and grid.depths("image"), collate_fn=data.collate_fn)
    prompt_features = encode_class_prompts(model, tokenizer, data.classnames, data.templates, device,
                                           layers=grid and grid.depths("text"))
    width = image_features.shape[-1]
    if max(dims) > width:
        raise UserError(f"--dims {list(dims)} go above the model's embedding width {width}")
    return image_features, labels, prompt_features


def evaluate_zeroshot(model, tokenizer, data: ClassificationSet, dims, device="cpu", batch_size=256, workers=0):
    return zeroshot_metrics(*encode_classification(model, tokenizer, data, dims, device, batch_size, workers), dims)


def run_zeroshot(model_name, pretrained, data, dims=None, split="test", device="cpu", batch_size=256, workers=0,
                 precisions=(), adaptor=None, layers=None):
    """{"dims": [...], "metrics": {"<dim>": {...}}} for one model, and with precisions other than float32
    "quantized": {precision: {"<dim>": {...metrics, "bytes_per_vector"}}} (at full depth). `layers` {tower:
    depths or None} adds the (layer, dim) grid: "layers" and "grid" (mrl_clip.eval.depths)."""
    dims = dims_for(model_name, dims)
    model, _, preprocess, tokenizer = models.create(model_name, pretrained, device=device, adaptor=adaptor)
    grid = grid_for(model, layers or {})
    dataset = load_classification_folder(data, preprocess, split)
    images, labels, prompts = encode_classification(model, tokenizer, dataset, dims, device, batch_size, workers,
                                                    grid)
    features = (full_depth(images, grid, "image"), labels, full_depth(prompts, grid, "text"))
    result = {"dims": dims, "metrics": by_dim(zeroshot_metrics(*features, dims))}
    if precisions:
        result["quantized"] = {p: by_dim(quantized_zeroshot_metrics(*features, dims, p)) for p in precisions}
    if grid:
        rows = grid_metrics(grid, lambda i, t: zeroshot_metrics(
            at_exit(images, grid, "image", i), labels, at_exit(prompts, grid, "text", t), dims))
        result.update(grid_entry(grid, rows))
    return result


def add_precision_flag(sub):
    sub.add_argument("--embedding-precision", default="float32", metavar="P,...",
                     help="also score each dim with the stored side at these precisions: any of "
                          f"{', '.join(quantize.PRECISIONS)} (see mrl_clip.quantize)")


def stored_precisions(args) -> list:
    """The --embedding-precision precisions scored besides float32."""
    return [p for p in quantize.parse_precisions(args.embedding_precision) if p != "float32"]


def add_flags(sub):
    add_precision_flag(sub)
    add_layer_flags(sub)


def run_task(args, entries, requested) -> int:
    """`eval zeroshot`: each model's metrics at each dim (and at each stored precision, each depth), reported
    together."""
    precisions = stored_precisions(args)
    layers = requested_layers(args)
    results = {label: run_zeroshot(name, ckpt, args.data, requested, args.split, args.device, args.batch_size,
                                   args.workers, precisions, args.adaptor, layers) for label, name, ckpt in entries}
    write_report(args, results, METRICS, first_model=entries[0][1:] if len(entries) == 1 else None)
    return 0
