"""Build a funnel index once, then search it many times.

    python -m mrl_clip index build --embeddings photos.npz --stage1 hnsw32@32 --out photos.index
    python -m mrl_clip index build --embeddings photos.npz --stage1 binary@256 --out photos.index
    python -m mrl_clip index info photos.index

--stage1 is the structure funnel stage 1 searches: DIM (flat float32: nothing extra is stored, the prefix is cut
at load), PRECISION@DIM (flat over binary sign bits, int8 or float16 codes), hnswM@DIM (an HNSW graph with M links
over the float32 prefixes) or hnswM-PRECISION@DIM. The file holds the normalised full-width embeddings (for the
re-ranking stages), the items and the meta of the embeddings file, and the stage-1 faiss index; `mrl_clip.search
--index photos.index` and `mrl_clip.eval retrieval --index` load it instead of rebuilding.
"""
import argparse
import time
from pathlib import Path

from ..errors import ArgumentParser, UserError
from .embed import load_embeddings
from .index import EmbeddingIndex
from .store import build_index, load_index, parse_stage1, save_index


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip index", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True)
    build = tasks.add_parser("build", help="build an index file from an embeddings file (`mrl_clip embed`)")
    build.add_argument("--embeddings", required=True, help="the .npz written by `mrl_clip embed`")
    build.add_argument("--stage1", required=True, help="e.g. 32, binary@256, int8@64, hnsw32@32, hnsw32-int8@64")
    build.add_argument("--ef-construction", type=int, default=40, help="HNSW efConstruction (faiss's)")
    build.add_argument("--out", required=True, help="the index file to write")
    info = tasks.add_parser("info", help="check an index file (sizes, checksums) and describe it")
    info.add_argument("path")
    args = p.parse_args(argv)
    if args.task == "build" and args.ef_construction < 1:
        raise UserError("--ef-construction must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.task == "info":
        started = time.perf_counter()
        index, items, meta, spec = load_index(args.path)
        print(f"{args.path}: {len(index):,} items x {index.width} ({index.vectors.dtype}), stage 1 {spec.label()}, "
              f"model {meta.get('model')}; {Path(args.path).stat().st_size / 2 ** 20:.1f} MiB, checked and loaded "
              f"in {time.perf_counter() - started:.2f} s")
        return 0
    parse_stage1(args.stage1)   # a bad spec fails before the embeddings are read
    embeddings, items, meta = load_embeddings(args.embeddings)
    spec = parse_stage1(args.stage1, embeddings.shape[1])
    spec.ef_construction = args.ef_construction
    index = EmbeddingIndex(embeddings, str(embeddings.dtype))
    started = time.perf_counter()
    stage1 = build_index(index, spec)
    built = time.perf_counter() - started
    size = save_index(args.out, index, items, {**meta, "embeddings": str(args.embeddings)}, spec, stage1)
    print(f"wrote {args.out}: {len(index):,} items x {index.width}, stage 1 {spec.label()} (built in {built:.1f} s), "
          f"{size / 2 ** 20:.1f} MiB")
    return 0
