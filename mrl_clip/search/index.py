"""Nearest-neighbour search over Matryoshka embeddings at any prefix dim, and funnel (adaptive) search.

    index = EmbeddingIndex(image_features, dtype="float16")       # full width, stored once
    exact = index.search(text_features, k=10, dim=64)             # cosine of re-normalised 64-d prefixes
    fast = index.funnel_search(text_features, parse_funnel("32:400,128:100,768:10"))

The funnel is the MRL paper's adaptive retrieval: stage 1 searches every vector at a small dim d1 and keeps K1
candidates; each later stage re-scores only those candidates at a larger dim and keeps fewer, down to the final k.
Scores are always cosine similarities of the prefixes at the stage's dim (slice, then re-normalise), so a funnel
whose stage 1 is at full width returns what exact full-width search returns. faiss does the searching: brute-force
inner product (`faiss.knn`, BLAS) or HNSW for stage 1, `knn_inner_products_by_idx` or a gather for re-ranking.
"""
import time
from dataclasses import dataclass, field
from typing import Optional

import faiss
import numpy as np

from ..errors import UserError

STORAGE_DTYPES = ("float32", "float16")
_CHUNK = 65536  # rows per block when normalising or decoding float16 storage

# faiss takes its BLAS path only when queries x dims >= 20 * 6400; below it (1,000 queries at 16-64 dims) it falls
# back to a scan that is several times slower. BLAS is never the slower one here, so always use it.
faiss.cvar.distance_compute_blas_threshold = 0


@dataclass
class FunnelStage:
    dim: int
    k: int


@dataclass
class SearchResult:
    scores: np.ndarray          # [queries, k] float32 cosine similarity at the last stage's dim, best first
    ids: np.ndarray             # [queries, k] int64 row numbers in the index (-1: fewer than k candidates)
    stage_seconds: list = field(default_factory=list)


def format_funnel(stages) -> str:
    return ",".join(f"{s.dim}:{s.k}" for s in stages)


def parse_funnel(text: str, width: Optional[int] = None, final_k: Optional[int] = None,
                 flag: str = "--funnel") -> list[FunnelStage]:
    """'32:400,128:100,768:10' -> stages. Dims may not decrease (a repeated dim re-scores exactly), candidate
    counts must shrink at every stage; no dim above `width`; the last count at least `final_k`."""
    stages = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            dim, k = (int(p) for p in parts)
        except ValueError:
            raise UserError(f"{flag} takes DIM:K stages separated by commas (e.g. 32:400,768:10), got {text!r}") \
                from None
        if dim < 1 or k < 1:
            raise UserError(f"{flag} dims and candidate counts must be positive, got {item.strip()!r}")
        stages.append(FunnelStage(dim, k))
    for before, after in zip(stages, stages[1:]):
        if after.dim < before.dim:
            raise UserError(f"{flag} dims must not decrease from one stage to the next, got {text!r}")
        if after.k >= before.k:
            raise UserError(f"{flag} candidate counts must decrease from one stage to the next, got {text!r}")
    if width is not None and stages[-1].dim > width:
        raise UserError(f"{flag} dim {max(s.dim for s in stages)} is above the embedding width {width}")
    if final_k is not None and stages[-1].k < final_k:
        raise UserError(f"{flag} ends with {stages[-1].k} results, fewer than the {final_k} asked for")
    return stages


def normalized_prefix(x: np.ndarray, dim: int) -> np.ndarray:
    """Contiguous float32 rows x[:, :dim] / ||x[:, :dim]|| (a zero row stays zero), in blocks of rows."""
    out = np.empty((len(x), dim), dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        block = np.asarray(x[start:start + _CHUNK, :dim], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, norms, out=out[start:start + _CHUNK], where=norms > 0)
        out[start:start + _CHUNK][(norms == 0)[:, 0]] = 0
    return out


def prefix_norms(x: np.ndarray, dim: int) -> np.ndarray:
    return np.concatenate([np.linalg.norm(np.asarray(x[s:s + _CHUNK, :dim], dtype=np.float32), axis=1)
                           for s in range(0, len(x), _CHUNK)])


class EmbeddingIndex:
    """Full-width embeddings, L2-normalised at full width and stored once as float32 or float16.

    Searching at dim m < width uses a float32 copy of the normalised m-d prefixes (built on first use, m/width of
    the float32 size); re-ranking at a dim without such a copy gathers the candidates' rows from the stored
    embeddings and divides by their prefix norms."""

    def __init__(self, embeddings, dtype: str = "float32"):
        if dtype not in STORAGE_DTYPES:
            raise UserError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise UserError(f"embeddings must be a non-empty [rows, width] array, got shape {embeddings.shape}")
        self.width = embeddings.shape[1]
        self.vectors = normalized_prefix(embeddings, self.width).astype(dtype, copy=False)
        self.prefixes = {}        # dim -> contiguous float32 normalised prefixes, for flat search and by-id re-rank
        self.norms = {}           # dim -> prefix norms of the stored rows, for gathered re-ranks
        self.hnsw = {}            # dim -> faiss HNSW index over the normalised prefixes

    def __len__(self):
        return len(self.vectors)

    def check_dim(self, dim: int) -> int:
        if not 1 <= dim <= self.width:
            raise UserError(f"search dim {dim} is outside 1..{self.width} (the embedding width)")
        return dim

    def prefix(self, dim: int) -> Optional[np.ndarray]:
        """The float32 normalised dim-prefixes as one contiguous array; None for float16 storage at full width
        (that is searched in decoded blocks rather than copied whole)."""
        if dim == self.width:
            return self.vectors if self.vectors.dtype == np.float32 else None
        if dim not in self.prefixes:
            self.prefixes[dim] = normalized_prefix(self.vectors, dim)
        return self.prefixes[dim]

    def build_hnsw(self, dim: int, neighbours: int = 32, ef_construction: int = 40):
        """An HNSW graph over the dim-prefixes (faiss IndexHNSWFlat, inner product) for funnel stage 1."""
        self.check_dim(dim)
        index = faiss.IndexHNSWFlat(dim, neighbours, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(self.prefix(dim) if self.prefix(dim) is not None else normalized_prefix(self.vectors, dim))
        self.hnsw[dim] = index
        return index

    def use_hnsw(self, dim: int, index) -> None:
        """Attach an HNSW index built earlier (e.g. read with faiss.read_index)."""
        if index.d != dim or index.ntotal != len(self):
            raise UserError(f"the HNSW index holds {index.ntotal} vectors of dim {index.d}, "
                            f"expected {len(self)} of dim {dim}")
        self.hnsw[dim] = index

    def search(self, queries, k: int, dim: Optional[int] = None, hnsw_ef: Optional[int] = None) -> SearchResult:
        """Top-k rows by cosine similarity of the dim-prefixes (default: full width). With hnsw_ef, the HNSW
        index of that dim answers (approximate), searching with efSearch = max(hnsw_ef, k)."""
        dim = self.check_dim(dim or self.width)
        k = min(k, len(self))
        started = time.perf_counter()
        q = normalized_prefix(np.asarray(queries)[:, :dim], dim)
        if hnsw_ef is not None:
            if dim not in self.hnsw:
                raise UserError(f"no HNSW index at dim {dim}: build it first (build_hnsw)")
            params = faiss.SearchParametersHNSW(efSearch=max(hnsw_ef, k))
            scores, ids = self.hnsw[dim].search(q, k, params=params)
        elif self.prefix(dim) is not None:
            scores, ids = faiss.knn(q, self.prefix(dim), k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            heap = faiss.ResultHeap(len(q), k, keep_max=True)
            for start in range(0, len(self), _CHUNK):
                # rounding to float16 moves norms off 1 by ~1e-3: re-normalise, as the gathered re-rank does
                block = normalized_prefix(self.vectors[start:start + _CHUNK], dim)
                block_scores, block_ids = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(block_scores, block_ids + start)
            heap.finalize()
            scores, ids = heap.D, heap.I
        return SearchResult(scores, ids, [time.perf_counter() - started])

    def rerank(self, queries, candidates: np.ndarray, dim: int, k: int, query_block: int = 64) -> SearchResult:
        """The best k of each query's candidate rows by cosine similarity at dim; -1 ids (only at the end of a
        row, as faiss pads results) are no candidates. Only the candidates' rows are read."""
        dim = self.check_dim(dim)
        candidates = np.ascontiguousarray(candidates, dtype=np.int64)
        nq, n_candidates = candidates.shape
        k = min(k, n_candidates)
        q = normalized_prefix(np.asarray(queries)[:, :dim], dim)
        table = self.prefix(dim) if (dim == self.width or dim in self.prefixes) else None
        if table is not None:
            scores, ids = np.empty((nq, k), dtype=np.float32), np.empty((nq, k), dtype=np.int64)
            # ld_ids is passed explicitly: faiss 1.15's default stride reads the wrong rows
            faiss.knn_inner_products_by_idx(faiss.swig_ptr(q), faiss.swig_ptr(table), faiss.swig_ptr(candidates),
                                            dim, nq, len(table), n_candidates, k, faiss.swig_ptr(scores),
                                            faiss.swig_ptr(ids), n_candidates)
            return SearchResult(scores, ids)
        if dim not in self.norms:
            self.norms[dim] = prefix_norms(self.vectors, dim)
        heap = faiss.ResultHeap(nq, k, keep_max=True)
        for start in range(0, nq, query_block):
            block_ids = candidates[start:start + query_block]
            valid = block_ids >= 0
            rows = np.where(valid, block_ids, 0)
            gathered = self.vectors[rows, :dim].astype(np.float32)          # [block, candidates, dim]
            block_scores = np.matmul(gathered, q[start:start + query_block, :, None])[..., 0]
            norms = self.norms[dim][rows]
            block_scores = np.divide(block_scores, norms, out=np.zeros_like(block_scores), where=norms > 0)
            block_scores[~valid] = -np.inf
            heap.add_result_subset(np.arange(start, start + len(block_ids)), block_scores, block_ids)
        heap.finalize()
        return SearchResult(heap.D, heap.I)

    def funnel_search(self, queries, stages: list, hnsw_ef: Optional[int] = None) -> SearchResult:
        """Stage 1 searches all rows at stages[0].dim (flat, or HNSW with hnsw_ef) for stages[0].k candidates;
        each later stage re-ranks the previous stage's candidates at its dim and keeps its k."""
        for stage in stages:
            self.check_dim(stage.dim)
        queries = np.asarray(queries)
        seconds = []
        result = self.search(queries, stages[0].k, stages[0].dim, hnsw_ef=hnsw_ef)
        seconds.append(result.stage_seconds[0])
        for stage in stages[1:]:
            started = time.perf_counter()
            result = self.rerank(queries, result.ids, stage.dim, stage.k)
            seconds.append(time.perf_counter() - started)
        return SearchResult(result.scores, result.ids, seconds)
