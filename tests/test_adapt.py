"""Matryoshka-Adaptor: identity at the start, its objective against a float64 recomputation, full-width
similarities kept, small prefixes that measurably improve on plain truncation of held-out rows, its file, its CLI."""
import json

import numpy as np
import pytest
import torch

from mrl_clip import adapt, adaptor as adaptors
from mrl_clip.errors import UserError
from mrl_clip.search.embed import save_embeddings

from .conftest import one_line_exit, run_module, run_verb

WIDTH, DIMS = 32, [4, 8, 16, 32]


def spread_embeddings(n, seed=0, rank=6):
    """Rows whose structure lies in a random `rank`-d subspace of WIDTH dims, so no prefix holds it: the case
    where plain truncation is poor and a rotation (PCA's, say) makes short prefixes good."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((WIDTH, WIDTH)))
    x = (rng.standard_normal((n, rank)) * np.linspace(3, 1, rank)) @ basis[:rank]
    x += 0.1 * rng.standard_normal((n, WIDTH))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_an_untrained_adaptor_is_plain_truncation_bit_for_bit():
    x = torch.as_tensor(spread_embeddings(50))
    for hidden in (0, 16):
        assert torch.equal(adaptors.MatryoshkaAdaptor(WIDTH, DIMS, hidden, trainable=True)(x), x)


def test_objective_equals_a_float64_recomputation():
    torch.manual_seed(0)
    adaptor = adaptors.MatryoshkaAdaptor(WIDTH, DIMS, hidden=8)
    with torch.no_grad():
        adaptor.linear.weight.copy_(torch.linalg.qr(torch.randn(WIDTH, WIDTH))[0])
        adaptor.down.weight.normal_(0, 0.1)
    settings = adapt.AdaptSettings(DIMS, [1.0, 2.0, 1.0, 0.5], topk=3, alpha=0.7, beta=0.3)
    x = torch.as_tensor(spread_embeddings(20))
    with torch.no_grad():
        ours = float(adapt.similarity_loss(adaptor, x, adaptor(x), settings))

    x64 = x.double().numpy()
    params = {k: v.detach().double().numpy() for k, v in adaptor.state_dict().items()}
    hidden = x64 @ params["up.weight"].T + params["up.bias"]
    gelu = 0.5 * hidden * (1 + np.vectorize(__import__("math").erf)(hidden / np.sqrt(2)))
    residual = gelu @ params["down.weight"].T
    fx = x64 @ params["linear.weight"].T + residual
    target = x64 @ x64.T
    expected = 0.3 * np.mean(np.sum(residual ** 2, axis=1))
    for dim, weight in zip(DIMS, settings.weights):
        z = fx[:, :dim] / np.linalg.norm(fx[:, :dim], axis=1, keepdims=True)
        error = np.abs(z @ z.T - target)
        masked = np.where(np.eye(len(x64), dtype=bool), -np.inf, target)
        nearest = np.argsort(-masked, axis=1)[:, :3]
        expected += weight * (np.take_along_axis(error, nearest, 1).mean() + 0.7 * error.mean())
    # float32 forward: each similarity carries ~WIDTH * 2**-24 relative error, the sum a few units of 1e-6
    assert ours == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def trained():
    x = spread_embeddings(700, seed=1)
    settings = adapt.AdaptSettings(DIMS, [1.0] * len(DIMS), steps=60, batch_size=256, lr=1e-2)
    return adapt.train_adaptor(x[:600], settings), torch.as_tensor(x[600:])


def test_trained_adaptor_keeps_full_width_and_improves_short_prefixes_on_held_out_rows(trained):
    adaptor, held = trained
    with torch.no_grad():
        fx = adaptor(held)
    # an orthogonal W: full-width similarities as they were, up to float32 rounding of a WIDTH-long dot product
    assert torch.allclose(fx @ fx.T, held @ held.T, atol=WIDTH * 2 ** -23 * 4)
    table = adapt.held_out_table(adaptor, held)
    assert table[WIDTH]["neighbour_recall@10_adapted"] == table[WIDTH]["neighbour_recall@10_truncated"] == 1.0
    for dim in (4, 8):
        gain = table[dim]["neighbour_recall@10_adapted"] - table[dim]["neighbour_recall@10_truncated"]
        assert gain > 0.1, (dim, table[dim])


def test_adaptor_file_round_trip_and_width_check(trained, tmp_path):
    adaptor, held = trained
    adaptors.save_adaptor(adaptor, tmp_path / "a.safetensors")
    loaded = adaptors.load_adaptor(tmp_path / "a.safetensors", width=WIDTH)
    assert loaded.dims == DIMS
    assert torch.equal(adaptors.adapt_embeddings(loaded, held.numpy()), adaptors.adapt_embeddings(adaptor, held.numpy()))
    with pytest.raises(UserError, match="maps 32-d embeddings; these are 64-d"):
        adaptors.load_adaptor(tmp_path / "a.safetensors", width=64)


def test_adapt_cli_writes_an_adaptor_and_reports_held_out_rows(tmp_path):
    x, y = spread_embeddings(300, seed=2), spread_embeddings(300, seed=2)
    y = (y + 0.05 * np.random.default_rng(3).standard_normal(y.shape)).astype(np.float32)
    for name, rows in (("a", x), ("b", y)):
        save_embeddings(tmp_path / f"{name}.npz", torch.as_tensor(rows), [str(i) for i in range(len(rows))], {})
    out = tmp_path / "pairs.safetensors"
    result = run_module("mrl_clip", "adapt", "--embeddings", tmp_path / "a.npz", "--pairs", tmp_path / "b.npz",
                        "--dims", ",".join(map(str, DIMS)), "--out", out, "--steps", "20", "--batch-size", "128",
                        "--report", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pair_recall@1_adapted" in result.stdout and "held-out rows: 30" in result.stdout
    assert adaptors.load_adaptor(out, WIDTH).dims == DIMS
    # --report holds the printed table (there in % to 2 decimals), every dim
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["held_out_rows"] == 30 and report["settings"]["steps"] == 20
    lines = result.stdout.splitlines()
    names = lines[lines.index("held-out rows: 30") + 1].split()[1:]
    printed = {row.split()[0]: list(map(float, row.split()[1:])) for row in lines[lines.index("held-out rows: 30") + 3:]
               if row.split() and row.split()[0].isdigit()}
    assert sorted(report["metrics"], key=int) == [str(d) for d in DIMS] == list(printed)
    for dim, values in printed.items():
        assert [100 * report["metrics"][dim][n] for n in names] == pytest.approx(values, abs=0.005 + 1e-9)


@pytest.mark.parametrize("extra, message", [
    (["--dims", "4,8,16"], "must end at the embedding width 32"),
    (["--dims", "4,32", "--pairs", "short.npz"], "row i of each must be a pair"),
    (["--dims", "4,32", "--held-out", "1.5"], "--held-out must be between 0 and 1"),
    (["--dims", "4,32", "--embeddings", "prefix.npz"], "learns from full-width float embeddings"),
])
def test_bad_adapt_input_is_one_line(tmp_path, extra, message, capfd):
    x = spread_embeddings(40)
    save_embeddings(tmp_path / "a.npz", torch.as_tensor(x), [str(i) for i in range(40)], {})
    save_embeddings(tmp_path / "short.npz", torch.as_tensor(x[:30]), [str(i) for i in range(30)], {})
    save_embeddings(tmp_path / "prefix.npz", torch.as_tensor(x), [str(i) for i in range(40)], {}, dim=8)
    args = ["--embeddings", "a.npz", "--out", "o.safetensors", *extra]
    args = [str(tmp_path / a) if a.endswith(".npz") else a for a in args]
    code, stderr = one_line_exit(adapt.main, args, capfd)
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_adaptor_through_embed_search_and_eval(trained_run, image_folder, fmnist_data, tmp_path, capfd):
    """A user's adaptor for the tiny trained model: `embed --adaptor` stores f(z / |z|) of open_clip's own
    embeddings (float64 reference), `search` finds with queries through the same adaptor (the file records it; another
    adaptor is one line), `eval zeroshot --adaptor` reports what zeroshot_metrics gives on adapted features."""
    import json

    import open_clip

    from mrl_clip import cli
    from mrl_clip.eval.zeroshot import encode_classification, load_classification_folder, zeroshot_metrics

    export = f"local-dir:{trained_run['export']}"
    full = tmp_path / "photos.npz"
    run_verb("embed", "--model", export, "--images", image_folder, "--output", full)
    adaptor_file, other = tmp_path / "photos.adaptor.safetensors", tmp_path / "other.adaptor.safetensors"
    run_verb("adapt", "--embeddings", full, "--dims", "8,16,32,64,128,256", "--out", adaptor_file, "--steps", "15",
             "--batch-size", "32")
    adaptor = adaptors.load_adaptor(adaptor_file, 256)
    assert not torch.equal(adaptor.linear.weight, torch.eye(256))   # it trained away from plain truncation
    adaptors.save_adaptor(adaptors.MatryoshkaAdaptor(256, adaptor.dims), other)   # an adaptor, not this one
    adapted = tmp_path / "adapted.npz"
    run_verb("embed", "--model", export, "--images", image_folder, "--output", adapted, "--adaptor", adaptor_file)
    with np.load(adapted) as stored:
        rows, meta = stored["embeddings"], json.loads(str(stored["meta"]))
    assert meta["adaptor"]["path"] == str(adaptor_file.resolve())
    with np.load(full) as stored:
        plain = stored["embeddings"].astype(np.float64)
    weight = adaptor.linear.weight.detach().double().numpy()
    expected = plain @ weight.T          # the file's rows are L2-normalised, so f is applied to them directly
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    # rows: float32 normalise, WIDTH-long float32 dot product, normalise again: a few float32 ulps of 1 each
    np.testing.assert_allclose(rows, expected, rtol=0, atol=256 * 2 ** -24 * 4)

    model, _, _ = open_clip.create_model_and_transforms(export)
    with torch.no_grad():
        query = model.encode_text(open_clip.get_tokenizer(export)(["a photo of a sandal."])).double().numpy()
    query = query / np.linalg.norm(query, axis=1, keepdims=True) @ weight.T
    hits = tmp_path / "hits.json"
    run_verb("search", "--index", adapted, "--text", "a photo of a sandal.", "--dim", "16", "--k", "5", "--output",
             hits)
    prefix = lambda x: x[:, :16] / np.linalg.norm(x[:, :16], axis=1, keepdims=True)  # noqa: E731
    scores = (prefix(query) @ prefix(rows.astype(np.float64)).T)[0]
    ids = [h["id"] for h in json.loads(hits.read_text())["queries"][0]["results"]]
    assert ids == np.argsort(-scores, kind="stable")[:5].tolist()
    code, stderr = one_line_exit(cli.main, ["search", "--index", adapted, "--text", "a bag.", "--adaptor", other],
                                 capfd)
    assert code == 2 and "is not the adaptor the index was embedded through" in stderr

    out = tmp_path / "zs.json"
    run_verb("eval", "zeroshot", "--model", export, "--data", fmnist_data["eval"], "--dims", "8,256", "--adaptor",
             adaptor_file, "--output", out)
    reported = json.loads(out.read_text())["metrics"]
    seen = adaptors.AdaptedModel(open_clip.create_model_and_transforms(export)[0], adaptor).eval()
    data = load_classification_folder(fmnist_data["eval"], open_clip.create_model_and_transforms(export)[2])
    mine = zeroshot_metrics(*encode_classification(seen, open_clip.get_tokenizer(export), data, [8, 256]), [8, 256])
    for dim in (8, 256):
        assert reported[str(dim)] == pytest.approx(mine[dim], abs=1e-12)
