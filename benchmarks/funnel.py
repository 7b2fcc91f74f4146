"""Funnel (adaptive) retrieval against exact full-width search, over 1M embeddings of a trained MRL model.

    python benchmarks/funnel.py [--quick] [--database 1000000] [--subset 200000] [--queries 1000] [--repeats 3]
                                [--threads 2] [--configs CONFIG_SUBSTRING ...]

The database: MRL-Tiny-28-P7-768 (the demo's towers with 7-px patches, 16 tokens instead of 49, so that 1M images
embed in minutes on 2 cores; a 768-wide embedding) trained briefly with the Matryoshka loss over 8..768 on the
Fashion-MNIST shards, then run over the 60,000 training images and random augmentations of
them (rotation, scale, shift, flip, contrast; view 0 is the image itself) up to --database rows (--subset N
searches the first N of those, without embedding anything new). Queries: the first --queries test images. Labels
are the source images' classes. Model, embeddings and index files are cached under runs/bench/ (never committed),
so reruns only search.

Each stage-1 structure is built once into an index file (`mrl_clip index build`'s format: the float16 embeddings,
items, the faiss stage-1 index); the run loads each file and reports its size on disk against the float16
embeddings alone and its load time (read, checksums, faiss deserialise) against its build time. Searches run on
one float32 EmbeddingIndex with the loaded stage-1 indexes attached, as before.

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
from mrl_clip.search.precision import prefix_transform  # noqa: E402
from mrl_clip.search.store import attach, build_index, load_index, parse_stage1, save_index  # noqa: E402
from pipelines import fashion_mnist  # noqa: E402

MODEL = "MRL-Tiny-28-P7-768"
DIMS = [8, 16, 32, 64, 128, 256, 512, 768]
# (label, stage 1: "flat" float32 or an index file's --stage1 spec, funnel); "exact" rows are single-stage flat
CONFIGS = [
    ("exact", "flat", "768:10"),
    ("exact", "flat", "32:10"),
    ("exact", "flat", "64:10"),
    ("funnel", "flat", "16:800,768:10"),
    ("funnel", "flat", "32:400,768:10"),
    ("funnel", "flat", "64:200,768:10"),
    ("funnel", "flat", "16:200,32:100,64:50,128:25,768:10"),
    ("funnel", "hnsw32@32", "32:200,768:10"),
    ("funnel", "hnsw32@32", "32:400,768:10"),
    ("funnel", "hnsw32@64", "64:100,768:10"),
    ("funnel", "hnsw32@64", "64:150,768:10"),
    ("funnel", "hnsw32@64", "64:200,768:10"),
    ("funnel", "hnsw32@64", "64:200,128:50,768:10"),
    ("funnel", "binary@256", "binary@256:1000,768:10"),
    ("funnel", "binary@256", "binary@256:2000,768:10"),
    ("funnel", "int8@32", "int8@32:400,768:10"),
]
# also tried on a 200k subset (--subset 200000 --configs ...): binary@768 flat, HNSW over binary (IndexBinaryHNSW)
# and over int8 (IndexHNSWSQ) stage 1s, and binary re-rank stages; none beat the float32 HNSW ones there


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
    p.add_argument("--subset", type=int, default=None, help="search only the first N database rows")
    p.add_argument("--configs", nargs="*", default=None,
                   help="run only the configurations whose stage 1 or funnel contains one of these strings "
                        "(exact 768 always runs)")
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
    if args.subset:
        rows, database = min(args.subset, rows), database[:args.subset]
        work = work / f"subset{rows}"
    db_labels = train_labels.numpy()[np.arange(rows) % len(train_images)]
    query_labels = test_labels.numpy()[:n_queries]
    queries = np.asarray(queries, dtype=np.float32)
    prepared_at = time.time()

    configs = [c for c in CONFIGS if c[2] == "768:10" or not args.configs
               or any(word in c[1] or word in c[2] for word in args.configs)]
    index = EmbeddingIndex(database, "float32")
    files = index_files(index, database, sorted({c[1] for c in configs if c[1] != "flat"}), work,
                        f"{MODEL}_{steps}steps_{rows}")
    del database
    for _, stage1, funnel in configs:
        if stage1 == "flat":
            index.prefix(parse_funnel(funnel)[0].dim)  # the stage-1 prefix copies are part of the index

    def run(stage1, funnel):
        stages = parse_funnel(funnel)
        # an HNSW stage 1 searches with efSearch = K1, the smallest that returns K1 candidates
        return index.funnel_search(queries, stages, hnsw_ef=stages[0].k if "hnsw" in stage1 else None)

    machine_at_start = machine(args.threads)  # load average just before the timed rounds
    times = {i: [] for i in range(len(configs))}
    results = {}
    for round_ in range(repeats):
        for i, (_, stage1, funnel) in enumerate(tqdm(configs, desc=f"round {round_ + 1}/{repeats}", leave=False)):
            t = time.perf_counter()
            results[i] = run(stage1, funnel)
            times[i].append(time.perf_counter() - t)

    rows_out = [config_entry(config, times[i], times[0], results[i], results[0].ids, files, rows, n_queries,
                             db_labels, query_labels) for i, config in enumerate(configs)]
    print(f"{rows:,} x 768 database ({MODEL}, trained {steps} steps), {n_queries} queries, faiss "
          f"{faiss.__version__}, {args.threads} threads, {repeats} interleaved rounds")
    print(render_table(["configuration", "ms/query", "speed-up", "recall@10 vs exact", "mAP@10 (%)",
                        "fewer FLOPs (flat)", "file / embeddings", "load / build"], [table_row(r) for r in rows_out]))
    good = [r for r in rows_out if r["kind"] == "funnel" and r["recall@10_vs_exact"] >= 0.99]
    best = max(good, key=lambda r: r["speedup_vs_exact"]) if good else None
    if best:
        print(f"fastest funnel with recall@10 >= 0.99 of exact: {best['config']} -> {best['speedup_vs_exact']:.1f}x "
              f"(goal >= 25x)")
    write_result("funnel" if not args.subset else f"funnel_subset{rows}", {
        "benchmark": "funnel", "model": MODEL, "train_steps": steps, "train_dims": DIMS, "database_rows": rows,
        "width": 768, "queries": n_queries, "repeats": repeats, "threads": args.threads,
        "index_files": files,
        "embeddings": "float16 on disk, searched as float32; database = 60k train images x augmented views",
        "goal": "speed-up >= 25x at recall@10 >= 0.99 of exact", "best_at_recall_0.99": best,
        "configs": rows_out, "prepare_s": prepared_at - started, "total_s": time.time() - started,
        "machine": machine_at_start}, args.quick or bool(args.subset))


def config_entry(config, config_times, exact_times, result, exact_ids, files, rows, n_queries, db_labels,
                 query_labels) -> dict:
    label, stage1, funnel = config
    stages = parse_funnel(funnel)
    return {"config": f"{label} {funnel}" + (f" (stage 1: {stage1} index)" if stage1 != "flat" else ""),
            "kind": label, "stage1": stage1, "funnel": format_funnel(stages),
            "ms_per_query": 1000 * statistics.median(config_times) / n_queries,
            "speedup_vs_exact": median_ratio(exact_times, config_times),
            "recall@10_vs_exact": overlap_at_k(result.ids, exact_ids),
            "mAP@10": map_at_k(result.ids, db_labels, query_labels),
            # a flat float32 stage 1 scores every row at its dim; other stage 1s are not counted here
            "flops_ratio_vs_exact": (flops_per_query(parse_funnel("768:10"), rows) / flops_per_query(stages, rows)
                                     if stage1 == "flat" else None),
            "index_file": files.get(stage1),
            "stage_seconds_last_round": result.stage_seconds, "seconds_per_round": config_times}


def table_row(entry) -> list:
    file = entry["index_file"]
    return [entry["config"], f"{entry['ms_per_query']:.3f}", f"{entry['speedup_vs_exact']:.1f}x",
            f"{entry['recall@10_vs_exact']:.4f}", f"{100 * entry['mAP@10']:.2f}",
            f"{entry['flops_ratio_vs_exact']:.0f}x" if entry["flops_ratio_vs_exact"] else "-",
            f"{file['size_ratio_vs_embeddings']:.3f}" if file else "-",
            f"{file['load_vs_build']:.3f}" if file else "-"]


def index_files(index, database, specs, work, tag) -> dict:
    """Build (once, cached) and load an index file per stage-1 spec; attach each loaded stage-1 index to `index`.
    {spec: {"path", "bytes", "stage1_bytes", "size_ratio_vs_embeddings", "build_s", "load_s", "load_vs_build"}}."""
    out = {}
    embeddings_bytes = database.shape[0] * database.shape[1] * 2    # the float16 embeddings alone
    for text in specs:
        spec = parse_stage1(text, index.width)
        path = work / f"{text}_{tag}.index"
        if not path.is_file():
            stored = EmbeddingIndex(database, "float16")
            print(f"building stage 1 {text} over {len(stored):,} rows", flush=True)
            t = time.perf_counter()
            reused = reuse_old_graph(work, spec, tag, stored.width)
            stage1 = reused or build_index(stored, spec)
            build_s = time.perf_counter() - t
            save_index(path, stored, [], {"model": MODEL, "build_s": build_s, "reused_graph": bool(reused)}, spec,
                       stage1)
            del stored, stage1
        t = time.perf_counter()
        loaded, _, meta, _ = load_index(path)
        load_s = time.perf_counter() - t
        stage1 = (loaded.graphs if spec.hnsw else loaded.coded).get((spec.precision, spec.dim))
        attach(index, spec, stage1)
        size = path.stat().st_size
        out[text] = {"path": str(path.relative_to(CACHE.parent.parent)), "bytes": size,
                     "stage1_bytes": size - embeddings_bytes, "size_ratio_vs_embeddings": size / embeddings_bytes,
                     "build_s": meta["build_s"], "load_s": load_s, "load_vs_build": load_s / meta["build_s"],
                     "reused_graph": meta.get("reused_graph", False)}
        print(f"{text}: {size / 2 ** 20:.0f} MiB ({size / embeddings_bytes:.3f}x the float16 embeddings), loaded in "
              f"{load_s:.2f} s, built in {meta['build_s']:.1f} s", flush=True)
    return out


def reuse_old_graph(work, spec, tag, width):
    """The HNSW graph an earlier version of this benchmark cached (a bare IndexHNSWFlat over the prefixes), put
    behind the prefix transform instead of being built again. Its build time is then the old file's, unknown:
    the load / build ratio of such a file is against the time to wrap it, so it is marked (reused_graph)."""
    old = work / f"hnsw{spec.hnsw}_dim{spec.dim}_{tag}.faissindex"
    if spec.precision != "float32" or not spec.hnsw or not old.is_file():
        return None
    print(f"  reusing {old.name}", flush=True)
    return prefix_transform(width, spec.dim, faiss.read_index(str(old)))

if __name__ == "__main__":
    main()
