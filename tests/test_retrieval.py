"""Exact and funnel search (mrl_clip.search.index) against float64 numpy brute force; the embed -> search CLI round
trip; `eval retrieval --funnel` against the exact evaluation; one-line errors for bad funnel specs."""
import json
import random

import numpy as np
import pytest

from mrl_clip.errors import UserError
from mrl_clip.search.index import EmbeddingIndex, parse_funnel
from pipelines import fashion_mnist
from tests import numerics
from tests.conftest import TINY, run_module

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


def test_eval_retrieval_bad_funnel_is_one_line(fmnist_data):
    result = run_module("mrl_clip.eval", "retrieval", "--model", TINY, "--data", fmnist_data["captions"],
                        "--funnel", "256:100,32:10", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "must not decrease" in lines[0], result.stderr


@pytest.fixture(scope="module")
def unique_caption_folder(tmp_path_factory):
    """A CLIP_benchmark retrieval folder whose captions are all distinct strings (class captions repeat, and
    equal texts tie, leaving recall@K to each library's tie order)."""
    from clip_benchmark.webdataset_builder import (
        PIL_to_bytes,
        convert_retrieval_dataset,
    )
    from PIL import Image

    images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")
    rng = random.Random(0)
    pairs = [(Image.fromarray(images[i]), [f"item {i} {t}".format(c=fashion_mnist.CLASSNAMES[labels[i]])
                                          for t in rng.sample(fashion_mnist.CAPTION_TEMPLATES, 2)])
             for i in range(120)]
    folder = tmp_path_factory.mktemp("unique_captions")
    convert_retrieval_dataset(pairs, "test", str(folder), transform=PIL_to_bytes("png"), image_format="png",
                              verbose=False)
    return folder


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
        assert entry["funnel"][kind]["metrics"] == pytest.approx(dense, abs=1e-9)
        assert all(ms > 0 for ms in entry["funnel"][kind]["ms_per_query"].values())
    assert "funnel 256:60,256:10" in result.stdout and "ms/query" in result.stdout


def test_eval_retrieval_binary_stage_one_covering_everything_equals_exact_eval(trained_run, unique_caption_folder,
                                                                              tmp_path):
    """A binary HNSW stage 1 whose shortlist holds every item (240 >= the 120 images and 240 captions), re-ranked
    at full width, is exact search: the same recall@K as CLIP_benchmark's on the full score matrix."""
    from mrl_clip.eval import main as mrl_eval

    out = tmp_path / "retrieval.json"
    assert mrl_eval.main(["retrieval", "--model", f"local-dir:{trained_run['export']}", "--data",
                          str(unique_caption_folder), "--dims", "256", "--funnel", "binary@256:240,256:10",
                          "--stage1", "hnsw16-binary@256", "--output", str(out)]) == 0
    entry = json.loads(out.read_text())["models"]["export"]
    assert entry["funnel"]["stages"] == "binary@256:240,256:10" and entry["funnel"]["stage1"] == "hnsw16-binary@256"
    assert entry["funnel"]["funnel"]["metrics"] == pytest.approx(entry["metrics"]["256"], abs=1e-9)


def test_embed_then_search_round_trip(trained_run, image_folder, tmp_path):
    """Images embedded by the CLI, text queries searched by the CLI == float64 brute force over the file with the
    query encoded here by open_clip itself."""
    import open_clip
    import torch

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
        result = run_module("mrl_clip", "search", "--index", index_file, "--text", queries[0], "--text", queries[1],
                            "--text", queries[2], "--dim", dim, "--k", 5, "--output", hits)
        assert result.returncode == 0, result.stderr[-3000:]
        found = json.loads(hits.read_text())["queries"]
        ids, scores = brute_topk(cosine64(embeddings.astype(np.float32), text, dim), 5)
        assert [[h["id"] for h in q["results"]] for q in found] == ids.tolist()
        np.testing.assert_allclose([[h["score"] for h in q["results"]] for q in found], scores, atol=1e-4)
        assert [q["query"] for q in found] == queries
        assert found[0]["results"][0]["item"] == items[ids[0, 0]]

    # the queries file through a full-width funnel gives the exact search's results
    outputs = {}
    for how in (["--dim", "256", "--k", "5"], ["--funnel", "256:20,256:5"]):
        path = tmp_path / f"hits_{how[0][2:]}.json"
        result = run_module("mrl_clip", "search", "--index", index_file, "--queries", texts_file, *how,
                            "--output", path)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[how[0]] = [[h["id"] for h in q["results"]] for q in json.loads(path.read_text())["queries"]]
    assert outputs["--dim"] == outputs["--funnel"]

    # an image finds itself first
    query_image = sorted(image_folder.glob("*.png"))[7]
    result = run_module("mrl_clip", "search", "--index", index_file, "--image", query_image, "--k", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[1].split()
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


def test_search_error_is_one_line(small_index):
    result = run_module("mrl_clip", "search", "--index", small_index, "--text", "x", "--dim", "300", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "error: --dim 300 is outside 1..256 (the width of " \
        f"{small_index})", result.stderr
