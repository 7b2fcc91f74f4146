"""Quantised Matryoshka prefixes: float16, int8 and binary codes of the re-normalised m-d prefix, and their scores.

Everything starts from the prefix x[:, :m] / ||x[:, :m]|| (float32), as the rest of the package.

- float16: both sides rounded to float16, scored (inner product) in float32. 2m bytes a vector.
- int8: faiss's ScalarQuantizer QT_8bit with per-dim ranges (RS_minmax): vmin = min, vdiff = max - min over the
  DATABASE side's prefixes (`calibrate`); code = floor(255 * clip((x - vmin) / vdiff, 0, 1)) (faiss Codec8bit, so
  255 only at the maximum), decoded at the bin centre vmin + (code + 0.5) / 255 * vdiff. Stored as int8 = code - 128
  (sentence-transformers' int8 offset) plus the ranges [2, m] (min row, max row: the `ranges` argument of
  sentence-transformers' quantize_embeddings). Scored asymmetrically, as faiss's IndexScalarQuantizer with inner
  product: float32 query . decoded database vector. m bytes a vector (and 8m bytes of ranges per collection).
  sentence-transformers floors (x - min) / ((max - min) / 255) the same way, up to rounding at bin edges (a few
  codes in 10^4 differ by one), but does not clip values outside the calibration range (numpy's cast wraps them)
  and defines no decoding: its int8 codes are compared to each other as integers.
- binary: bit_j = x_j > 0, packed with np.packbits along each row (8 dims a byte, first dim in the high bit; m not
  a multiple of 8 is padded with zero bits on both sides, which adds nothing to a Hamming distance); both sides
  binarised; distance = Hamming (faiss, as IndexBinaryFlat); similarity = m - 2 * hamming (= the dot product of
  the +-1 sign vectors). ceil(m / 8) bytes a vector. Ties are many (m + 1 possible values): `ranking_scores` breaks
  them toward the lower database index, the order faiss's IndexBinaryFlat returns tied items in.
"""
import math

import faiss
import numpy as np

from .errors import UserError

PRECISIONS = ("float32", "float16", "int8", "binary")
BYTES_PER_DIM = {"float32": 4, "float16": 2, "int8": 1}
_CHUNK = 65536  # rows per block when normalising
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


def normalized_prefix(x, dim: int) -> np.ndarray:
    """Contiguous float32 rows x[:, :dim] / ||x[:, :dim]|| (a zero row stays zero), in blocks of rows (x may be a
    float16 memory map larger than a float32 copy of it)."""
    out = np.empty((len(x), dim), dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        block = np.asarray(x[start:start + _CHUNK, :dim], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, norms, out=out[start:start + _CHUNK], where=norms > 0)
        out[start:start + _CHUNK][(norms == 0)[:, 0]] = 0
    return out


def calibrate(database: np.ndarray) -> np.ndarray:
    """int8 ranges [2, dim] float32: per-dim min and max of the database prefixes (faiss's RS_minmax statistics,
    sentence-transformers' `ranges`)."""
    database = np.asarray(database, dtype=np.float32)
    if database.ndim != 2 or len(database) == 0:
        raise UserError("int8 calibration needs at least one database vector")
    return np.vstack([database.min(axis=0), database.max(axis=0)])


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


def decode(codes: np.ndarray, precision: str, ranges=None, dim=None) -> np.ndarray:
    """float32 vectors the codes stand for: int8 -> faiss's bin centres; binary -> the +-1 sign vectors (dim)."""
    if precision in ("float32", "float16"):
        return np.asarray(codes, dtype=np.float32)
    if precision == "binary":
        return np.unpackbits(codes, axis=1, count=dim).astype(np.float32) * 2 - 1
    raw = (np.asarray(codes).astype(np.int16) + INT8_OFFSET).astype(np.uint8)
    return scalar_quantizer(ranges).decode(np.ascontiguousarray(raw))


def hamming(query_bits: np.ndarray, database_bits: np.ndarray) -> np.ndarray:
    """[queries, items] int32 Hamming distances of packed codes (faiss.hammings)."""
    a, b = np.ascontiguousarray(query_bits, dtype=np.uint8), np.ascontiguousarray(database_bits, dtype=np.uint8)
    out = np.empty((len(a), len(b)), dtype=np.int32)
    faiss.hammings(faiss.swig_ptr(a), faiss.swig_ptr(b), len(a), len(b), a.shape[1], faiss.swig_ptr(out))
    return out


def score(query_prefixes: np.ndarray, database_codes: np.ndarray, precision: str, dim: int,
          ranges=None) -> np.ndarray:
    """[queries, items] float32 similarity of float32 query prefixes to stored database codes: float16 rounds the
    queries too; int8 is float query . decoded item; binary binarises the queries: dim - 2 * hamming."""
    queries = np.ascontiguousarray(query_prefixes, dtype=np.float32)
    if precision == "binary":
        return (dim - 2 * hamming(encode(queries, "binary"), database_codes)).astype(np.float32)
    if precision == "float16":
        queries = queries.astype(np.float16).astype(np.float32)
    return queries @ decode(database_codes, precision, ranges).T


def similarity(queries: np.ndarray, database: np.ndarray, precision: str) -> np.ndarray:
    """[queries, items] scores of two sets of re-normalised prefixes with the database side stored at `precision`
    (int8: calibrated on this database)."""
    ranges = calibrate(database) if precision == "int8" else None
    return score(queries, encode(database, precision, ranges), precision, database.shape[1], ranges)


def ranking_scores(scores: np.ndarray, precision: str) -> np.ndarray:
    """Scores to rank by (as torch.topk / argmax do): binary's integer similarities (spaced by 2) minus
    index / items in float64, so that ties go to the lower database index; other precisions unchanged."""
    if precision != "binary":
        return scores
    return scores.astype(np.float64) - np.arange(scores.shape[1]) / scores.shape[1]


def prefix_codes(embeddings, dim: int, precision: str, ranges=None) -> tuple:
    """(codes, ranges) of the re-normalised dim-prefixes of full-width embeddings: what OpenAI's `dimensions` and
    sentence-transformers' truncate_dim + quantize_embeddings give. int8 calibrates on these embeddings unless
    ranges are given (ranges is None for the other precisions)."""
    check_precision(precision)
    embeddings = np.asarray(embeddings)
    if not 1 <= dim <= embeddings.shape[1]:
        raise UserError(f"--dim {dim} is outside 1..{embeddings.shape[1]} (the embedding width)")
    prefixes = normalized_prefix(embeddings, dim)
    if precision == "int8":
        ranges = calibrate(prefixes) if ranges is None else np.asarray(ranges, dtype=np.float32)
        if ranges.shape != (2, dim):
            raise UserError(f"int8 ranges must be [2, {dim}] (min row, max row), got {list(ranges.shape)}")
    else:
        ranges = None
    return encode(prefixes, precision, ranges), ranges


def search(query_prefixes: np.ndarray, codes: np.ndarray, precision: str, dim: int, k: int, ranges=None) -> tuple:
    """(scores, ids) [queries, k], best first, of float32 query prefixes against stored codes, by faiss: int8
    through IndexScalarQuantizer (inner product, float query . decoded code), binary through IndexBinaryFlat
    (Hamming; scores dim - 2 * hamming, ties in id order), floats by brute-force inner product."""
    queries = np.ascontiguousarray(query_prefixes, dtype=np.float32)
    k = min(k, len(codes))
    if precision == "binary":
        index = faiss.IndexBinaryFlat(8 * codes.shape[1])
        index.add(np.ascontiguousarray(codes, dtype=np.uint8))
        distances, ids = index.search(encode(queries, "binary"), k)
        return (dim - 2 * distances).astype(np.float32), ids
    if precision == "int8":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.sq = scalar_quantizer(ranges)
        index.is_trained = True
        index.add_sa_codes((np.asarray(codes).astype(np.int16) + INT8_OFFSET).astype(np.uint8))
        return index.search(queries, k)
    if precision == "float16":
        queries = queries.astype(np.float16).astype(np.float32)
    return faiss.knn(queries, decode(codes, precision), k, metric=faiss.METRIC_INNER_PRODUCT)
