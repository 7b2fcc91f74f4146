"""Query a file written by `python -m mrl_clip embed`: exact search at any prefix dim, or funnel search.

    python -m mrl_clip search --index photos.npz --text "a red dress" --text "a sandal" --k 5
    python -m mrl_clip search --index photos.npz --image query.png --dim 64
    python -m mrl_clip search --index photos.npz --queries captions.npz --funnel 32:400,768:10 --output hits.json
    python -m mrl_clip search --index photos.index --text "a red dress" --funnel binary@256:2000,768:10

Queries are texts (--text), images (--image), or every row of another embeddings file (--queries); texts and
images are encoded with the model recorded in the index file (or --model / --pretrained). Results are ranked by
the cosine similarity of the dim-prefixes (slice, then re-normalise); --funnel shortlists at a small dim and
re-ranks at larger ones (see mrl_clip.search.index), returning its final K per query. --index also takes an index
file built once by `python -m mrl_clip index build`: a funnel whose stage 1 has the file's dim and precision
searches the file's stage-1 index (an HNSW graph with efSearch = --hnsw-ef, default the stage's K).

Files written with `mrl_clip embed --dim M --precision P` hold M-d prefixes: queries are encoded at full width,
sliced to M and re-normalised. float32/float16 prefixes search as above (any --dim up to M); int8 codes are
searched with the float query against the decoded codes (faiss IndexScalarQuantizer, inner product) and binary
ones by the Hamming distance h of the query's sign bits (faiss IndexBinaryFlat; score 1 - 2h/M, the cosine of the
+-1 sign vectors, as a binary funnel stage scores), at M only.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .. import models, nesting, quantize
from ..adaptor import adaptor_identity
from ..errors import ArgumentParser, UserError
from ..files import write_json
from ..prefix import normalized_prefix
from .embed import embed_images, embed_texts, read_embeddings
from .index import EmbeddingIndex, SearchResult, format_funnel, parse_funnel
from .store import is_index_file, load_index


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip search", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True,
                   help="embeddings file written by `mrl_clip embed`, or an index file from `mrl_clip index build`")
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
    p.add_argument("--adaptor", default=None, help="the Matryoshka adaptor the file was embedded through "
                   "(default: the one the file records)")
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


def query_adaptor(path, meta):
    """The adaptor queries go through: the one the file was embedded through, which --adaptor may name again
    (the same file, by digest) but not change."""
    recorded = meta.get("adaptor")
    if path is None:
        if recorded and not Path(recorded["path"]).is_file():
            raise UserError(f"the index was embedded through the adaptor {recorded['path']}, which is gone: pass "
                            f"--adaptor with that file")
        return recorded["path"] if recorded else None
    if not recorded or adaptor_identity(path)["sha256"] != recorded["sha256"]:
        raise UserError(f"--adaptor {path} is not the adaptor the index was embedded through "
                        f"({recorded['path'] if recorded else 'none'})")
    return path


def encode_queries(args, meta) -> tuple:
    """(query embeddings [queries, width or a --queries file's dim], query labels)."""
    vectors, labels = [], []
    if args.text or args.image:
        name = args.model or meta.get("model")
        pretrained = args.pretrained if args.model else (args.pretrained or meta.get("pretrained"))
        if not name:
            raise UserError("the index file names no model: pass --model")
        model, _, preprocess, tokenizer = models.create(name, pretrained, device=args.device,
                                                        adaptor=query_adaptor(args.adaptor, meta))
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
        if vectors[0].shape[1] != meta.get("width", vectors[0].shape[1]):
            raise UserError(f"{name} embeds {vectors[0].shape[1]}-d vectors, the index was written from a "
                            f"{meta['width']}-d model")
    if args.queries:
        stored = read_embeddings(args.queries)
        if stored.precision not in ("float32", "float16"):
            raise UserError(f"--queries {args.queries} holds {stored.precision} codes: queries must be float")
        if stored.width != meta.get("width", stored.width):
            raise UserError(f"--queries {args.queries} comes from a {stored.width}-d model, the index from a "
                            f"{meta['width']}-d one")
        vectors.append(np.asarray(stored.codes, dtype=np.float32))
        labels += stored.items
    width = min(v.shape[1] for v in vectors)
    return np.concatenate([v[:, :width] for v in vectors]), labels


def search_codes(args, stored, queries) -> tuple:
    """(SearchResult, k, how) over an int8 or binary file, at its dim."""
    if args.funnel:
        raise UserError(f"--funnel needs float embeddings; {args.index} holds {stored.precision} codes")
    if args.dim not in (None, stored.dim):
        raise UserError(f"--dim {args.dim}: {args.index} holds {stored.precision} codes of the {stored.dim}-d "
                        f"prefix, searchable at {stored.dim} only")
    k = args.k or 10
    scores, ids = quantize.search(normalized_prefix(queries, stored.dim), stored.codes, stored.precision,
                                  stored.dim, k, stored.ranges)
    return SearchResult(scores, ids), k, f"exact at dim {stored.dim}, {stored.precision}"


def stage1_ef(stages, spec, hnsw_ef):
    """efSearch for the funnel's stage 1 when the index file's HNSW graph serves it, else None (flat)."""
    if spec is None or not spec.hnsw or (stages[0].dim, stages[0].precision) != (spec.dim, spec.precision):
        return None
    return hnsw_ef or stages[0].k


def warn_untrained(args, meta, stages, width, quantized) -> None:
    """One line when the dims searched (--dim, the funnel's stages, a code file's dim) are ones the embedding
    model was not trained to nest, as the file records it (`mrl_clip embed` writes meta "nesting"); a file from
    before it did says nothing: its model's record is unknown."""
    dims = [stage.dim for stage in stages] if stages else [width if quantized else args.dim or width]
    nesting.warn(f"{meta.get('model')} (the model of {args.index})", meta.get("nesting"),
                 int(meta.get("width", width)), dims)


def main(argv=None):
    args = parse_args(argv)
    if is_index_file(args.index):
        index, items, meta, spec = load_index(args.index)
        stored, width, quantized = None, index.width, False
    else:
        stored, spec = read_embeddings(args.index), None
        items, meta, width = stored.items, stored.meta, stored.dim
        quantized = stored.precision in ("int8", "binary")
        index = None if quantized else EmbeddingIndex(stored.codes, str(stored.codes.dtype))
    stages = parse_funnel(args.funnel, width, args.k) if args.funnel and not quantized else None
    if args.dim is not None and not 1 <= args.dim <= width:
        raise UserError(f"--dim {args.dim} is outside 1..{width} (the width of {args.index})")
    warn_untrained(args, meta, stages, width, quantized)
    queries, labels = encode_queries(args, meta)
    if queries.shape[1] < width:
        raise UserError(f"the queries are {queries.shape[1]}-d but {args.index} holds {width}-d embeddings")
    started = time.perf_counter()
    if quantized:
        result, k, how = search_codes(args, stored, queries)
    else:
        # a prefix file: the queries' dim-prefix, re-normalised by the index as it normalises what it is given
        queries = queries[:, :width]
        if stages:
            result = index.funnel_search(queries, stages, hnsw_ef=stage1_ef(stages, spec, args.hnsw_ef))
            k = args.k or stages[-1].k
        else:
            k = args.k or 10
            result = index.search(queries, k, args.dim)
        how = f"funnel {format_funnel(stages)}" if stages else f"exact at dim {args.dim or width}"
        if stages and stage1_ef(stages, spec, args.hnsw_ef):
            how += f" (stage 1: the index file's {spec.label()}, efSearch {stage1_ef(stages, spec, args.hnsw_ef)})"
    seconds = time.perf_counter() - started
    hits = []
    for label, scores, ids in zip(labels, result.scores, result.ids):
        found = [(float(s), int(i)) for s, i in zip(scores[:k], ids[:k]) if i >= 0]
        hits.append({"query": label, "results": [{"rank": r + 1, "id": i, "item": items[i], "score": s}
                                                 for r, (s, i) in enumerate(found)]})
        print(f"query: {label}")
        for hit in hits[-1]["results"]:
            print(f"  {hit['rank']:3d}  {hit['score']:.4f}  {hit['item']}")
    print(f"{len(labels)} queries, {how}, over {len(items)} items: {1000 * seconds / len(labels):.3f} ms/query")
    if args.output:
        write_json({"index": args.index, "search": how, "k": k, "ms_per_query": 1000 * seconds / len(labels),
                    "queries": hits}, args.output)
    return 0
