"""The codec of quantised Matryoshka prefixes: float16, int8 and binary codes of the re-normalised m-d prefix
x[:, :m] / ||x[:, :m]|| (mrl_clip.prefix), their calibration, decoding and scores. Everything that stores or
scores a prefix below float32 -- `embed --precision`, `eval --embedding-precision`, the precision stages of a
funnel and their faiss indexes (mrl_clip.search.precision) -- takes its codes, ranges and scores from here (an
HNSW graph alone has faiss encode the rows it links, with these ranges).

The database side is stored; the query side stays a float32 prefix, quantised only where the scoring needs it.

- float16: the database prefixes rounded to float16 by numpy (faiss's QT_fp16 encoder gives the same bits but at
  exact halfway ties, which numpy rounds to even); score = float32 query . decoded item (as faiss's
  IndexScalarQuantizer with inner product). 2m bytes a vector.
- int8: faiss's ScalarQuantizer QT_8bit with per-dim ranges (RS_minmax): vmin = min, vdiff = max - min over the
  DATABASE side's prefixes (`calibrate`); code = floor(255 * clip((x - vmin) / vdiff, 0, 1)) (faiss Codec8bit, so
  255 only at the maximum), decoded at the bin centre vmin + (code + 0.5) / 255 * vdiff. Stored as int8 = code - 128
  (sentence-transformers' int8 offset) plus the ranges [2, m] (min row, max row: the `ranges` argument of
  sentence-transformers' quantize_embeddings). Scored asymmetrically, as faiss's IndexScalarQuantizer with inner
  product: float32 query . decoded database vector. m bytes a vector (and 8m bytes of ranges per collection).
  sentence-transformers floors (x - min) / ((max - min) / 255) the same way, up to rounding at bin edges (a few
  codes in 10^4 differ by one), but does not clip values outside the calibration range (numpy's cast wraps them)
  and defines no decoding: its int8 codes are compared to each other as integers.
- binary: bit_j = x_j > 0 on both sides, packed with np.packbits along each row (8 dims a byte, first dim in the
  high bit). Any m: a prefix whose m is not a multiple of 8 is padded with zero bits to 8 * ceil(m / 8) on both
  sides (the width faiss's binary indexes take, `code_bits`), which adds nothing to a Hamming distance h. Score
  = 1 - 2h/m, the cosine of the +-1 sign vectors (their dot product m - 2h, divided by m), computed in float32 as
  1 - float32(2h) / m. ceil(m / 8) bytes a vector. Ties are many (m + 1 possible values): `ranking_scores` breaks
  them toward the lower database index, the order faiss's IndexBinaryFlat returns tied items in.
"""
import math

import faiss
import numpy as np

from .errors import UserError
from .prefix import normalized_blocks, normalized_prefix

PRECISIONS = ("float32", "float16", "int8", "binary")
BYTES_PER_DIM = {"float32": 4, "float16": 2, "int8": 1}
SQ_TYPES = {"int8": faiss.ScalarQuantizer.QT_8bit, "float16": faiss.ScalarQuantizer.QT_fp16}  # faiss types of the codes
INT8_OFFSET = 128  # faiss's codes are 0..255; stored int8 = code - 128, as sentence-transformers' int8


def check_precision(name: str, flag: str = "--precision") -> str:
    if name not in PRECISIONS:
        raise UserError(f"{flag}: unknown precision {name!r} (choose from {', '.join(PRECISIONS)})")
    return name


def parse_precisions(text: str, flag: str = "--embedding-precision") -> list[str]:
    """'float32,int8,binary' -> the names in the order of PRECISIONS, each once; unknown names are a UserError."""
    names = [check_precision(n.strip(), flag) for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"{flag} is empty (choose from {', '.join(PRECISIONS)})")
    return [p for p in PRECISIONS if p in names]


def bytes_per_vector(precision: str, dim: int) -> int:
    return math.ceil(dim / 8) if precision == "binary" else BYTES_PER_DIM[precision] * dim


def code_bits(dim: int) -> int:
    """Bits of a packed binary code of a dim-prefix (zero-padded to whole bytes): a faiss binary index's d."""
    return 8 * math.ceil(dim / 8)


def calibrate(database: np.ndarray) -> np.ndarray:
    """int8 ranges [2, dim] float32: per-dim min and max of the database prefixes (faiss's RS_minmax statistics,
    sentence-transformers' `ranges`)."""
    database = np.asarray(database, dtype=np.float32)
    if database.ndim != 2 or len(database) == 0:
        raise UserError("int8 calibration needs at least one database vector")
    return np.vstack([database.min(axis=0), database.max(axis=0)])


def prefix_ranges(embeddings, dim: int) -> np.ndarray:
    """`calibrate` of the re-normalised dim-prefixes of embeddings' rows, block by block (no float32 copy of them
    all): the min of the block minima and the max of the block maxima are the min and max of all rows."""
    blocks = [calibrate(block) for block in normalized_blocks(embeddings, dim)]
    if not blocks:
        raise UserError("int8 calibration needs at least one database vector")
    return np.stack([np.min([b[0] for b in blocks], 0), np.max([b[1] for b in blocks], 0)]).astype(np.float32)


def scalar_quantizer(ranges: np.ndarray) -> faiss.ScalarQuantizer:
    """faiss's QT_8bit quantizer with the given ranges as its trained vmin, vdiff (what train() would set from the
    same vectors with RS_minmax)."""
    ranges = np.asarray(ranges, dtype=np.float32)
    quantizer = faiss.ScalarQuantizer(ranges.shape[1], faiss.ScalarQuantizer.QT_8bit)
    faiss.copy_array_to_vector(np.concatenate([ranges[0], ranges[1] - ranges[0]]), quantizer.trained)
    return quantizer


def encode(prefixes: np.ndarray, precision: str, ranges=None) -> np.ndarray:
    """Codes of re-normalised prefixes: float32/float16 arrays, int8 [n, m], or packed bits uint8 [n, ceil(m/8)]."""
    prefixes = np.ascontiguousarray(prefixes, dtype=np.float32)
    if precision in ("float32", "float16"):
        return prefixes.astype(precision)
    if precision == "binary":
        return np.packbits(prefixes > 0, axis=1)
    if ranges is None:
        raise ValueError("int8 codes need calibration ranges")
    codes = scalar_quantizer(ranges).compute_codes(prefixes)
    return (codes.astype(np.int16) - INT8_OFFSET).astype(np.int8)


def faiss_codes(codes: np.ndarray, precision: str) -> np.ndarray:
    """The bytes faiss's flat indexes store for these codes (uint8 rows): int8 + 128 (QT_8bit), float16's own
    bits (QT_fp16), packed bits as they are."""
    if precision == "int8":
        return (np.asarray(codes).astype(np.int16) + INT8_OFFSET).astype(np.uint8)
    return np.ascontiguousarray(codes).view(np.uint8)


def decode(codes: np.ndarray, precision: str, ranges=None, dim=None) -> np.ndarray:
    """float32 vectors the codes stand for: int8 -> faiss's bin centres; binary -> the +-1 sign vectors (dim)."""
    if precision in ("float32", "float16"):
        return np.asarray(codes, dtype=np.float32)
    if precision == "binary":
        return np.unpackbits(codes, axis=1, count=dim).astype(np.float32) * 2 - 1
    return scalar_quantizer(ranges).decode(np.ascontiguousarray(faiss_codes(codes, "int8")))


def hamming(query_bits: np.ndarray, database_bits: np.ndarray) -> np.ndarray:
    """int32 Hamming distances of packed codes (faiss.hammings): [queries, items] against database_bits [items,
    bytes], or against each query's own candidates database_bits [queries, candidates, bytes]."""
    a = np.ascontiguousarray(query_bits, dtype=np.uint8)
    if database_bits.ndim == 3:
        return np.concatenate([hamming(a[q:q + 1], database_bits[q]) for q in range(len(a))])
    b = np.ascontiguousarray(database_bits, dtype=np.uint8)
    out = np.empty((len(a), len(b)), dtype=np.int32)
    faiss.hammings(faiss.swig_ptr(a), faiss.swig_ptr(b), len(a), len(b), a.shape[1], faiss.swig_ptr(out))
    return out


def binary_scores(distances: np.ndarray, dim: int) -> np.ndarray:
    """float32 1 - 2h/dim of Hamming distances h: the cosine of the +-1 sign vectors of two dim-prefixes."""
    return 1 - 2 * np.asarray(distances).astype(np.float32) / dim


def score(query_prefixes: np.ndarray, database_codes: np.ndarray, precision: str, dim: int,
          ranges=None) -> np.ndarray:
    """float32 similarity of float32 query prefixes to stored database codes: [queries, items] for codes [items,
    ...], or [queries, candidates] for each query's own candidates [queries, candidates, ...]. Binary binarises the
    queries (1 - 2h/dim); the other precisions score the float query against the decoded codes."""
    queries = np.ascontiguousarray(query_prefixes, dtype=np.float32)
    if precision == "binary":
        return binary_scores(hamming(encode(queries, "binary"), database_codes), dim)
    codes = np.asarray(database_codes)
    decoded = decode(codes.reshape(-1, codes.shape[-1]), precision, ranges).reshape(*codes.shape[:-1], dim)
    if decoded.ndim == 2:
        return queries @ decoded.T
    return np.matmul(decoded, queries[:, :, None])[..., 0]


def similarity(queries: np.ndarray, database: np.ndarray, precision: str) -> np.ndarray:
    """[queries, items] scores of two sets of re-normalised prefixes with the database side stored at `precision`
    (int8: calibrated on this database)."""
    ranges = calibrate(database) if precision == "int8" else None
    return score(queries, encode(database, precision, ranges), precision, database.shape[1], ranges)


def ranking_scores(scores: np.ndarray, precision: str, dim: int) -> np.ndarray:
    """Scores to rank by (as torch.topk / argmax do): binary's scores (1 - 2h/dim, spaced by 2/dim) minus
    index / (items * dim) in float64, so that ties go to the lower database index; other precisions unchanged."""
    if precision != "binary":
        return scores
    return scores.astype(np.float64) - np.arange(scores.shape[1]) / (scores.shape[1] * dim)


def prefix_codes(embeddings, dim: int, precision: str, ranges=None) -> tuple:
    """(codes, ranges) of the re-normalised dim-prefixes of full-width embeddings, block by block: what OpenAI's
    `dimensions` and sentence-transformers' truncate_dim + quantize_embeddings give. int8 calibrates on these
    embeddings unless ranges are given (ranges is None for the other precisions)."""
    check_precision(precision)
    if not 1 <= dim <= np.shape(embeddings)[1]:
        raise UserError(f"--dim {dim} is outside 1..{np.shape(embeddings)[1]} (the embedding width)")
    if precision == "float32":
        return normalized_prefix(embeddings, dim), None
    if precision == "int8":
        ranges = prefix_ranges(embeddings, dim) if ranges is None else np.asarray(ranges, dtype=np.float32)
        if ranges.shape != (2, dim):
            raise UserError(f"int8 ranges must be [2, {dim}] (min row, max row), got {list(ranges.shape)}")
    else:
        ranges = None
    blocks = [encode(block, precision, ranges) for block in normalized_blocks(embeddings, dim)]
    return np.concatenate(blocks) if blocks else encode(np.zeros((0, dim)), precision, ranges), ranges


def flat_index(codes: np.ndarray, precision: str, dim: int, ranges=None):
    """A faiss flat index holding exactly these codes: IndexBinaryFlat (code_bits(dim) bits, Hamming) for binary,
    IndexScalarQuantizer (QT_8bit with the ranges / QT_fp16, inner product) for int8 / float16, IndexFlatIP for
    float32. Search it with `index_queries`' queries."""
    if precision == "binary":
        index = faiss.IndexBinaryFlat(code_bits(dim))
        index.add(np.ascontiguousarray(codes, dtype=np.uint8))
        return index
    if precision == "float32":
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(codes, dtype=np.float32))
        return index
    index = faiss.IndexScalarQuantizer(dim, SQ_TYPES[precision], faiss.METRIC_INNER_PRODUCT)
    if precision == "int8":
        index.sq = scalar_quantizer(ranges)
    index.is_trained = True
    index.add_sa_codes(faiss_codes(codes, precision))
    return index



def index_queries(query_prefixes: np.ndarray, precision: str) -> np.ndarray:
    """What a faiss index over codes of `precision` is searched with: packed sign bits for binary, else the float32
    prefixes themselves."""
    queries = np.ascontiguousarray(query_prefixes, dtype=np.float32)
    return encode(queries, "binary") if precision == "binary" else queries


def search(query_prefixes: np.ndarray, codes: np.ndarray, precision: str, dim: int, k: int, ranges=None) -> tuple:
    """(scores, ids) [queries, k], best first, of float32 query prefixes against stored codes through faiss's
    flat_index: int8 / float16 float query . decoded code, binary by Hamming (scores 1 - 2h/dim, ties in id order),
    float32 by inner product."""
    k = min(k, len(codes))
    scores, ids = flat_index(codes, precision, dim, ranges).search(index_queries(query_prefixes, precision), k)
    return (binary_scores(scores, dim) if precision == "binary" else scores), ids
