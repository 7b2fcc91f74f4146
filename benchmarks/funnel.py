"""Funnel (adaptive) retrieval against exact full-width search, over 1M embeddings of a trained MRL model.

    python benchmarks/funnel.py [--quick] [--database 1000000] [--queries 1000] [--repeats 3] [--threads 2]

The database: MRL-Tiny-28-P7-768 (the demo's towers with 7-px patches, 16 tokens instead of 49, so that 1M images
embed in minutes on 2 cores; a 768-wide embedding) trained briefly with the Matryoshka loss over 8..768 on the
Fashion-MNIST shards, then run over the 60,000 training images and random augmentations of
them (rotation, scale, shift, flip, contrast; view 0 is the image itself) up to --database rows. Queries: the
first --queries test images. Labels are the source images' classes. Model, embeddings and HNSW graphs are cached
under runs/bench/ (never committed), so reruns only search.

Every configuration runs on the same faiss threads, round after round (exact, funnel 1, funnel 2, ..., exact,
...), and its speed-up is the median over rounds of exact time / its time in that round. recall@10 is the share
of the exact full-width top-10 a configuration returns; mAP@10 is the MRL paper's (label-based: sum of precision
at each same-class hit, divided by 10).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # steadier multi-thread faiss when the other core is busy

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import CACHE, fmnist_shards, machine, median_ratio, write_result  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mrl_clip import models  # noqa: E402
from mrl_clip.eval.report import render_table  # noqa: E402
from mrl_clip.files import atomic_write  # noqa: E402
from mrl_clip.search.index import EmbeddingIndex, format_funnel, parse_funnel  # noqa: E402
from pipelines import fashion_mnist  # noqa: E402

MODEL = "MRL-Tiny-28-P7-768"
DIMS = [8, 16, 32, 64, 128, 256, 512, 768]
# (label, stage-1 kind, funnel); "exact" rows are single-stage flat searches
CONFIGS = [
    ("exact", "flat", "768:10"),
    ("exact", "flat", "32:10"),
    ("exact", "flat", "64:10"),
    ("funnel", "flat", "16:800,768:10"),
    ("funnel", "flat", "32:200,768:10"),
    ("funnel", "flat", "32:400,768:10"),
    ("funnel", "flat", "64:200,768:10"),
    ("funnel", "flat", "16:200,32:100,64:50,128:25,768:10"),
    ("funnel", "hnsw", "32:100,768:10"),
    ("funnel", "hnsw", "32:200,768:10"),
    ("funnel", "hnsw", "32:400,768:10"),
    ("funnel", "hnsw", "32:800,768:10"),
]


def train_model(work, steps, quick) -> str:
    """A briefly trained MODEL (cached): returns its local-dir: name."""
    run_dir = work / f"{MODEL}-{steps}steps"
    if (run_dir / "export" / "open_clip_config.json").is_file():
        return f"local-dir:{run_dir / 'export'}"
    shards, _ = fmnist_shards(quick)
    cmd = [sys.executable, "-m", "mrl_clip.train", "--model", MODEL, "--train-data", shards,
           "--dims", ",".join(map(str, DIMS)), "--batch-size", "128", "--train-num-samples", str(steps * 128),
           "--epochs", "1", "--lr", "1e-3", "--warmup", str(max(1, steps // 20)), "--workers", "1",
           "--threads", "2", "--logs", str(work), "--name", run_dir.name, "--save-every-n-steps", str(steps),
           "--log-every-n-steps", "50"]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=CACHE.parent.parent)
    return f"local-dir:{run_dir / 'export'}"


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 28, 28] uint8 -> [B, 1, 28, 28] in [0, 1]: rotation +-12 deg, scale +-10%, shift +-3 px, horizontal
    flip, contrast 0.7-1.3, brightness -0.05..0.1."""
    x = images.float().div(255).unsqueeze(1)
    n = len(x)
    u = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    angle, scale, shift = u(n) * math.radians(12), 1 + 0.1 * u(n), u(n, 2) * (3 / 14)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    contrast = 1 + 0.3 * u(n)[:, None, None, None]
    brightness = (0.025 + 0.075 * u(n))[:, None, None, None]
    return (x * contrast + brightness).clamp(0, 1)


def to_model_input(x: torch.Tensor, preprocess) -> torch.Tensor:
    """The model's val transform (28 px already: resize and crop are no-ops; grey -> RGB, normalise) on a batch."""
    normalize = preprocess.transforms[-1]
    return normalize(x.expand(-1, 3, -1, -1))


@torch.inference_mode()
def embed(model, preprocess, images, rows, seed, desc, batch_size=2048) -> np.ndarray:
    """[rows, width] float16 embeddings: row v * len(images) + i is view v of image i (view 0 unaugmented)."""
    out = np.empty((rows, models.embed_width(MODEL)), dtype=np.float16)
    progress = tqdm(total=rows, desc=desc, unit="img", mininterval=5)
    start = 0
    while start < rows:
        view, first = divmod(start, len(images))
        count = min(batch_size, rows - start, len(images) - first)  # a batch never spans two views
        batch = images[first:first + count]
        if view == 0:
            x = batch.float().div(255).unsqueeze(1)
        else:
            x = augment(batch, torch.Generator().manual_seed(seed * 1_000_003 + start))
        out[start:start + count] = model.encode_image(to_model_input(x, preprocess)).numpy()
        progress.update(count)
        start += count
    progress.close()
    return out


def cached_embeddings(path, compute) -> np.ndarray:
    if path.is_file():
        return np.load(path, mmap_mode="r")
    value = compute()

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npy" to the temporary name
            np.save(f, value)

    atomic_write(path, write)
    return value


def check_transform(preprocess, images):
    """The batched tensor path must give the model what its own PIL transform gives."""
    from PIL import Image

    ours = to_model_input(images[:8].float().div(255).unsqueeze(1), preprocess)
    theirs = torch.stack([preprocess(Image.fromarray(im.numpy())) for im in images[:8]])
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def map_at_k(ids, db_labels, query_labels, k=10) -> float:
    """The MRL paper's mAP@k: per query, the precision at each rank holding a same-class item, summed, over k."""
    matches = db_labels[ids[:, :k]] == query_labels[:, None]
    precision = np.cumsum(matches, axis=1) / np.arange(1, k + 1)
    return float(np.mean((precision * matches).sum(axis=1) / k))


def overlap_at_k(ids, reference, k=10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, reference)]))


def flops_per_query(stages, rows) -> int:
    return rows * stages[0].dim + sum(prev.k * s.dim for prev, s in zip(stages, stages[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20k rows, 100 queries, 1 round: checks the script runs")
    p.add_argument("--database", type=int, default=None, help="database rows (default 1,000,000)")
    p.add_argument("--queries", type=int, default=None, help="query images (default 1,000)")
    p.add_argument("--repeats", type=int, default=None, help="rounds of every configuration (default 3)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps of the model (default 300)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hnsw-neighbours", type=int, default=32)
    args = p.parse_args()
    rows = args.database or (20_000 if args.quick else 1_000_000)
    n_queries = args.queries or (100 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.train_steps or (5 if args.quick else 300)
    work = CACHE / ("quick" if args.quick else "funnel")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    started = time.time()
    model_name = train_model(work, steps, args.quick)
    model, _, preprocess, _ = models.create(model_name)
    model.eval()
    train_images, train_labels = (torch.from_numpy(np.array(a)) for a in fashion_mnist.load_split(
        fashion_mnist.DEBIAN_DIR, "train"))
    test_images, test_labels = (torch.from_numpy(np.array(a)) for a in fashion_mnist.load_split(
        fashion_mnist.DEBIAN_DIR, "test"))
    if args.quick:
        train_images, train_labels = train_images[:2048], train_labels[:2048]
    check_transform(preprocess, train_images)
    database = cached_embeddings(work / f"database_{MODEL}_{steps}steps_{rows}.npy", lambda: embed(
        model, preprocess, train_images, rows, seed=0, desc="embedding database"))
    queries = cached_embeddings(work / f"queries_{MODEL}_{steps}steps_{n_queries}.npy", lambda: embed(
        model, preprocess, test_images[:n_queries], n_queries, seed=1, desc="embedding queries"))
    db_labels = train_labels.numpy()[np.arange(rows) % len(train_images)]
    query_labels = test_labels.numpy()[:n_queries]
    queries = np.asarray(queries, dtype=np.float32)
    prepared_at = time.time()

    index = EmbeddingIndex(database, "float32")
    del database
    hnsw_dims = sorted({parse_funnel(f)[0].dim for _, kind, f in CONFIGS if kind == "hnsw"})
    hnsw_build_s = {}
    for dim in hnsw_dims:
        path = work / f"hnsw{args.hnsw_neighbours}_dim{dim}_{MODEL}_{steps}steps_{rows}.faissindex"
        if path.is_file():
            index.use_hnsw(dim, faiss.read_index(str(path)))
        else:
            t = time.perf_counter()
            print(f"building HNSW{args.hnsw_neighbours} over {rows:,} {dim}-d prefixes", flush=True)
            hnsw = index.build_hnsw(dim, args.hnsw_neighbours)
            hnsw_build_s[dim] = time.perf_counter() - t
            atomic_write(path, lambda tmp: faiss.write_index(hnsw, tmp))
    for dim in {parse_funnel(f)[0].dim for _, _, f in CONFIGS}:
        index.prefix(dim)  # the stage-1 prefix copies are part of the index, not of a timed search

    def run(kind, funnel):
        stages = parse_funnel(funnel)
        # HNSW stage 1: efSearch = K1, the smallest that returns K1 candidates
        return index.funnel_search(queries, stages, hnsw_ef=stages[0].k if kind == "hnsw" else None)

    machine_at_start = machine(args.threads)  # load average just before the timed rounds
    times = {i: [] for i in range(len(CONFIGS))}
    results = {}
    for round_ in range(repeats):
        for i, (_, kind, funnel) in enumerate(tqdm(CONFIGS, desc=f"round {round_ + 1}/{repeats}", leave=False)):
            t = time.perf_counter()
            results[i] = run(kind, funnel)
            times[i].append(time.perf_counter() - t)

    exact_ids = results[0].ids
    rows_out, table = [], []
    for i, (label, kind, funnel) in enumerate(CONFIGS):
        stages = parse_funnel(funnel)
        entry = {"config": f"{label} {funnel}" + (f" (HNSW{args.hnsw_neighbours} stage 1)" if kind == "hnsw" else ""),
                 "kind": label, "stage1": kind, "funnel": format_funnel(stages),
                 "ms_per_query": 1000 * statistics.median(times[i]) / n_queries,
                 "speedup_vs_exact": median_ratio(times[0], times[i]),
                 "recall@10_vs_exact": overlap_at_k(results[i].ids, exact_ids),
                 "mAP@10": map_at_k(results[i].ids, db_labels, query_labels),
                 # a flat stage 1 scores every row; an HNSW one visits a graph-dependent few, not counted here
                 "flops_ratio_vs_exact": (flops_per_query(parse_funnel("768:10"), rows) / flops_per_query(stages, rows)
                                          if kind == "flat" else None),
                 "stage_seconds_last_round": results[i].stage_seconds, "seconds_per_round": times[i]}
        rows_out.append(entry)
        table.append([entry["config"], f"{entry['ms_per_query']:.3f}", f"{entry['speedup_vs_exact']:.1f}x",
                      f"{entry['recall@10_vs_exact']:.4f}", f"{100 * entry['mAP@10']:.2f}",
                      f"{entry['flops_ratio_vs_exact']:.0f}x" if entry["flops_ratio_vs_exact"] else "-"])
    print(f"{rows:,} x 768 database ({MODEL}, trained {steps} steps), {n_queries} queries, faiss "
          f"{faiss.__version__}, {args.threads} threads, {repeats} interleaved rounds")
    print(render_table(["configuration", "ms/query", "speed-up", "recall@10 vs exact", "mAP@10 (%)",
                        "fewer FLOPs (flat)"], table))
    good = [r for r in rows_out if r["kind"] == "funnel" and r["recall@10_vs_exact"] >= 0.99]
    best = max(good, key=lambda r: r["speedup_vs_exact"]) if good else None
    if best:
        print(f"fastest funnel with recall@10 >= 0.99 of exact: {best['config']} -> {best['speedup_vs_exact']:.1f}x "
              f"(goal >= 14x)")
    write_result("funnel", {
        "benchmark": "funnel", "model": MODEL, "train_steps": steps, "train_dims": DIMS, "database_rows": rows,
        "width": 768, "queries": n_queries, "repeats": repeats, "threads": args.threads,
        "hnsw_neighbours": args.hnsw_neighbours, "hnsw_build_s": hnsw_build_s,
        "embeddings": "float16 on disk, searched as float32; database = 60k train images x augmented views",
        "goal": "speed-up >= 14x at recall@10 >= 0.99 of exact", "best_at_recall_0.99": best,
        "configs": rows_out, "prepare_s": prepared_at - started, "total_s": time.time() - started,
        "machine": machine_at_start}, args.quick)


if __name__ == "__main__":
    main()
