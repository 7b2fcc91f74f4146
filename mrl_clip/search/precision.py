"""Funnel stages below float32: faiss indexes over binary, int8 or float16 codes of the re-normalised m-d prefixes.

    binary   sign bits (x > 0) of the prefix packed with np.packbits; Hamming distance h (faiss IndexBinaryFlat /
             IndexBinaryHNSW). Reported as the cosine of the +-1 sign vectors, 1 - 2h/m.
    int8     faiss ScalarQuantizer QT_8bit, per-dimension min/max (RS_minmax) trained on the database prefixes;
             inner product of the float query with the decoded codes (IndexScalarQuantizer, METRIC_INNER_PRODUCT).
    float16  the same with QT_fp16.
    float32  the prefixes themselves (mrl_clip.search.index).

Float stage-1 indexes take full-width queries: a faiss IndexPreTransform whose RemapDimensionsTransform keeps the
first m dims and whose NormalizationTransform re-normalises them, so the prefix view is faiss's, not ours.
"""
import faiss
import numpy as np

from .. import quantize
from ..errors import UserError
from ..quantize import normalized_prefix

PRECISIONS = tuple(reversed(quantize.PRECISIONS))   # rising: a funnel's precision may not drop
SQ_TYPES = {"int8": faiss.ScalarQuantizer.QT_8bit, "float16": faiss.ScalarQuantizer.QT_fp16}
_CHUNK = 65536


def check_precision(precision: str, dim: int, flag: str = "--funnel") -> str:
    quantize.check_precision(precision, flag)
    if precision == "binary" and dim % 8:
        raise UserError(f"{flag}: a binary stage needs a dim that is a multiple of 8 (packed bits), got {dim}")
    return precision


def chunks(vectors, dim=None):
    """float32 blocks of rows (the first dim columns), for storage that may be float16."""
    for start in range(0, len(vectors), _CHUNK):
        yield np.ascontiguousarray(vectors[start:start + _CHUNK, :dim], dtype=np.float32)


def sign_codes(x, dim: int) -> np.ndarray:
    """[rows, dim / 8] uint8: the prefix's sign bits (x > 0; re-normalising does not change a sign)."""
    return np.concatenate([np.packbits(block > 0, axis=1) for block in chunks(x, dim)])


def prefix_transform(width: int, dim: int, sub_index) -> faiss.IndexPreTransform:
    """sub_index, fed the re-normalised dim-prefix of full-width vectors."""
    index = faiss.IndexPreTransform(sub_index)
    index.prepend_transform(faiss.NormalizationTransform(dim, 2.0))
    index.prepend_transform(faiss.RemapDimensionsTransform(width, dim, False))
    return index


def new_stage1(width: int, dim: int, precision: str, hnsw: int = 0):
    """An empty faiss index for a stage 1 at dim and precision: flat (hnsw=0; not for float32) or an HNSW graph
    with hnsw links."""
    ip = faiss.METRIC_INNER_PRODUCT
    if precision == "binary":
        return faiss.IndexBinaryHNSW(dim, hnsw) if hnsw else faiss.IndexBinaryFlat(dim)
    if precision == "float32":   # flat float32 needs no index: mrl_clip.search.index searches the prefixes
        sub = faiss.IndexHNSWFlat(dim, hnsw, ip)
    elif hnsw:
        sub = faiss.IndexHNSWSQ(dim, SQ_TYPES[precision], hnsw, ip)
    else:
        sub = faiss.IndexScalarQuantizer(dim, SQ_TYPES[precision], ip)
    return prefix_transform(width, dim, sub)


def build_stage1(vectors, dim: int, precision: str, hnsw: int = 0, ef_construction: int = 40):
    """A stage-1 faiss index over every row of vectors (full width, float32 or float16)."""
    index = new_stage1(vectors.shape[1], dim, precision, hnsw)
    if precision == "binary":
        if hnsw:
            index.hnsw.efConstruction = ef_construction
        index.add(sign_codes(vectors, dim))
        return index
    sub = faiss.downcast_index(index.index)
    if hnsw:
        sub.hnsw.efConstruction = ef_construction
    if not sub.is_trained:
        sub.train(prefix_ranges(vectors, dim))
        index.is_trained = True
    for block in chunks(vectors):
        index.add(block)
    return index


def prefix_ranges(vectors, dim: int) -> np.ndarray:
    """[2, dim]: each dim's min and max over the re-normalised prefixes of all rows. RS_minmax training keeps
    exactly these, so training on these two rows is training on every row, without a float32 copy of them all."""
    lows, highs = zip(*[(p.min(0), p.max(0)) for p in (normalized_prefix(b, dim) for b in chunks(vectors, dim))])
    return np.stack([np.min(lows, 0), np.max(highs, 0)]).astype(np.float32)


def stage1_search(index, queries: np.ndarray, dim: int, precision: str, k: int, ef=None) -> tuple:
    """(scores, ids) of a stage-1 index for full-width float32 queries; ef sets an HNSW graph's efSearch."""
    if precision == "binary":
        if ef is not None:
            index.hnsw.efSearch = max(ef, k)
        distances, ids = index.search(sign_codes(queries, dim), k)
        return (1 - 2 * distances.astype(np.float32) / dim), ids
    if ef is not None:
        faiss.downcast_index(index.index).hnsw.efSearch = max(ef, k)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class PrefixCodes:
    """Codes of every row at (dim, precision) for re-ranking a shortlist: the candidates' codes are gathered and
    scored against the query's (binary: Hamming by XOR and popcount) or decoded (faiss ScalarQuantizer.decode)
    and scored against the float query."""

    def __init__(self, vectors, dim: int, precision: str):
        self.dim, self.precision = dim, precision
        if precision == "binary":
            self.codes = sign_codes(vectors, dim)
            return
        self.quantizer = faiss.ScalarQuantizer(dim, SQ_TYPES[precision])
        self.quantizer.train(prefix_ranges(vectors, dim))
        self.codes = np.concatenate([self.quantizer.compute_codes(normalized_prefix(block, dim))
                                     for block in chunks(vectors, dim)])

    def query(self, queries: np.ndarray) -> np.ndarray:
        """What a query is scored as: its packed sign bits, or its re-normalised float32 prefix."""
        return sign_codes(queries, self.dim) if self.precision == "binary" else normalized_prefix(queries, self.dim)

    def scores(self, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """[block, candidates] scores of rows[q] against self.query(...)[q]: binary 1 - 2h/dim, else the inner
        product with the decoded codes."""
        if self.precision == "binary":
            distances = np.bitwise_count(self.codes[rows] ^ queries[:, None, :]).sum(-1, dtype=np.int32)
            return 1 - 2 * distances.astype(np.float32) / self.dim
        decoded = self.quantizer.decode(np.ascontiguousarray(self.codes[rows].reshape(-1, self.codes.shape[1])))
        return np.matmul(decoded.reshape(*rows.shape, self.dim), queries[:, :, None])[..., 0]
