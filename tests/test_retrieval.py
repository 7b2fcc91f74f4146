"""Exact and funnel search (mrl_clip.search.index) against float64 numpy brute force; the embed -> search CLI round
trip; `eval retrieval --funnel` against the exact evaluation; one-line errors for bad funnel specs."""
import json

import numpy as np
import pytest

from mrl_clip.errors import UserError
from mrl_clip.search.index import EmbeddingIndex, parse_funnel
from tests import numerics
from tests.conftest import TINY, one_line_exit, run_module
from tests.recall import encoded_pairs, positives_of, recall_by_rank, undecided

WIDTH = 96


@pytest.fixture(scope="module")
def data():
    """Gaussian rows whose first dims carry more variance."""
    rng = np.random.default_rng(0)
    scale = np.linspace(3.0, 0.5, WIDTH)
    database = (rng.standard_normal((3000, WIDTH)) * scale).astype(np.float32)
    queries = (rng.standard_normal((25, WIDTH)) * scale).astype(np.float32)
    return database, queries


def cosine64(database, queries, dim):
    """float64 cosine similarity of re-normalised dim-prefixes: [queries, rows]."""
    x = database[:, :dim].astype(np.float64)
    q = queries[:, :dim].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q @ x.T


def brute_topk(scores, k):
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def stored_rows(index):
    """What the index holds, decoded: the reference searches these (float16 rounding included)."""
    return index.vectors.astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dim", [8, 32, WIDTH])
def test_exact_search_matches_float64_brute_force(data, dtype, dim):
    database, queries = data
    index = EmbeddingIndex(database, dtype)
    assert index.vectors.dtype == np.dtype(dtype) and index.vectors.shape == database.shape
    result = index.search(queries, k=10, dim=dim)
    exact = cosine64(stored_rows(index), queries, dim)
    numerics.assert_top_k_within(result.ids, exact, numerics.cosine_tolerance(dim))
    np.testing.assert_allclose(result.scores, np.take_along_axis(exact, result.ids, 1), rtol=0,
                               atol=numerics.cosine_tolerance(dim))


def test_float16_storage_halves_memory_and_keeps_the_ranking(data):
    database, queries = data
    full, half = EmbeddingIndex(database, "float32"), EmbeddingIndex(database, "float16")
    assert half.vectors.nbytes * 2 == full.vectors.nbytes
    a, b = full.search(queries, 10), half.search(queries, 10)
    bound = numerics.float16_cosine_error(WIDTH) + 2 * numerics.cosine_tolerance(WIDTH)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=bound)
    assert np.mean(a.ids == b.ids) > 0.95


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("funnel", [f"{WIDTH}:10", f"{WIDTH}:200,{WIDTH}:10", f"{WIDTH}:300,{WIDTH}:50,{WIDTH}:10"])
def test_funnel_with_full_width_stage_one_is_exact_search(data, dtype, funnel):
    database, queries = data
    index = EmbeddingIndex(database, dtype)
    exact = index.search(queries, k=10)
    result = index.funnel_search(queries, parse_funnel(funnel, WIDTH))
    cosine = cosine64(stored_rows(index), queries, WIDTH)
    numerics.assert_top_k_within(result.ids, cosine, numerics.cosine_tolerance(WIDTH))
    np.testing.assert_allclose(result.scores, exact.scores, rtol=0, atol=2 * numerics.cosine_tolerance(WIDTH))
    assert len(result.stage_seconds) == funnel.count(",") + 1


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_funnel_reranks_each_shortlist_like_numpy(data, dtype):
    """Stage 1 = float64 top-K1 at d1; each later stage = float64 top-K of the previous shortlist at its dim. A
    candidate whose float64 score ties another's within rounding may make either shortlist: stage by stage the ids
    must be a best-K of the stage's candidates up to rounding (numerics.assert_top_k_within); the funnel's own
    shortlists are the ones followed."""
    database, queries = data
    index = EmbeddingIndex(database, dtype)
    rows = stored_rows(index)
    stages = parse_funnel(f"8:400,24:100,48:30,{WIDTH}:10", WIDTH)
    shortlists = [index.funnel_search(queries, stages[:i + 1]).ids for i in range(len(stages))]
    numerics.assert_top_k_within(shortlists[0], cosine64(rows, queries, stages[0].dim),
                                 numerics.cosine_tolerance(stages[0].dim))
    for stage, before, after in zip(stages[1:], shortlists, shortlists[1:]):
        scores = np.take_along_axis(cosine64(rows, queries, stage.dim), before, axis=1)
        numerics.assert_top_k_within(positions(before, after), scores, numerics.cosine_tolerance(stage.dim))
    final = index.funnel_search(queries, stages)
    exact = np.take_along_axis(cosine64(rows, queries, WIDTH), final.ids, 1)
    np.testing.assert_allclose(final.scores, exact, rtol=0, atol=numerics.cosine_tolerance(WIDTH))


def test_hnsw_stage_one_then_exact_rerank(data):
    database, queries = data
    index = EmbeddingIndex(database)
    index.build_hnsw(16)
    stage1 = index.search(queries, 200, dim=16, hnsw_ef=200)
    result = index.funnel_search(queries, parse_funnel(f"16:200,{WIDTH}:10", WIDTH), hnsw_ef=200)
    cosine = cosine64(stored_rows(index), queries, WIDTH)
    for q in range(len(queries)):
        assert set(result.ids[q]) <= set(stage1.ids[q])
    # the final ten are the best ten of the HNSW shortlist at full width (up to rounding), with exact scores
    tolerance = numerics.cosine_tolerance(WIDTH)
    numerics.assert_top_k_within(positions(stage1.ids, result.ids), np.take_along_axis(cosine, stage1.ids, 1),
                                 tolerance)
    np.testing.assert_allclose(result.scores, np.take_along_axis(cosine, result.ids, 1), rtol=0, atol=tolerance)


def positions(shortlist, chosen):
    """Where each chosen id sits in its query's shortlist (every chosen id must be in it)."""
    found = np.argmax(shortlist[:, :, None] == chosen[:, None, :], axis=1)
    assert (np.take_along_axis(shortlist, found, 1) == chosen).all()
    return found


@pytest.mark.parametrize("text, message", [
    ("64:400,32:10", "must not decrease"),
    ("32:400,64:400", "counts must decrease"),
    ("32:100,128:200", "counts must decrease"),
    ("32:400,128:10", "above the embedding width 96"),
    ("32:400,96:5", "fewer than the 10 asked for"),
    ("32-400", "DIM:K stages"),
    ("32:400,", "DIM:K stages"),
    ("0:400,96:10", "must be positive"),
])
def test_bad_funnel_specs_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_funnel(text, width=WIDTH, final_k=10)


@pytest.mark.parametrize("funnel, message", [
    ("256:100,32:10", "must not decrease"),
    ("32:10,256:10", "counts must decrease"),
    ("32:400,512:10", "above the embedding width 256"),
    ("32:400,256:5", "fewer than the 10 asked for"),
    ("32:400,256:10 --stage1 hnsw32@64", "is not the funnel's first stage"),
    ("binary@64:400,256:10 --stage1 hnsw32@64", r"binary@64:400\)"),
    ("32:400,256:10 --stage1 int3@32", "unknown precision 'int3'"),
])
def test_eval_retrieval_bad_funnel_is_a_user_error(fmnist_data, funnel, message):
    from mrl_clip.eval import main as mrl_eval

    with pytest.raises(UserError, match=message):
        mrl_eval.main(["retrieval", "--model", TINY, "--data", str(fmnist_data["captions"]), "--funnel",
                       *funnel.split(), "--recall-k", "1,10"])


def test_eval_retrieval_bad_funnel_is_one_line(fmnist_data, capfd):
    from mrl_clip.eval import main as mrl_eval

    code, stderr = one_line_exit(mrl_eval.main, ["retrieval", "--model", TINY, "--data", fmnist_data["captions"],
                                                 "--funnel", "256:100,32:10"], capfd)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "must not decrease" in lines[0], stderr


def test_eval_retrieval_funnel_at_full_width_equals_exact_eval(trained_run, unique_caption_folder, tmp_path):
    out = tmp_path / "retrieval.json"
    result = run_module("mrl_clip.eval", "retrieval", "--model", f"local-dir:{trained_run['export']}",
                        "--data", unique_caption_folder, "--dims", "32,256", "--funnel", "256:60,256:10",
                        "--recall-k", "1,5,10", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    entry = json.loads(out.read_text())["models"]["export"]
    dense = entry["metrics"]["256"]   # CLIP_benchmark's recall_at_k on the full score matrix
    assert entry["funnel"]["stages"] == "256:60,256:10"
    for kind in ("funnel", "exact"):
        # the same 0/1 hits averaged the same way (float32 means over the same queries): equal, not close
        assert entry["funnel"][kind]["metrics"] == dense
        assert all(ms > 0 for ms in entry["funnel"][kind]["ms_per_query"].values())
    assert "funnel 256:60,256:10" in result.stdout and "ms/query" in result.stdout


def test_eval_retrieval_binary_stage_one_then_full_width_rerank_matches_numpy(trained_run, unique_caption_folder,
                                                                            tmp_path):
    """`eval retrieval --funnel binary@12:30,256:10 --stage1 binary@12`: a shortlist of 30 (of 120 images, of 240
    captions: it covers neither) by the Hamming distance of 12 sign bits, ties to the lower index (faiss's
    IndexBinaryFlat), re-ranked at full width, against numpy: the Hamming top-30 re-ranked by float64 cosine."""
    from mrl_clip.eval import main as mrl_eval

    model, out = f"local-dir:{trained_run['export']}", tmp_path / "retrieval.json"
    assert mrl_eval.main(["retrieval", "--model", model, "--data", str(unique_caption_folder), "--dims", "256",
                          "--funnel", "binary@12:30,256:10", "--stage1", "binary@12", "--output", str(out)]) == 0
    entry = json.loads(out.read_text())["models"]["export"]
    assert entry["funnel"]["stages"] == "binary@12:30,256:10" and entry["funnel"]["stage1"] == "binary@12"
    images, texts, index = encoded_pairs(model, unique_caption_folder)
    positives = positives_of(index, len(images))
    tolerance = numerics.cosine_tolerance(256)
    for side, queries, database, pos in (("image", texts, images, positives), ("text", images, texts, positives.T)):
        hamming = ((queries[:, None, :12] > 0) != (database[None, :, :12] > 0)).sum(-1)
        rows = np.broadcast_to(np.arange(len(database)), hamming.shape)
        shortlist = np.lexsort((rows, hamming), axis=1)[:, :30]
        cosine = cosine64(database, queries, 256)
        assert (shortlist != cosine.argmax(1)[:, None]).all(1).any()   # some exact best is not shortlisted
        reranked = np.full_like(cosine, -np.inf)
        np.put_along_axis(reranked, shortlist, np.take_along_axis(cosine, shortlist, 1), 1)
        for k in (1, 5, 10):
            # float32 re-rank scores within cosine_tolerance of float64; the JSON's recall is a float32 mean of 0/1
            # hits (one rounding of a value <= 1)
            slack = undecided(reranked, pos, k, tolerance).mean() + numerics.U32
            reference = recall_by_rank(reranked, pos, k, False)
            assert abs(entry["funnel"]["funnel"]["metrics"][f"{side}_retrieval_recall@{k}"] - reference) <= slack


def test_embed_then_search_round_trip(trained_run, image_folder, tmp_path, capsys):
    """Images embedded by the CLI, text queries searched by the CLI == float64 brute force over the file with the
    query encoded here by open_clip itself. The searches run the search verb's main() in this process (what
    `python -m mrl_clip search` runs; tests/test_cli.py runs that spelling), saving a process start each."""
    import open_clip
    import torch

    from mrl_clip.search import main as search

    export = f"local-dir:{trained_run['export']}"
    index_file, texts_file = tmp_path / "photos.npz", tmp_path / "queries.npz"
    result = run_module("mrl_clip", "embed", "--model", export, "--images", image_folder, "--output", index_file,
                        "--dtype", "float16")
    assert result.returncode == 0, result.stderr[-3000:]
    captions = tmp_path / "captions.txt"
    queries = ["a photo of a sandal.", "a photo of a trouser.", "a bag."]
    captions.write_text("\n".join(queries) + "\n")
    embedded = run_module("mrl_clip", "embed", "--model", export, "--texts", captions, "--output", texts_file)
    assert embedded.returncode == 0, embedded.stderr[-3000:]

    with np.load(index_file) as stored:
        embeddings, items = stored["embeddings"], list(stored["items"])
        meta = json.loads(str(stored["meta"]))
    assert embeddings.dtype == np.float16 and embeddings.shape == (40, 256)
    assert items == sorted(str(p) for p in image_folder.glob("*.png")) and meta["kind"] == "images"

    model, _, _ = open_clip.create_model_and_transforms(export)
    model.eval()
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(export)(queries)).numpy()
    for dim in (16, 256):
        hits = tmp_path / f"hits{dim}.json"
        assert search.main(["--index", str(index_file), "--text", queries[0], "--text", queries[1], "--text",
                            queries[2], "--dim", str(dim), "--k", "5", "--output", str(hits)]) == 0
        found = json.loads(hits.read_text())["queries"]
        # the search re-normalises the file's float16 rows into its float16 storage: the reference searches those
        # rows in float64, so the float32 scores are within cosine_tolerance (normalise, then dot) of it
        ids, scores = brute_topk(cosine64(stored_rows(EmbeddingIndex(embeddings, "float16")), text, dim), 5)
        assert [[h["id"] for h in q["results"]] for q in found] == ids.tolist()
        np.testing.assert_allclose([[h["score"] for h in q["results"]] for q in found], scores, rtol=0,
                                   atol=numerics.cosine_tolerance(dim))
        assert [q["query"] for q in found] == queries
        assert found[0]["results"][0]["item"] == items[ids[0, 0]]

    # the queries file through a full-width funnel gives the exact search's results
    outputs = {}
    for how in (["--dim", "256", "--k", "5"], ["--funnel", "256:20,256:5"]):
        path = tmp_path / f"hits_{how[0][2:]}.json"
        assert search.main(["--index", str(index_file), "--queries", str(texts_file), *how, "--output", str(path)]) == 0
        outputs[how[0]] = [[h["id"] for h in q["results"]] for q in json.loads(path.read_text())["queries"]]
    assert outputs["--dim"] == outputs["--funnel"]

    # an image finds itself first
    query_image = sorted(image_folder.glob("*.png"))[7]
    capsys.readouterr()
    assert search.main(["--index", str(index_file), "--image", str(query_image), "--k", "3"]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert first[0] == "1" and first[2] == str(query_image) and float(first[1]) > 0.999


@pytest.fixture
def small_index(trained_run, tmp_path):
    import torch

    from mrl_clip.search.embed import save_embeddings

    index_file = tmp_path / "five.npz"
    save_embeddings(index_file, torch.randn(5, 256), [f"item{i}" for i in range(5)],
                    {"model": f"local-dir:{trained_run['export']}", "kind": "texts"})
    return index_file


@pytest.mark.parametrize("args, message", [
    (["--text", "x", "--dim", "300"], "outside 1..256"),
    (["--text", "x", "--funnel", "32:10,256:20"], "counts must decrease"),
    (["--text", "x", "--funnel", "32:10,256:5", "--k", "8"], "fewer than the 8 asked for"),
    (["--image", "/nonexistent.png"], "not found"),
    ([], "give at least one query"),
])
def test_search_errors_are_user_errors(small_index, args, message):
    from mrl_clip.search import main as search

    with pytest.raises(UserError, match=message):
        search.main(["--index", str(small_index), *args])


def test_search_error_is_one_line(small_index, capfd):
    from mrl_clip.search import main as search

    code, stderr = one_line_exit(search.main, ["--index", small_index, "--text", "x", "--dim", "300"], capfd)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "error: --dim 300 is outside 1..256 (the width of " \
        f"{small_index})", stderr
