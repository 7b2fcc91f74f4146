"""Image-text retrieval recall@K at every nested dim from one full-width encoding.

Metrics are CLIP_benchmark's (its recall_at_k and batchify, the CLIP-paper convention: a query scores 1 when any
of its positives is in the top K): image_retrieval_recall@K (text query -> images), text_retrieval_recall@K
(image query -> texts). Each dim slices the full-width features and re-normalises the prefix.
"""
import time
from pathlib import Path

import torch
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import models, quantize
from ..dims import parse_int_list
from ..errors import UserError
from ..prefix import normalized_prefix, normalized_prefix_tensor
from ..search.index import format_funnel, parse_funnel
from ..search.store import parse_stage1
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
from .report import by_dim, dims_for, render_table, write_report
from .zeroshot import add_precision_flag, check_wds_folder, stored_precisions


def dataset_type(folder: str) -> str:
    path = Path(folder) / "dataset_type.txt"
    return path.read_text().strip().lower() if path.is_file() else "classification"


def load_retrieval_folder(folder: str, transform, split: str = "test"):
    """A CLIP_benchmark wds retrieval folder (dataset_type.txt says 'retrieval'; image + txt, one caption a line),
    read with CLIP_benchmark's own reader."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    root = check_wds_folder(folder, split)
    if dataset_type(folder) != "retrieval":
        raise UserError(f"{folder} is not a retrieval folder (its dataset_type.txt must say 'retrieval')")
    return build_wds_dataset(root.name, transform=transform, split=split, data_dir=str(root))


@torch.no_grad()
def encode_pairs(model, tokenizer, dataset, device="cpu", batch_size=256, grid=None):
    """Full-width unnormalised image and text features, and for each text the index of its image (with a
    depths.Grid, a layered tower's features at each of its depths: [exits, N, width])."""
    images, texts, text_image_index = [], [], []
    loader = DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    start = 0
    for batch_images, batch_captions in tqdm(loader, desc="encoding images and captions", leave=False):
        captions = [c for per_image in batch_captions for c in per_image]
        text_image_index += [start + i for i, per_image in enumerate(batch_captions) for _ in per_image]
        images.append(encode_batch(model, "image", batch_images.to(device), grid and grid.depths("image")))
        texts.append(encode_batch(model, "text", tokenizer(captions).to(device), grid and grid.depths("text")))
        start += len(batch_images)
    if not images:
        raise UserError("the evaluation data holds no samples")
    return torch.cat(images, dim=-2), torch.cat(texts, dim=-2), torch.tensor(text_image_index)


def positives_of(text_image_index, n_images) -> torch.Tensor:
    """[texts, images] bool: each text's own image."""
    positives = torch.zeros(len(text_image_index), n_images, dtype=torch.bool)
    positives[torch.arange(len(text_image_index)), text_image_index] = True
    return positives


def recall_metrics(image_scores, text_scores, positives, recall_k, batch_size=256) -> dict:
    """CLIP_benchmark's recall@K both ways: image_scores [texts, images] rank images for each text query,
    text_scores [images, texts] texts for each image query."""
    metrics = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = (
            batchify(recall_at_k, image_scores, positives, batch_size, "cpu", k=k) > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (
            batchify(recall_at_k, text_scores, positives.T, batch_size, "cpu", k=k) > 0).float().mean().item()
    return metrics


def retrieval_metrics(image_features, text_features, text_image_index, dims, recall_k=(1, 5, 10),
                      batch_size=256) -> dict:
    """{dim: {"image_retrieval_recall@K", "text_retrieval_recall@K"}}, CLIP_benchmark's definitions."""
    positives = positives_of(text_image_index, len(image_features))
    results = {}
    for m in dims:
        scores = normalized_prefix_tensor(text_features, m) @ normalized_prefix_tensor(image_features, m).T
        results[m] = recall_metrics(scores, scores.T, positives, recall_k, batch_size)
    return results


def quantized_retrieval_metrics(image_features, text_features, text_image_index, dims, precision,
                                recall_k=(1, 5, 10), batch_size=256) -> dict:
    """The same recall@K with the searched side stored at `precision` (mrl_clip.quantize): text queries search
    the images (int8 calibrated on the images), image queries search the texts (calibrated on the texts); binary
    ties go to the lower item index."""
    positives = positives_of(text_image_index, len(image_features))
    results = {}
    for m in dims:
        images, texts = normalized_prefix(image_features.numpy(), m), normalized_prefix(text_features.numpy(), m)
        image_scores = quantize.ranking_scores(quantize.similarity(texts, images, precision), precision, m)
        text_scores = quantize.ranking_scores(quantize.similarity(images, texts, precision), precision, m)
        results[m] = {**recall_metrics(torch.from_numpy(image_scores), torch.from_numpy(text_scores), positives,
                                       recall_k, batch_size),
                      "bytes_per_vector": quantize.bytes_per_vector(precision, m)}
    return results


def ranked_scores(result, n_items: int) -> torch.Tensor:
    """A [queries, items] score matrix holding a search's returned scores and -inf elsewhere, so that
    CLIP_benchmark's recall_at_k ranks exactly the returned items."""
    scores = torch.full((len(result.ids), n_items), float("-inf"))
    ids = torch.from_numpy(result.ids)
    found = ids >= 0
    scores[torch.nonzero(found, as_tuple=True)[0], ids[found]] = torch.from_numpy(result.scores)[found]
    return scores


def searched_recall(search, queries, items, positives, recall_k, name, batch_size=256, stage1=None):
    """recall@K (CLIP_benchmark's definition) of one side searched through an EmbeddingIndex over `items` (with
    the stage-1 structure of a mrl_clip.search.store.Stage1Spec, built before the clock starts), and the search
    time per query in ms."""
    from ..search.index import EmbeddingIndex
    from ..search.store import build_index

    index = EmbeddingIndex(items.numpy())
    if stage1 is not None:
        build_index(index, stage1)
    started = time.perf_counter()
    result = search(index, queries.numpy())
    ms = 1000 * (time.perf_counter() - started) / len(queries)
    scores = ranked_scores(result, len(items))
    metrics = {f"{name}_recall@{k}": (batchify(recall_at_k, scores, positives, batch_size, "cpu", k=k) > 0)
               .float().mean().item() for k in recall_k}
    return metrics, ms


def funnel_retrieval_metrics(image_features, text_features, text_image_index, stages, recall_k=(1, 5, 10),
                             stage1=None) -> dict:
    """Retrieval recall@K and ms per query of funnel search (mrl_clip.search.index; stage 1 through the stage1
    spec's structure, HNSW with efSearch = K1) and of exact full-width faiss search, both ways: {"funnel": {...},
    "exact": {...}} with "metrics" and "ms_per_query" each."""
    positives = torch.zeros(len(text_features), len(image_features), dtype=torch.bool)
    positives[torch.arange(len(text_features)), text_image_index] = True
    final_k = stages[-1].k
    ef = stages[0].k if stage1 is not None and stage1.hnsw else None
    searches = {"funnel": lambda index, q: index.funnel_search(q, stages, hnsw_ef=ef),
                "exact": lambda index, q: index.search(q, final_k)}
    out = {}
    for kind, search in searches.items():
        spec = stage1 if kind == "funnel" else None
        image_side, image_ms = searched_recall(search, text_features, image_features, positives, recall_k,
                                               "image_retrieval", stage1=spec)
        text_side, text_ms = searched_recall(search, image_features, text_features, positives.T, recall_k,
                                             "text_retrieval", stage1=spec)
        out[kind] = {"metrics": {**image_side, **text_side},
                     "ms_per_query": {"image_retrieval": image_ms, "text_retrieval": text_ms}}
    return out


def run_retrieval(model_name, pretrained, data, dims=None, split="test", device="cpu", batch_size=256,
                  recall_k=(1, 5, 10), funnel=None, precisions=(), stage1=None, adaptor=None, layers=None):
    """{"dims", "metrics"}; with a funnel spec, "funnel": the same recall@K through funnel search and exact
    full-width search, with ms per query of each; with precisions other than float32, "quantized" as zero-shot's
    (both at full depth); with `layers` {tower: depths or None}, the (layer, dim) grid: "layers" and "grid"."""
    dims = dims_for(model_name, dims)
    stages = parse_funnel(funnel, models.embed_width(model_name), max(recall_k)) if funnel else None
    spec = parse_stage1(stage1, models.embed_width(model_name)) if stage1 else None
    if spec and not stages:
        raise UserError("--stage1 needs --funnel")
    if spec and (spec.dim, spec.precision) != (stages[0].dim, stages[0].precision):
        raise UserError(f"--stage1 {stage1} is not the funnel's first stage ({format_funnel(stages[:1])})")
    model, _, preprocess, tokenizer = models.create(model_name, pretrained, device=device, adaptor=adaptor)
    model.eval()
    grid = grid_for(model, layers or {})
    image_exits, text_exits, index = encode_pairs(model, tokenizer, load_retrieval_folder(data, preprocess, split),
                                                  device, batch_size, grid)
    images, texts = full_depth(image_exits, grid, "image"), full_depth(text_exits, grid, "text")
    metrics = retrieval_metrics(images, texts, index, dims, recall_k)
    result = {"dims": dims, "metrics": by_dim(metrics)}
    if precisions:
        result["quantized"] = {p: by_dim(quantized_retrieval_metrics(images, texts, index, dims, p, recall_k))
                               for p in precisions}
    if stages:
        result["funnel"] = {"stages": format_funnel(stages), "stage1": spec.label() if spec else "flat",
                            **funnel_retrieval_metrics(images, texts, index, stages, recall_k, spec)}
    if grid:
        rows = grid_metrics(grid, lambda i, t: retrieval_metrics(
            at_exit(image_exits, grid, "image", i), at_exit(text_exits, grid, "text", t), index, dims, recall_k))
        result.update(grid_entry(grid, rows))
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


def add_flags(sub):
    add_precision_flag(sub)
    sub.add_argument("--recall-k", default="1,5,10")
    sub.add_argument("--funnel", default=None, metavar="DIM:K,...",
                     help="also search through a funnel, e.g. 32:400,768:10 (stage 1 finds K candidates at DIM, later "
                          "stages re-rank them at larger dims), against exact full-width search; a stage may name a "
                          "precision: binary@256:2000,768:10")
    sub.add_argument("--stage1", default=None, metavar="SPEC",
                     help="search the funnel's stage 1 through an index structure built as `mrl_clip index build` "
                          "builds it (e.g. hnsw32@32, hnsw32-binary@256; its dim and precision must be the funnel's "
                          "first stage's; HNSW efSearch = the stage's K)")
    add_layer_flags(sub)


def run_task(args, entries, requested) -> int:
    """`eval retrieval`: each model's recall@K both ways at each dim (at each stored precision, through a funnel),
    reported together."""
    precisions = stored_precisions(args)
    recall_k = parse_int_list(args.recall_k, "--recall-k")
    if not recall_k or min(recall_k) < 1:
        raise UserError("--recall-k must be positive integers")
    layers = requested_layers(args)
    results = {label: run_retrieval(name, ckpt, args.data, requested, args.split, args.device, args.batch_size,
                                    recall_k, args.funnel, precisions, args.stage1, args.adaptor, layers)
               for label, name, ckpt in entries}
    metric_names = [f"{side}_retrieval_recall@{k}" for k in recall_k for side in ("image", "text")]
    funnels = [format_funnel_table(label, result["funnel"], metric_names) for label, result in results.items()
               if "funnel" in result]
    write_report(args, results, metric_names, funnels, first_model=entries[0][1:] if len(entries) == 1 else None)
    return 0
