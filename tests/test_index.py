"""Funnel stages below float32 (binary sign bits, int8 / float16 scalar quantisation) against numpy
re-computations, and the index file of `python -m mrl_clip index build`: round trip, search CLI, damaged files."""
import json

import numpy as np
import pytest

from mrl_clip.errors import UserError, run_cli
from mrl_clip.search.index import EmbeddingIndex, parse_funnel
from mrl_clip.search.store import load_index, parse_stage1
from tests import numerics

WIDTH, ROWS = 128, 4000


@pytest.fixture(scope="module")
def clustered():
    """Rows around 40 centres (so that sign bits carry the neighbourhoods), queries near random rows."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, WIDTH)) * np.linspace(2.0, 0.5, WIDTH)
    database = (centres[rng.integers(0, 40, ROWS)] + 0.6 * rng.standard_normal((ROWS, WIDTH))).astype(np.float32)
    queries = (database[rng.integers(0, ROWS, 30)] + 0.3 * rng.standard_normal((30, WIDTH))).astype(np.float32)
    return database, queries


def unit(x, dim):
    x = x[:, :dim].astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hamming(database, queries, dim) -> np.ndarray:
    """[queries, rows] count of differing sign bits (x > 0) of the dim-prefixes, by numpy."""
    return ((queries[:, None, :dim] > 0) != (database[None, :, :dim] > 0)).sum(-1)


@pytest.mark.parametrize("dim", [12, 64])
def test_binary_stage_one_matches_numpy_hamming(clustered, dim):
    """A binary stage at any dim (12: zero bits pad the codes to 16, as in a file written by `embed --dim 12
    --precision binary`) is numpy's Hamming top-k with ties to the lower row, scored 1 - 2h/m."""
    database, queries = clustered
    index = EmbeddingIndex(database)
    result = index.search(queries, 50, dim=dim, precision="binary")
    distances = hamming(index.vectors, queries, dim)
    order = np.lexsort((np.broadcast_to(np.arange(ROWS), distances.shape), distances), axis=1)[:, :50]
    np.testing.assert_array_equal(result.ids, order)
    # the cosine of the +-1 sign vectors, 1 - 2h/m: float32's 2h/m and 1 - that are two roundings of values <= 2
    # (2h and m are exact), so within 2 * 2^-24 * 2 of the float64 value (exact for m = 64)
    exact = 1 - 2 * np.take_along_axis(distances, order, 1) / dim
    np.testing.assert_allclose(result.scores, exact, rtol=0, atol=4 * numerics.U32)
    if dim == 64:
        np.testing.assert_array_equal(result.scores, exact)
    # a later binary stage at the same dim re-scores the shortlist from the same codes: a best 20 of the 50 (its
    # heap keeps ties in either order), with the same scores
    funnel = index.funnel_search(queries, parse_funnel(f"binary@{dim}:50,binary@{dim}:20", WIDTH))
    assert all(set(found) <= set(shortlist) for found, shortlist in zip(funnel.ids, order))
    np.testing.assert_array_equal(np.take_along_axis(distances, funnel.ids, 1),
                                  np.take_along_axis(distances, order[:, :20], 1))
    np.testing.assert_array_equal(funnel.scores, result.scores[:, :20])


def test_binary_stage_one_with_full_width_rerank_is_exact_when_the_shortlist_covers_it(clustered):
    """Where every exact full-width top-10 row is strictly nearer in Hamming than the 200th nearest (so any
    best-200 by Hamming holds it), the funnel returns the exact top-10."""
    database, queries = clustered
    index = EmbeddingIndex(database)
    result = index.funnel_search(queries, parse_funnel(f"binary@{WIDTH}:200,{WIDTH}:10", WIDTH))
    cosine = unit(index.vectors, WIDTH) @ unit(queries, WIDTH).T
    exact = np.argsort(-cosine.T, axis=1)[:, :10]
    distances = hamming(index.vectors, queries, WIDTH)
    cutoff = np.sort(distances, axis=1)[:, 199]
    covered = (np.take_along_axis(distances, exact, 1) < cutoff[:, None]).all(axis=1)
    assert covered.sum() >= len(queries) // 2, covered.sum()   # the test must exercise the claim
    tolerance = numerics.cosine_tolerance(WIDTH)
    numerics.assert_top_k_within(result.ids[covered], cosine.T[covered], tolerance)
    np.testing.assert_allclose(result.scores, np.take_along_axis(cosine.T, result.ids, 1), rtol=0, atol=tolerance)


@pytest.mark.parametrize("precision, step", [("int8", 1 / 255), ("float16", 2.0 ** -10)])
def test_quantised_stage_one_scores_within_one_code_step(clustered, precision, step):
    """A scalar-quantised stage 1 scores the float query against decoded codes: each coordinate of a decoded
    prefix is off by at most one code step (int8: (max - min) / 255 of its dim over the database; float16: a
    relative 2^-10), so a score is off by at most sum_i |q_i| * step_i."""
    database, queries = clustered
    index = EmbeddingIndex(database)
    dim = 32
    result = index.search(queries, 20, dim=dim, precision=precision)
    rows, q = unit(index.vectors, dim), unit(queries, dim)
    exact = np.take_along_axis(q @ rows.T, result.ids, 1)
    if precision == "int8":
        bound = np.abs(q) @ ((rows.max(0) - rows.min(0)) * step)
    else:
        bound = np.abs(q) @ (np.abs(rows).max(0) * step)
    assert (np.abs(result.scores - exact) <= bound[:, None] + numerics.cosine_tolerance(dim)).all()
    numerics.assert_top_k_within(result.ids, q @ rows.T, bound.max() + numerics.cosine_tolerance(dim))


@pytest.mark.parametrize("precision", ["binary", "int8"])
def test_rerank_at_a_precision_scores_like_its_stage_one(clustered, precision):
    """A later stage at (dim, precision) scores each candidate as a stage 1 at (dim, precision) does: re-ranking
    the whole database must give the same ids and scores as searching it. Sign bits are the same bits either way;
    int8 codes of a prefix normalised by faiss (stage 1) and by numpy (re-rank) may differ by one code step where
    a value sits on a step's edge, which moves a score by at most sum_i |q_i| (max_i - min_i) / 255."""
    database, queries = clustered
    index = EmbeddingIndex(database)
    searched = index.search(queries, 15, dim=64, precision=precision)
    everyone = np.tile(np.arange(len(index)), (len(queries), 1))
    reranked = index.rerank(queries, everyone, 64, 15, precision=precision)
    tolerance = numerics.cosine_tolerance(64)
    if precision == "int8":
        rows = unit(index.vectors, 64)
        tolerance += (np.abs(unit(queries, 64)) @ ((rows.max(0) - rows.min(0)) / 255)).max()
    np.testing.assert_allclose(reranked.scores, searched.scores, rtol=0, atol=2 * tolerance)
    ranked = index.rerank(queries, everyone, 64, len(index), precision=precision)
    scores = np.empty_like(ranked.scores)
    np.put_along_axis(scores, ranked.ids, ranked.scores, 1)    # every row's re-rank score, by row id
    numerics.assert_top_k_within(searched.ids, scores, tolerance)


@pytest.mark.parametrize("text, message", [
    ("int4@32:100,128:10", "unknown precision 'int4'"),
    ("int8@32:100,binary@128:10", "precision must not drop"),
    ("32:100,float16@128:10", "precision must not drop"),
])
def test_bad_precision_stages_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_funnel(text, width=WIDTH, final_k=10)


def test_precision_may_rise_or_stay():
    stages = parse_funnel("binary@64:1000,binary@128:300,int8@128:100,float16@128:50,128:10", WIDTH)
    assert [s.precision for s in stages] == ["binary", "binary", "int8", "float16", "float32"]


@pytest.mark.parametrize("text, expected", [
    ("32", (32, "float32", 0)), ("binary@64", (64, "binary", 0)), ("hnsw16@32", (32, "float32", 16)),
    ("hnsw16-int8@64", (64, "int8", 16)),
])
def test_stage1_specs(text, expected):
    spec = parse_stage1(text, WIDTH)
    assert (spec.dim, spec.precision, spec.hnsw) == expected and spec.label() == text


@pytest.fixture(scope="module")
def embeddings_file(clustered, tmp_path_factory):
    import torch

    from mrl_clip.search.embed import save_embeddings

    database, queries = clustered
    folder = tmp_path_factory.mktemp("index")
    save_embeddings(folder / "db.npz", torch.from_numpy(database), [f"row{i}" for i in range(ROWS)],
                    {"model": "none", "kind": "texts"}, "float16")
    save_embeddings(folder / "queries.npz", torch.from_numpy(queries), [f"q{i}" for i in range(len(queries))],
                    {"model": "none", "kind": "texts"})
    return folder


@pytest.fixture
def one_thread():
    """faiss on one OpenMP thread while HNSW graphs are built: threads insert nodes in a racing order, one thread
    in row order, so two builds of the same rows give the same graph."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("stage1, funnel", [("hnsw16@32", "32:200,128:10"),
                                            ("hnsw16-binary@128", "binary@128:300,int8@128:50,128:10"),
                                            ("hnsw16-binary@12", "binary@12:300,int8@64:50,128:10"),
                                            ("int8@64", "int8@64:200,128:10")])
def test_built_index_file_searches_like_the_index_in_memory(embeddings_file, stage1, funnel, one_thread, capsys):
    """The file `index build` writes, loaded, searches exactly as an index built in memory from the same
    embeddings file (single-threaded builds: the same graph), and the search CLI over the file returns exactly
    those hits."""
    from mrl_clip.search import build
    from mrl_clip.search import main as search

    path = embeddings_file / f"{stage1}.index"
    assert build.main(["build", "--embeddings", str(embeddings_file / "db.npz"), "--stage1", stage1,
                       "--out", str(path)]) == 0
    loaded, items, meta, spec = load_index(path)
    assert items[7] == "row7" and meta["model"] == "none" and spec.label() == stage1
    fresh = EmbeddingIndex(np.load(embeddings_file / "db.npz")["embeddings"], "float16")
    np.testing.assert_array_equal(loaded.vectors, fresh.vectors)   # stored as normalised: no second rounding
    stages = parse_funnel(funnel, WIDTH)
    ef = 200 if spec.hnsw else None
    if spec.hnsw:
        fresh.build_hnsw(spec.dim, spec.hnsw, precision=spec.precision)
    queries = np.load(embeddings_file / "queries.npz")["embeddings"]   # what the CLI reads
    a, b = loaded.funnel_search(queries, stages, hnsw_ef=ef), fresh.funnel_search(queries, stages, hnsw_ef=ef)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    # the search CLI loads the file and uses its stage 1
    out = embeddings_file / f"{stage1}.json"
    ef_args = ["--hnsw-ef", str(ef)] if ef else []
    assert search.main(["--index", str(path), "--queries", str(embeddings_file / "queries.npz"), "--funnel", funnel,
                        *ef_args, "--output", str(out)]) == 0
    assert (f"the index file's {stage1}" in capsys.readouterr().out) == bool(spec.hnsw)
    hits = json.loads(out.read_text())["queries"]
    np.testing.assert_array_equal([[hit["id"] for hit in q["results"]] for q in hits], a.ids)
    np.testing.assert_array_equal(np.float32([[hit["score"] for hit in q["results"]] for q in hits]), a.scores)


@pytest.mark.parametrize("damage, message", [("truncate", "truncated"), ("flip", "fails its checksum"),
                                             ("manifest", "manifest is damaged")])
def test_damaged_index_file_is_a_user_error(embeddings_file, tmp_path, damage, message):
    from mrl_clip.search import build

    path = tmp_path / "db.index"
    build.main(["build", "--embeddings", str(embeddings_file / "db.npz"), "--stage1", "binary@64", "--out",
                str(path)])
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data[30:40] = b"##########"
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=message):
        load_index(path)


def test_damaged_index_file_is_one_line_from_the_search_cli(embeddings_file, tmp_path, capfd):
    """Through run_cli in this process, what `python -m mrl_clip search` runs (tests/test_cli.py runs that
    spelling once)."""
    from mrl_clip.search import build
    from mrl_clip.search import main as search

    path = tmp_path / "db.index"
    build.main(["build", "--embeddings", str(embeddings_file / "db.npz"), "--stage1", "int8@32", "--out",
                str(path)])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SystemExit) as exited:
        run_cli(search.main, ["--index", str(path), "--queries", str(embeddings_file / "queries.npz")])
    stderr = capfd.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} is ") and "truncated" in lines[0], stderr
