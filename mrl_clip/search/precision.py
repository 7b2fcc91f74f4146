"""Funnel stages below float32: faiss structures over mrl_clip.quantize's codes of the re-normalised m-d prefixes.

    binary   quantize's packed sign bits, any m (zero bits pad m up to quantize.code_bits(m), as in a file written
             by `embed --precision binary`); Hamming distance h (faiss IndexBinaryFlat / IndexBinaryHNSW), scored
             as quantize scores it: 1 - 2h/m, the cosine of the +-1 sign vectors.
    int8     quantize's QT_8bit codes and ranges (calibrated on the database prefixes); the float query against
             the decoded codes (IndexScalarQuantizer / IndexHNSWSQ, METRIC_INNER_PRODUCT).
    float16  the same with QT_fp16.
    float32  the prefixes themselves (mrl_clip.search.index), or an IndexHNSWFlat graph over them.

A flat index holds exactly quantize's codes, so a stage 1 and a re-rank at the same (dim, precision) score a row
from the same code. An HNSW graph needs the vectors to link them: faiss encodes the rows it adds, with quantize's
quantizer (its ranges) for int8. Float stage-1 indexes take full-width queries: a faiss IndexPreTransform whose
RemapDimensionsTransform keeps the first m dims and whose NormalizationTransform re-normalises them.
"""
import faiss
import numpy as np

from .. import quantize
from ..prefix import chunks, normalized_prefix


def prefix_transform(width: int, dim: int, sub_index) -> faiss.IndexPreTransform:
    """sub_index, fed the re-normalised dim-prefix of full-width vectors."""
    index = faiss.IndexPreTransform(sub_index)
    index.prepend_transform(faiss.NormalizationTransform(dim, 2.0))
    index.prepend_transform(faiss.RemapDimensionsTransform(width, dim, False))
    return index


def build_stage1(vectors, dim: int, precision: str, hnsw: int = 0, ef_construction: int = 40):
    """A stage-1 faiss index over every row of vectors (full width, float32 or float16) at dim and precision:
    flat (hnsw=0) over quantize's codes, or an HNSW graph with hnsw links per node."""
    if precision == "binary":
        codes = quantize.prefix_codes(vectors, dim, "binary")[0]
        if not hnsw:
            return quantize.flat_index(codes, "binary", dim)
        index = faiss.IndexBinaryHNSW(quantize.code_bits(dim), hnsw)
        index.hnsw.efConstruction = ef_construction
        index.add(codes)
        return index
    if not hnsw:
        codes, ranges = quantize.prefix_codes(vectors, dim, precision)
        return prefix_transform(vectors.shape[1], dim, quantize.flat_index(codes, precision, dim, ranges))
    ip = faiss.METRIC_INNER_PRODUCT
    if precision == "float32":
        sub = faiss.IndexHNSWFlat(dim, hnsw, ip)
    else:
        sub = faiss.IndexHNSWSQ(dim, quantize.SQ_TYPES[precision], hnsw, ip)
    if precision == "int8":
        storage = faiss.downcast_index(sub.storage)
        storage.sq = quantize.scalar_quantizer(quantize.prefix_ranges(vectors, dim))
        storage.is_trained = sub.is_trained = True
    sub.hnsw.efConstruction = ef_construction
    index = prefix_transform(vectors.shape[1], dim, sub)
    index.is_trained = True
    for block in chunks(vectors):
        index.add(block)
    return index


def stage1_search(index, queries: np.ndarray, dim: int, precision: str, k: int, ef=None) -> tuple:
    """(scores, ids) of a stage-1 index for full-width float32 queries; ef sets an HNSW graph's efSearch."""
    if precision == "binary":
        if ef is not None:
            index.hnsw.efSearch = max(ef, k)
        distances, ids = index.search(quantize.prefix_codes(queries, dim, "binary")[0], k)
        return quantize.binary_scores(distances, dim), ids
    if ef is not None:
        faiss.downcast_index(index.index).hnsw.efSearch = max(ef, k)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class PrefixCodes:
    """quantize's codes of every row at (dim, precision), for re-ranking a shortlist: the candidates' codes are
    gathered and scored against the query's float32 prefix by quantize.score."""

    def __init__(self, vectors, dim: int, precision: str):
        self.dim, self.precision = dim, precision
        self.codes, self.ranges = quantize.prefix_codes(vectors, dim, precision)

    def query(self, queries: np.ndarray) -> np.ndarray:
        return normalized_prefix(queries, self.dim)

    def scores(self, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """[block, candidates] scores of the rows rows[q] against queries[q] (a block of self.query(...))."""
        return quantize.score(queries, self.codes[rows], self.precision, self.dim, self.ranges)
