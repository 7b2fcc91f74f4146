"""mrl_clip.quantize against independent references: faiss's IndexScalarQuantizer (int8) and IndexBinaryFlat
(binary) searching the same vectors, and numpy re-computations of codes, scores and the eval metrics built on them."""
import json
import math

import faiss
import numpy as np
import pytest
import torch

from mrl_clip import quantize
from mrl_clip.errors import UserError
from mrl_clip.eval.zeroshot import classifier_at, quantized_zeroshot_metrics
from mrl_clip.eval.zeroshot_retrieval import quantized_retrieval_metrics
from mrl_clip.prefix import normalized_prefix

from . import numerics
from .recall import encoded_pairs, positives_of, recall_by_rank, undecided

WIDTH = 40


def gaussian_rows(rng, n, width=WIDTH):
    """Rows whose first dims carry more variance, as Matryoshka embeddings do."""
    return (rng.standard_normal((n, width)) * np.linspace(2.0, 0.5, width)).astype(np.float32)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    return gaussian_rows(rng, 2000), gaussian_rows(rng, 30)


def prefix64(x, dim):
    x = x[:, :dim].astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def int8_reference(database, dim):
    """float64 numpy: per-dim ranges of the float32 prefixes, codes floor(255 * clip((x - min) / (max - min))), the
    bin centres min + (code + 0.5) / 255 * (max - min); and where each code sits within float32 rounding of a bin edge
    (there faiss's float32 arithmetic may land on either side)."""
    x = normalized_prefix(database, dim).astype(np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    diff = np.float32(hi) - np.float32(lo)  # faiss's vdiff is a float32 difference
    t = np.clip((x - lo) / diff, 0, 1) * 255
    codes = np.floor(t)
    edge = np.abs(t - np.round(t)) <= 255 * numerics.gamma(4)
    return codes, lo + (codes + 0.5) / 255 * diff, edge, lo, diff


def int8_tolerance(queries64, lo, diff, dim):
    """|computed - exact| of float query . decoded item: faiss decodes each component with up to 3 roundings
    (divide, multiply, add) of magnitude <= |min| + 1.01 |max - min| (the top bin centre is 255.5/255 of the range),
    and the dot product adds gamma(dim) of sum |q_j d_j|; both within gamma(dim + 3) sum_j |q_j| (|min_j| + 1.01
    |diff_j|), plus the query's own normalisation gamma(dim + 3) relative."""
    bound = np.abs(queries64) @ (np.abs(lo) + 1.01 * np.abs(diff))
    return numerics.gamma(dim + 3) * bound * 2


def edge_slack(queries64, edge, diff):
    """Per query, the most a score can move when codes on a bin edge (either neighbour right) take the other bin."""
    return (np.abs(queries64) @ (edge * np.abs(diff) / 255).T).max(axis=1)


@pytest.mark.parametrize("dim", [8, 13, WIDTH])
def test_int8_codes_and_scores_match_numpy(rows, dim):
    database, queries = rows
    x = normalized_prefix(database, dim)
    ranges = quantize.calibrate(x)
    codes = quantize.encode(x, "int8", ranges)
    assert codes.dtype == np.int8 and codes.shape == (len(database), dim)
    ref_codes, ref_decoded, edge, lo, diff = int8_reference(database, dim)
    ours = codes.astype(np.int64) + 128
    assert np.all((ours == ref_codes) | (edge & (np.abs(ours - ref_codes) == 1)))
    assert ours.min() == 0 and ours.max() == 255 and (ours == 255).sum() >= dim  # 255 only at each dim's max
    q = prefix64(queries, dim)
    exact = q @ ref_decoded.T
    # where a code sits on a bin edge either neighbour is right: compare against the code actually chosen
    exact_chosen = q @ (lo + (ours + 0.5) / 255 * diff).T
    scores = quantize.score(normalized_prefix(queries, dim), codes, "int8", dim, ranges)
    tolerance = int8_tolerance(q, lo, diff, dim)[:, None]
    assert np.all(np.abs(scores - exact_chosen) <= tolerance)
    assert np.mean(np.abs(exact - exact_chosen) > 0) < 0.05  # edge codes are rare


@pytest.mark.parametrize("dim", [8, 13, WIDTH])
def test_int8_scores_match_faiss_index_scalar_quantizer(rows, dim):
    """faiss trains its own QT_8bit quantizer (RS_minmax) on the same prefixes: the same codes, and its inner-product
    search returns a top-10 of our scores with its scores within rounding of ours."""
    database, queries = rows
    x, q = normalized_prefix(database, dim), normalized_prefix(queries, dim)
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    ranges = quantize.calibrate(x)
    trained = faiss.vector_to_array(index.sq.trained)
    np.testing.assert_array_equal(trained, np.concatenate([ranges[0], ranges[1] - ranges[0]]))
    codes = quantize.encode(x, "int8", ranges)
    stored = faiss.vector_to_array(index.codes).reshape(len(x), dim)
    np.testing.assert_array_equal(stored, codes.astype(np.int16) + 128)
    distances, ids = index.search(q, 10)
    scores = quantize.score(q, codes, "int8", dim, ranges)
    _, _, _, lo, diff = int8_reference(database, dim)
    tolerance = int8_tolerance(prefix64(queries, dim), lo, diff, dim)
    assert np.all(np.abs(distances - np.take_along_axis(scores, ids, 1)) <= 2 * tolerance[:, None])
    for row, (found, s) in enumerate(zip(ids, scores)):
        numerics.assert_top_k_within(found[None], s[None].astype(np.float64), tolerance[row])


def test_int8_clips_values_outside_the_calibration_range():
    ranges = np.array([[-0.5, 0.0], [0.5, 1.0]], dtype=np.float32)
    codes = quantize.encode(np.array([[-3.0, 2.0], [0.5, 0.0]], dtype=np.float32), "int8", ranges)
    np.testing.assert_array_equal(codes.astype(int) + 128, [[0, 255], [255, 0]])
    decoded = quantize.decode(codes, "int8", ranges)
    # faiss decodes vmin + (code + 0.5) / 255 * vdiff in float32: three roundings of magnitudes <= |vmin| + 1.01 vdiff
    bound = numerics.gamma(3) * (np.abs(ranges[0]) + 1.01 * (ranges[1] - ranges[0]))
    assert np.all(np.abs(decoded - [[-0.5 + 0.5 / 255, 1 + 0.5 / 255], [0.5 + 0.5 / 255, 0.5 / 255]]) <= bound)


@pytest.mark.parametrize("dim", [8, 12, 13, WIDTH])
def test_binary_scores_are_sign_dot_products_and_faiss_hamming(rows, dim):
    database, queries = rows
    x, q = normalized_prefix(database, dim), normalized_prefix(queries, dim)
    codes = quantize.encode(x, "binary")
    assert codes.dtype == np.uint8 and codes.shape == (len(x), math.ceil(dim / 8))
    if dim % 8:  # the padding bits (low bits of the last byte) are zero
        assert not np.any(codes[:, -1] & ((1 << (8 - dim % 8)) - 1))
    signs_x, signs_q = np.where(database[:, :dim] > 0, 1, -1), np.where(queries[:, :dim] > 0, 1, -1)
    scores = quantize.score(q, codes, "binary", dim)
    # the cosine of the sign vectors: two float32 roundings of values <= 2 off the float64 one (exact for dim 8)
    np.testing.assert_allclose(scores, signs_q @ signs_x.T / dim, rtol=0, atol=4 * numerics.U32)
    np.testing.assert_array_equal(quantize.decode(codes, "binary", dim=dim), signs_x)
    # faiss's IndexBinaryFlat: Hamming distances, ties in id order; ranking_scores orders the same way
    index = faiss.IndexBinaryFlat(8 * codes.shape[1])
    index.add(codes)
    distances, ids = index.search(quantize.encode(q, "binary"), 50)
    np.testing.assert_array_equal(quantize.binary_scores(distances, dim), np.take_along_axis(scores, ids, 1))
    np.testing.assert_array_equal(dim - 2 * distances, np.take_along_axis(signs_q @ signs_x.T, ids, 1))
    ranked = np.argsort(-quantize.ranking_scores(scores, "binary", dim), axis=1, kind="stable")[:, :50]
    np.testing.assert_array_equal(ranked, ids)
    by_key = np.lexsort((np.broadcast_to(np.arange(len(x)), scores.shape), -scores), axis=1)[:, :50]
    np.testing.assert_array_equal(ranked, by_key)


@pytest.mark.parametrize("dim", [8, WIDTH])
def test_float16_scores_round_the_stored_side(rows, dim):
    """float16 stores the database rounded and scores the float32 query against it, as faiss's
    IndexScalarQuantizer QT_fp16 (the funnel's float16 stages) does."""
    database, queries = rows
    x, q = normalized_prefix(database, dim), normalized_prefix(queries, dim)
    scores = quantize.similarity(q, x, "float16")
    exact = q.astype(np.float64) @ x.astype(np.float16).astype(np.float64).T
    # the float16 values are exact in float32; the float32 dot product of unit-ish vectors adds gamma(dim)
    assert np.all(np.abs(scores - exact) <= numerics.gamma(dim) * 1.01)
    assert np.abs(scores - q @ x.T).max() > 0  # rounding happened
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    # faiss's QT_fp16 codes are numpy's float16 but where x sits exactly halfway between two float16 values
    # (numpy rounds to even, faiss not): both a nearest float16
    theirs = faiss.vector_to_array(index.codes).view(np.float16).reshape(x.shape).astype(np.float64)
    ours = quantize.encode(x, "float16").astype(np.float64)
    assert np.mean(theirs != ours) < 1e-3
    np.testing.assert_array_equal(np.abs(theirs - x), np.abs(ours - x))
    found, ids = index.search(q, 10)
    assert np.all(np.abs(found - np.take_along_axis(scores, ids, 1)) <= 2 * numerics.gamma(dim) * 1.01)


@pytest.mark.parametrize("precision", quantize.PRECISIONS)
@pytest.mark.parametrize("dim", [8, 13, WIDTH])
def test_bytes_per_vector_is_what_the_codes_take(rows, precision, dim):
    x = normalized_prefix(rows[0], dim)
    codes = quantize.encode(x, precision, quantize.calibrate(x))
    assert codes.nbytes == len(x) * quantize.bytes_per_vector(precision, dim)


@pytest.mark.parametrize("text, message", [("int4", "unknown precision 'int4'"), ("float32,bf16", "'bf16'"),
                                           (",", "is empty")])
def test_bad_precision_lists_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        quantize.parse_precisions(text)


def test_precision_list_is_ordered_and_deduplicated():
    assert quantize.parse_precisions("binary, int8,float32,int8") == ["float32", "int8", "binary"]


@pytest.fixture(scope="module")
def pairs():
    """Images and two noisy captions each: texts near their image."""
    rng = np.random.default_rng(1)
    images = gaussian_rows(rng, 150)
    texts = np.repeat(images, 2, axis=0) + 1.5 * gaussian_rows(rng, 300)
    return torch.from_numpy(images), torch.from_numpy(texts), torch.arange(150).repeat_interleave(2)


@pytest.mark.parametrize("dim", [8, 13, WIDTH])
def test_binary_retrieval_metrics_match_a_numpy_recount(pairs, dim):
    images, texts, index = pairs
    metrics = quantized_retrieval_metrics(images, texts, index, [dim], "binary", recall_k=(1, 5, 10))[dim]
    si, st = np.where(images[:, :dim].numpy() > 0, 1, -1), np.where(texts[:, :dim].numpy() > 0, 1, -1)
    positives = positives_of(index, len(images))
    sim = st @ si.T
    for k in (1, 5, 10):
        # float32 means of 0/1 hits against float64 ones: one rounding of a value <= 1
        assert abs(metrics[f"image_retrieval_recall@{k}"] - recall_by_rank(sim, positives, k, True)) <= numerics.U32
        assert abs(metrics[f"text_retrieval_recall@{k}"] - recall_by_rank(sim.T, positives.T, k, True)) <= numerics.U32
    assert metrics["bytes_per_vector"] == math.ceil(dim / 8)


@pytest.mark.parametrize("dim", [8, WIDTH])
def test_int8_retrieval_metrics_match_a_numpy_recount(pairs, dim):
    images, texts, index = pairs
    metrics = quantized_retrieval_metrics(images, texts, index, [dim], "int8", recall_k=(1, 5))[dim]
    positives = positives_of(index, len(images))
    for side, queries, database, pos in (("image", texts, images, positives), ("text", images, texts, positives.T)):
        _, decoded, edge, lo, diff = int8_reference(database.numpy(), dim)
        q = prefix64(queries.numpy(), dim)
        exact = q @ decoded.T
        tolerance = int8_tolerance(q, lo, diff, dim) + edge_slack(q, edge, diff)
        for k in (1, 5):
            expected = recall_by_rank(exact, pos, k, False)
            slack = undecided(exact, pos, k, tolerance).mean()
            assert abs(metrics[f"{side}_retrieval_recall@{k}"] - expected) <= slack + numerics.U32


@pytest.mark.parametrize("precision", ["binary", "int8"])
def test_zeroshot_metrics_store_the_images_quantised(precision):
    """The images are the database (int8 calibrated on them), each class's classifier the float query; binary:
    sign dot products, ties to the lower class index."""
    rng = np.random.default_rng(2)
    classes, dim = 6, 16
    prompts = torch.from_numpy(gaussian_rows(rng, classes * 3).reshape(classes, 3, WIDTH))
    labels = torch.from_numpy(rng.integers(0, classes, 400))
    images = torch.from_numpy(prompts.numpy().mean(axis=1)[labels.numpy()] + 1.5 * gaussian_rows(rng, 400))
    metrics = quantized_zeroshot_metrics(images, labels, prompts, [dim], precision)[dim]
    classifier = classifier_at(prompts, dim).double().numpy()
    if precision == "binary":
        logits = np.where(images[:, :dim].numpy() > 0, 1, -1) @ np.where(classifier > 0, 1, -1).T
        predicted = np.argmax(logits, axis=1)  # first of the tied maxima
        assert metrics["acc1"] == pytest.approx(np.mean(predicted == labels.numpy()))
        return
    _, decoded, edge, lo, diff = int8_reference(images.numpy(), dim)
    logits = decoded @ classifier.T      # the classifier is the float32 query itself, so only the scores' rounding
    tolerance = int8_tolerance(classifier, lo, diff, dim).max() + (np.abs(classifier) @ (edge * diff / 255).T).max()
    top2 = -np.sort(-logits, axis=1)[:, :2]
    slack = np.mean(top2[:, 0] - top2[:, 1] <= 2 * tolerance)
    assert abs(metrics["acc1"] - np.mean(logits.argmax(axis=1) == labels.numpy())) <= slack + 1e-12
    assert metrics["bytes_per_vector"] == dim


def test_eval_retrieval_cli_numbers_match_a_numpy_recount(trained_run, unique_caption_folder, tmp_path, capsys):
    """`eval retrieval --embedding-precision binary,int8,float32` (its main(), in-process): every recall@K in the
    JSON, float32 ("metrics") and quantised ("quantized", with bytes per vector) at every dim, against a numpy
    float64 recount from the same features; a table per precision and the bytes-per-vector plot."""
    from mrl_clip.eval import main as mrl_eval

    model, dims, recall_k = f"local-dir:{trained_run['export']}", [8, 13, 256], (1, 5, 10)
    assert mrl_eval.main(["retrieval", "--model", model, "--data", str(unique_caption_folder), "--dims", "8,13,256",
                          "--embedding-precision", "binary,int8,float32", "--output", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "r.png")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    entry = report["models"]["export"]
    assert list(entry["quantized"]) == ["int8", "binary"] and report["quantized"] == entry["quantized"]
    assert "== int8" in printed and "== binary" in printed
    assert (tmp_path / "r_precision.png").stat().st_size > 1000

    images, texts, index = encoded_pairs(model, unique_caption_folder)
    positives = positives_of(index, len(images))
    for dim in dims:
        got = {p: by_dim[str(dim)] for p, by_dim in entry["quantized"].items()}
        got["float32"] = entry["metrics"][str(dim)]
        assert all(set(got[p]) == set(got["float32"]) | {"bytes_per_vector"} for p in ("int8", "binary"))
        assert [got[p]["bytes_per_vector"] for p in ("int8", "binary")] == [dim, math.ceil(dim / 8)]
        for side, queries, database, pos in (("image", texts, images, positives),
                                             ("text", images, texts, positives.T)):
            q = prefix64(queries, dim)
            # float32: the float64 cosine, each float32 score within cosine_tolerance of it
            cosine = q @ prefix64(database, dim).T
            expected = {"float32": (cosine, False, numerics.cosine_tolerance(dim))}
            # binary: sign dot products, exact; ties to the lower index
            signs = np.where(queries[:, :dim] > 0, 1, -1) @ np.where(database[:, :dim] > 0, 1, -1).T
            expected["binary"] = (signs, True, 0.0)
            # int8: the float query . numpy's decoded codes (calibrated on the searched side)
            _, decoded, edge, lo, diff = int8_reference(database, dim)
            expected["int8"] = (q @ decoded.T, False, int8_tolerance(q, lo, diff, dim) + edge_slack(q, edge, diff))
            for precision, (scores, tie_order, tolerance) in expected.items():
                for k in recall_k:
                    reference = recall_by_rank(scores, pos, k, tie_order)
                    slack = undecided(scores, pos, k, tolerance).mean() if not tie_order else 0.0
                    # the JSON's recall is a float32 mean of 0/1 hits: one rounding of a value <= 1
                    assert abs(got[precision][f"{side}_retrieval_recall@{k}"] - reference) <= slack + numerics.U32, \
                        (precision, dim, side, k)


def test_save_embeddings_writes_prefix_codes_and_calibration(tmp_path):
    from mrl_clip.search.embed import load_embeddings, read_embeddings, save_embeddings

    rng = np.random.default_rng(3)
    full = gaussian_rows(rng, 50)
    for precision, dim in (("int8", 12), ("binary", 13), ("float16", 12)):
        path = tmp_path / f"{precision}.npz"
        save_embeddings(path, torch.from_numpy(full), [f"x{i}" for i in range(50)], {"kind": "texts"}, dim=dim,
                        precision=precision)
        stored = read_embeddings(path)
        assert (stored.precision, stored.dim, stored.width) == (precision, dim, WIDTH)
        assert stored.meta["normalised"] == "prefix" and stored.items[3] == "x3"
        prefix = prefix64(full, dim)
        if precision == "int8":
            codes, _, edge, lo, diff = int8_reference(full, dim)
            np.testing.assert_array_equal(stored.ranges[0], lo)
            np.testing.assert_array_equal(stored.ranges[1] - stored.ranges[0], diff)
            ours = stored.codes.astype(np.int64) + 128
            assert np.all((ours == codes) | edge)
            # the docstring's decoding, in numpy: min + (code + 128.5) / 255 * (max - min)
            mine = stored.ranges[0] + (stored.codes + 128.5) / 255 * (stored.ranges[1] - stored.ranges[0])
            # faiss: three float32 roundings (as above) of magnitudes <= |min| + 1.01 |max - min|, and its vdiff is
            # a float32 difference (one more)
            lo, diff = stored.ranges[0].astype(np.float64), np.float64(stored.ranges[1]) - stored.ranges[0]
            bound = numerics.gamma(4) * (np.abs(lo) + 1.01 * np.abs(diff))
            assert np.all(np.abs(quantize.decode(stored.codes, "int8", stored.ranges) - mine) <= bound)
        elif precision == "binary":
            np.testing.assert_array_equal(np.unpackbits(stored.codes, axis=1, count=dim), prefix > 0)
        else:
            np.testing.assert_array_equal(stored.codes, prefix.astype(np.float32).astype(np.float16))
            np.testing.assert_array_equal(load_embeddings(path)[0], stored.codes)
    with pytest.raises(UserError, match="holds int8 codes"):
        load_embeddings(tmp_path / "int8.npz")


@pytest.mark.parametrize("precision, dim", [("int8", 16), ("binary", 12)])
def test_embed_prefix_codes_then_search(trained_run, image_folder, tmp_path, precision, dim, capsys):
    """`embed --dim M --precision P`, then `search --text` (their main(), in-process; the `python -m` wiring is
    test_cli's): the hits are numpy's brute force over the file's codes (decoded with its ranges, or as sign bits;
    12 dims: 1.5 bytes, zero-padded) with the query encoded here by open_clip at full width, sliced to M and
    re-normalised. A binary file and a binary@M funnel stage over the full-width file give the same hits."""
    import open_clip

    from mrl_clip.search import embed
    from mrl_clip.search import main as search

    export = f"local-dir:{trained_run['export']}"
    index_file = tmp_path / "photos.npz"
    embed.main(["--model", export, "--images", str(image_folder), "--output", str(index_file), "--dim", str(dim),
                "--precision", precision, "--device", "cpu"])
    assert f"x {dim} dims ({precision}, {quantize.bytes_per_vector(precision, dim)} bytes each)" in \
        capsys.readouterr().out
    stored = embed.read_embeddings(index_file)
    queries = ["a photo of a sandal.", "a photo of a trouser.", "a bag."]

    def searched(path, *how):
        hits = tmp_path / "hits.json"
        search.main(["--index", str(path), *[a for q in queries for a in ("--text", q)], *how, "--output", str(hits),
                     "--device", "cpu"])
        found = json.loads(hits.read_text())["queries"]
        return (np.array([[h["id"] for h in q["results"]] for q in found]),
                np.array([[h["score"] for h in q["results"]] for q in found]))

    ids, scores = searched(index_file, "--k", "5")
    model, _, _ = open_clip.create_model_and_transforms(export)
    with torch.no_grad():
        text = model.eval().encode_text(open_clip.get_tokenizer(export)(queries)).numpy()
    q = prefix64(text, dim)
    if precision == "binary":
        bits = np.unpackbits(stored.codes, axis=1)
        assert stored.codes.shape[1] == 2 and not bits[:, dim:].any()   # 12 sign bits and 4 zero bits a row
        h = ((q > 0)[:, None, :] != bits[None, :, :dim]).sum(-1)         # numpy's Hamming distance
        order = np.lexsort((np.broadcast_to(np.arange(h.shape[1]), h.shape), h), axis=1)[:, :5]
        np.testing.assert_array_equal(ids, order)
        # 1 - 2h/M in float32: two roundings of values <= 2 off the float64 value
        np.testing.assert_allclose(scores, 1 - 2 * np.take_along_axis(h, order, 1) / dim, rtol=0,
                                   atol=4 * numerics.U32)
        full_file = tmp_path / "full.npz"
        embed.main(["--model", export, "--images", str(image_folder), "--output", str(full_file), "--device", "cpu"])
        funnel_ids, funnel_scores = searched(full_file, "--funnel", f"binary@{dim}:5")
        np.testing.assert_array_equal(funnel_ids, ids)
        np.testing.assert_array_equal(funnel_scores, scores)
        return
    lo, hi = stored.ranges.astype(np.float64)
    exact = q @ (lo + (stored.codes + 128.5) / 255 * (hi - lo)).T
    tolerance = int8_tolerance(q, lo, hi - lo, dim)
    for row in range(len(queries)):
        numerics.assert_top_k_within(ids[row:row + 1], exact[row:row + 1], tolerance[row])
        assert np.all(np.abs(scores[row] - exact[row, ids[row]]) <= tolerance[row])


@pytest.mark.parametrize("precision, args, message", [
    ("int8", ["--dim", "8"], "searchable at 16 only"),
    ("binary", ["--funnel", "16:10,16:5"], "--funnel needs float embeddings"),
    ("int8", ["--dim", "17"], "outside 1..16"),
])
def test_search_of_codes_refuses_what_they_cannot_do(trained_run, tmp_path, precision, args, message):
    from mrl_clip.search import main as search
    from mrl_clip.search.embed import save_embeddings

    index_file = tmp_path / "five.npz"
    save_embeddings(index_file, torch.randn(5, 256), [f"item{i}" for i in range(5)],
                    {"model": f"local-dir:{trained_run['export']}", "kind": "texts"}, dim=16, precision=precision)
    with pytest.raises(UserError, match=message):
        search.main(["--index", str(index_file), "--text", "x", *args])
