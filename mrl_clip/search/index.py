"""Nearest-neighbour search over Matryoshka embeddings at any prefix dim, and funnel (adaptive) search.

    index = EmbeddingIndex(image_features, dtype="float16")       # full width, stored once
    exact = index.search(text_features, k=10, dim=64)             # cosine of re-normalised 64-d prefixes
    fast = index.funnel_search(text_features, parse_funnel("32:400,128:100,768:10"))
    coarse = index.funnel_search(text_features, parse_funnel("binary@256:2000,768:10"))   # sign bits first

The funnel is the MRL paper's adaptive retrieval: stage 1 searches every vector at a small dim d1 and keeps K1
candidates; each later stage re-scores only those candidates at a larger dim and keeps fewer, down to the final k.
Scores are always cosine similarities of the prefixes at the stage's dim (slice, then re-normalise), so a funnel
whose stage 1 is at full width returns what exact full-width search returns. faiss does the searching: brute-force
inner product (`faiss.knn`, BLAS) or HNSW for stage 1, `knn_inner_products_by_idx` or a gather for re-ranking.

A stage may name a precision (`binary@256:2000`): binary sign bits, int8 or float16 scalar quantisation of the
prefixes (mrl_clip.search.precision). Precision may not drop from one stage to the next (binary < int8 < float16 <
float32; a stage without one is float32), so every stage is at least as fine as the one that shortlisted for it.

faiss has two-stage pieces (IndexRefineFlat: a shortlist re-scored by a flat full-width copy) but no funnel of
three or more stages at growing dims, no re-rank at a prefix dim, and IndexRefineFlat would keep a second, float32
copy of the vectors beside our (possibly float16) one. So the stages after the first are ours: a faiss call each.
"""
import itertools
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from ..errors import UserError
from ..prefix import normalized_blocks, normalized_prefix, prefix_norms
from ..quantize import PRECISIONS, check_precision
from .precision import PrefixCodes, build_stage1, stage1_search

STORAGE_DTYPES = ("float32", "float16")
RISING = tuple(reversed(PRECISIONS))   # a funnel's precision may not drop: binary < int8 < float16 < float32

# faiss takes its BLAS path only when queries x dims >= 20 * 6400; below it (1,000 queries at 16-64 dims) it falls
# back to a scan that is several times slower. BLAS is never the slower one here, so always use it.
faiss.cvar.distance_compute_blas_threshold = 0


@dataclass
class FunnelStage:
    dim: int
    k: int
    precision: str = "float32"


@dataclass
class SearchResult:
    scores: np.ndarray          # [queries, k] float32 cosine similarity at the last stage's dim, best first
    ids: np.ndarray             # [queries, k] int64 row numbers in the index (-1: fewer than k candidates)
    stage_seconds: list = field(default_factory=list)


def format_funnel(stages) -> str:
    return ",".join(("" if s.precision == "float32" else f"{s.precision}@") + f"{s.dim}:{s.k}" for s in stages)


def parse_funnel(text: str, width: int | None = None, final_k: int | None = None,
                 flag: str = "--funnel") -> list[FunnelStage]:
    """'32:400,128:100,768:10' or 'binary@256:2000,768:10' -> stages. Dims may not decrease (a repeated dim
    re-scores exactly), nor may precision (binary < int8 < float16 < float32, the default); candidate counts must
    shrink at every stage; no dim above `width`; the last count at least `final_k`."""
    stages = []
    for item in text.split(","):
        precision, _, spec = item.strip().rpartition("@")
        try:
            dim, k = (int(p) for p in spec.split(":"))
        except ValueError:
            raise UserError(f"{flag} takes [PRECISION@]DIM:K stages separated by commas (e.g. 32:400,768:10), "
                            f"got {text!r}") from None
        if dim < 1 or k < 1:
            raise UserError(f"{flag} dims and candidate counts must be positive, got {item.strip()!r}")
        stages.append(FunnelStage(dim, k, check_precision(precision or "float32", flag)))
    for before, after in itertools.pairwise(stages):
        if after.dim < before.dim:
            raise UserError(f"{flag} dims must not decrease from one stage to the next, got {text!r}")
        if RISING.index(after.precision) < RISING.index(before.precision):
            raise UserError(f"{flag} precision must not drop from one stage to the next ({' < '.join(RISING)};"
                            f" no prefix is float32), got {after.precision} after {before.precision} in {text!r}")
        if after.k >= before.k:
            raise UserError(f"{flag} candidate counts must decrease from one stage to the next, got {text!r}")
    if width is not None and stages[-1].dim > width:
        raise UserError(f"{flag} dim {max(s.dim for s in stages)} is above the embedding width {width}")
    if final_k is not None and stages[-1].k < final_k:
        raise UserError(f"{flag} ends with {stages[-1].k} results, fewer than the {final_k} asked for")
    return stages


class EmbeddingIndex:
    """Full-width embeddings, L2-normalised at full width and stored once as float32 or float16.

    Searching at dim m < width uses a float32 copy of the normalised m-d prefixes (built on first use, m/width of
    the float32 size); re-ranking at a dim without such a copy gathers the candidates' rows from the stored
    embeddings and divides by their prefix norms. Stages below float32 search faiss indexes over codes of the
    prefixes (mrl_clip.search.precision), built on first use or by build_stage1 / build_hnsw."""

    def __init__(self, embeddings, dtype: str = "float32", normalized: bool = False):
        """normalized=True: the rows are already unit-norm at full width and in dtype (an index file's), so they
        are kept as they are instead of being normalised into a copy."""
        if dtype not in STORAGE_DTYPES:
            raise UserError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise UserError(f"embeddings must be a non-empty [rows, width] array, got shape {embeddings.shape}")
        self.width = embeddings.shape[1]
        if normalized and embeddings.dtype == np.dtype(dtype):
            self.vectors = embeddings
        else:
            self.vectors = normalized_prefix(embeddings, self.width).astype(dtype, copy=False)
        self.prefixes = {}        # dim -> contiguous float32 normalised prefixes, for flat search and by-id re-rank
        self.norms = {}           # dim -> prefix norms of the stored rows, for gathered re-ranks
        self.graphs = {}          # (precision, dim) -> faiss HNSW index for funnel stage 1
        self.coded = {}           # (precision, dim) -> flat faiss index over codes, for stage 1 below float32
        self.codes = {}           # (precision, dim) -> PrefixCodes, for re-ranks below float32

    def __len__(self):
        return len(self.vectors)

    def check_dim(self, dim: int) -> int:
        if not 1 <= dim <= self.width:
            raise UserError(f"search dim {dim} is outside 1..{self.width} (the embedding width)")
        return dim

    def prefix(self, dim: int) -> np.ndarray | None:
        """The float32 normalised dim-prefixes as one contiguous array; None for float16 storage at full width
        (that is searched in decoded blocks rather than copied whole)."""
        if dim == self.width:
            return self.vectors if self.vectors.dtype == np.float32 else None
        if dim not in self.prefixes:
            self.prefixes[dim] = normalized_prefix(self.vectors, dim)
        return self.prefixes[dim]

    def build_stage1(self, dim: int, precision: str = "float32", hnsw: int = 0, ef_construction: int = 40):
        """A faiss index over every row for funnel stage 1 at dim and precision: flat, or an HNSW graph with
        `hnsw` links per node. A flat float32 stage 1 needs none (it searches prefix(dim))."""
        self.check_dim(dim)
        check_precision(precision, "stage 1")
        if precision == "float32" and not hnsw:
            self.prefix(dim)
            return None
        index = build_stage1(self.vectors, dim, precision, hnsw, ef_construction)
        (self.graphs if hnsw else self.coded)[(precision, dim)] = index
        return index

    def build_hnsw(self, dim: int, neighbours: int = 32, ef_construction: int = 40, precision: str = "float32"):
        """An HNSW graph over the dim-prefixes (faiss IndexHNSWFlat / IndexHNSWSQ, inner product, or
        IndexBinaryHNSW) for funnel stage 1."""
        return self.build_stage1(dim, precision, neighbours, ef_construction)

    def use_hnsw(self, dim: int, index, precision: str = "float32") -> None:
        """Attach an HNSW index built earlier (e.g. read with faiss.read_index): a graph over the normalised
        dim-prefixes, or one behind a prefix transform that takes full-width vectors (build_stage1's)."""
        if index.d not in (dim, self.width) or index.ntotal != len(self):
            raise UserError(f"the HNSW index holds {index.ntotal} vectors of dim {index.d}, "
                            f"expected {len(self)} of dim {dim}")
        self.graphs[(precision, dim)] = index

    def search(self, queries, k: int, dim: int | None = None, hnsw_ef: int | None = None,
               precision: str = "float32") -> SearchResult:
        """Top-k rows by cosine similarity of the dim-prefixes (default: full width) at precision. With hnsw_ef,
        the HNSW index of that dim and precision answers (approximate), searching with efSearch =
        max(hnsw_ef, k)."""
        dim = self.check_dim(dim or self.width)
        check_precision(precision, "precision")
        k = min(k, len(self))
        started = time.perf_counter()
        queries = np.asarray(queries)
        if hnsw_ef is not None:
            if (precision, dim) not in self.graphs:
                raise UserError(f"no HNSW index at dim {dim} ({precision}): build it first (build_hnsw)")
            graph = self.graphs[(precision, dim)]
            if isinstance(graph, faiss.IndexHNSW):   # a bare graph over the prefixes (use_hnsw)
                params = faiss.SearchParametersHNSW(efSearch=max(hnsw_ef, k))
                scores, ids = graph.search(normalized_prefix(queries[:, :dim], dim), k, params=params)
            else:
                scores, ids = stage1_search(graph, queries, dim, precision, k, hnsw_ef)
        elif precision != "float32":
            if (precision, dim) not in self.coded:
                self.build_stage1(dim, precision)
            scores, ids = stage1_search(self.coded[(precision, dim)], queries, dim, precision, k)
        else:
            scores, ids = self._flat_search(normalized_prefix(queries[:, :dim], dim), k, dim)
        return SearchResult(scores, ids, [time.perf_counter() - started])

    def _flat_search(self, q: np.ndarray, k: int, dim: int) -> tuple:
        if self.prefix(dim) is not None:
            return faiss.knn(q, self.prefix(dim), k, metric=faiss.METRIC_INNER_PRODUCT)
        heap, start = faiss.ResultHeap(len(q), k, keep_max=True), 0
        # rounding to float16 moves norms off 1 by ~1e-3: re-normalise, as the gathered re-rank does
        for block in normalized_blocks(self.vectors, dim):
            block_scores, block_ids = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(block_scores, block_ids + start)
            start += len(block)
        heap.finalize()
        return heap.D, heap.I

    def rerank(self, queries, candidates: np.ndarray, dim: int, k: int, query_block: int = 64,
               precision: str = "float32") -> SearchResult:
        """The best k of each query's candidate rows by cosine similarity at dim (at precision); -1 ids (only at
        the end of a row, as faiss pads results) are no candidates. Only the candidates' rows are read."""
        dim = self.check_dim(dim)
        candidates = np.ascontiguousarray(candidates, dtype=np.int64)
        nq, n_candidates = candidates.shape
        k = min(k, n_candidates)
        if precision != "float32":
            return self._rerank_codes(queries, candidates, dim, k, precision)
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

        def score(rows, q_block):
            gathered = self.vectors[rows, :dim].astype(np.float32)          # [block, candidates, dim]
            scores = np.matmul(gathered, q_block[:, :, None])[..., 0]
            norms = self.norms[dim][rows]
            return np.divide(scores, norms, out=np.zeros_like(scores), where=norms > 0)

        return gathered_rerank(score, q, candidates, k, query_block)

    def _rerank_codes(self, queries, candidates, dim, k, precision) -> SearchResult:
        if (precision, dim) not in self.codes:
            self.codes[(precision, dim)] = PrefixCodes(self.vectors, dim, precision)
        codes = self.codes[(precision, dim)]
        block = max(1, min(64, 2 ** 22 // (candidates.shape[1] * dim)))   # decoded candidates: <= 16 MiB a block
        return gathered_rerank(codes.scores, codes.query(np.asarray(queries)), candidates, k, block)

    def funnel_search(self, queries, stages: list, hnsw_ef: int | None = None) -> SearchResult:
        """Stage 1 searches all rows at stages[0].dim and precision (flat, or HNSW with hnsw_ef) for
        stages[0].k candidates; each later stage re-ranks the previous stage's candidates at its dim and
        precision and keeps its k."""
        for stage in stages:
            self.check_dim(stage.dim)
        queries = np.asarray(queries)
        seconds = []
        first = stages[0]
        result = self.search(queries, first.k, first.dim, hnsw_ef=hnsw_ef, precision=first.precision)
        seconds.append(result.stage_seconds[0])
        for stage in stages[1:]:
            started = time.perf_counter()
            result = self.rerank(queries, result.ids, stage.dim, stage.k, precision=stage.precision)
            seconds.append(time.perf_counter() - started)
        return SearchResult(result.scores, result.ids, seconds)


def gathered_rerank(score, q: np.ndarray, candidates: np.ndarray, k: int, query_block: int) -> SearchResult:
    """The best k candidates per query, scoring a block of queries at a time: score(rows, q_block) -> [block,
    candidates] for row ids (-1 replaced by 0, then masked out)."""
    heap = faiss.ResultHeap(len(candidates), k, keep_max=True)
    for start in range(0, len(candidates), query_block):
        block_ids = candidates[start:start + query_block]
        valid = block_ids >= 0
        block_scores = score(np.where(valid, block_ids, 0), q[start:start + query_block])
        block_scores[~valid] = -np.inf
        heap.add_result_subset(np.arange(start, start + len(block_ids)), block_scores, block_ids)
    heap.finalize()
    return SearchResult(heap.D, heap.I)
