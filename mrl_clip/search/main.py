"""Query a file written by mrl_clip.embed: exact search at any prefix dim, or funnel search.

    python -m mrl_clip.search --index photos.npz --text "a red dress" --text "a sandal" --k 5
    python -m mrl_clip.search --index photos.npz --image query.png --dim 64
    python -m mrl_clip.search --index photos.npz --queries captions.npz --funnel 32:400,768:10 --output hits.json
    python -m mrl_clip.search --index photos.index --text "a red dress" --funnel binary@256:2000,768:10

Queries are texts (--text), images (--image), or every row of another embeddings file (--queries); texts and
images are encoded with the model recorded in the index file (or --model / --pretrained). Results are ranked by
the cosine similarity of the dim-prefixes (slice, then re-normalise); --funnel shortlists at a small dim and
re-ranks at larger ones (see mrl_clip.search.index), returning its final K per query. --index also takes an index
file built once by `python -m mrl_clip.index build`: a funnel whose stage 1 has the file's dim and precision
searches the file's stage-1 index (an HNSW graph with efSearch = --hnsw-ef, default the stage's K).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ArgumentParser, UserError
from ..files import write_json
from .embed import embed_images, embed_texts, load_embeddings
from .index import EmbeddingIndex, format_funnel, parse_funnel
from .store import is_index_file, load_index


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip.search", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True,
                   help="embeddings file written by mrl_clip.embed, or an index file from mrl_clip.index build")
    p.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file query (repeatable)")
    p.add_argument("--queries", default=None, help="an embeddings file whose rows are the queries")
    p.add_argument("--model", default=None, help="model for --text/--image (default: the index file's)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--k", type=int, default=None, help="results per query (default 10, or the funnel's last K)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dim", type=int, default=None, help="exact search at this prefix dim (default: full width)")
    mode.add_argument("--funnel", default=None, metavar="[PRECISION@]DIM:K,...",
                      help="funnel search, e.g. 32:400,768:10 or binary@256:2000,768:10")
    p.add_argument("--hnsw-ef", type=int, default=None,
                   help="efSearch of an index file's HNSW stage 1 (default: the funnel's first K)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not (args.text or args.image or args.queries):
        raise UserError("give at least one query: --text, --image or --queries")
    if args.k is not None and args.k < 1:
        raise UserError("--k must be at least 1")
    if args.hnsw_ef is not None and args.hnsw_ef < 1:
        raise UserError("--hnsw-ef must be at least 1")
    return args


def encode_queries(args, meta) -> tuple:
    """(query embeddings [queries, width], query labels)."""
    vectors, labels = [], []
    if args.text or args.image:
        from .. import models

        name = args.model or meta.get("model")
        pretrained = args.pretrained if args.model else (args.pretrained or meta.get("pretrained"))
        if not name:
            raise UserError("the index file names no model: pass --model")
        model, _, preprocess, tokenizer = models.create(name, pretrained, device=args.device)
        model.eval()
        if args.text:
            vectors.append(embed_texts(model, tokenizer, args.text, args.device).numpy())
            labels += args.text
        if args.image:
            missing = [path for path in args.image if not Path(path).is_file()]
            if missing:
                raise UserError(f"--image file not found: {missing[0]}")
            vectors.append(embed_images(model, preprocess, args.image, args.device).numpy())
            labels += args.image
    if args.queries:
        embeddings, items, _ = load_embeddings(args.queries)
        vectors.append(np.asarray(embeddings, dtype=np.float32))
        labels += items
    return np.concatenate(vectors), labels


def open_index(path) -> tuple:
    """(EmbeddingIndex, items, meta, stage-1 spec or None) from an index file or an embeddings file."""
    if is_index_file(path):
        return load_index(path)
    embeddings, items, meta = load_embeddings(path)
    return EmbeddingIndex(embeddings, str(embeddings.dtype)), items, meta, None


def stage1_ef(stages, spec, hnsw_ef):
    """efSearch for the funnel's stage 1 when the index file's HNSW graph serves it, else None (flat)."""
    if spec is None or not spec.hnsw or (stages[0].dim, stages[0].precision) != (spec.dim, spec.precision):
        return None
    return hnsw_ef or stages[0].k


def main(argv=None):
    args = parse_args(argv)
    index, items, meta, spec = open_index(args.index)
    width = index.width
    stages = parse_funnel(args.funnel, width, args.k) if args.funnel else None
    if args.dim is not None and not 1 <= args.dim <= width:
        raise UserError(f"--dim {args.dim} is outside 1..{width} (the width of {args.index})")
    queries, labels = encode_queries(args, meta)
    if queries.shape[1] != width:
        raise UserError(f"the queries are {queries.shape[1]}-d but {args.index} holds {width}-d embeddings")
    started = time.perf_counter()
    if stages:
        result = index.funnel_search(queries, stages, hnsw_ef=stage1_ef(stages, spec, args.hnsw_ef))
        k = args.k or stages[-1].k
    else:
        k = args.k or 10
        result = index.search(queries, k, args.dim)
    seconds = time.perf_counter() - started
    hits = []
    for label, scores, ids in zip(labels, result.scores, result.ids):
        found = [(float(s), int(i)) for s, i in zip(scores[:k], ids[:k]) if i >= 0]
        hits.append({"query": label, "results": [{"rank": r + 1, "id": i, "item": items[i], "score": s}
                                                 for r, (s, i) in enumerate(found)]})
        print(f"query: {label}")
        for hit in hits[-1]["results"]:
            print(f"  {hit['rank']:3d}  {hit['score']:.4f}  {hit['item']}")
    how = f"funnel {format_funnel(stages)}" if stages else f"exact at dim {args.dim or width}"
    if stages and stage1_ef(stages, spec, args.hnsw_ef):
        how += f" (stage 1: the index file's {spec.label()}, efSearch {stage1_ef(stages, spec, args.hnsw_ef)})"
    print(f"{len(labels)} queries, {how}, over {len(items)} items: {1000 * seconds / len(labels):.3f} ms/query")
    if args.output:
        write_json({"index": args.index, "search": how, "k": k, "ms_per_query": 1000 * seconds / len(labels),
                    "queries": hits}, args.output)
    return 0
