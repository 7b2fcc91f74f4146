import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification
from torch.utils.data import DataLoader

from mrl_clip.errors import run_cli
from mrl_clip.eval import cascade as cascade_module
from mrl_clip.eval import main as eval_main
from mrl_clip.eval import probe as probe_module
from mrl_clip.eval.cascade import DEFAULT_THRESHOLDS
from mrl_clip.eval.zeroshot import (
    encode_class_prompts,
    encode_images,
    load_classification_folder,
    run_zeroshot,
    zeroshot_metrics,
)

from . import numerics
from .conftest import TINY, TINY_DIMS, run_module
from .references import (
    U,
    assert_probe_metrics_match,
    f64,
    gamma,
    head_objective,
    shared_objective,
    shared_optimum,
    shared_theta,
    sklearn_optimum,
)


@pytest.fixture(scope="module")
def export_model(trained_run):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained_run['export']}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{trained_run['export']}")


@pytest.fixture(scope="module")
def encoded(export_model, fmnist_data):
    """(image features, labels, prompt features) of the test split, encoded here by open_clip's own model of the
    export on one thread with the CLI's default batch size: what a one-thread `mrl_clip.eval zeroshot` of the
    export computes, to the bit (the same weights, kernels and batches)."""
    model, preprocess, tokenizer = export_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_classification_folder(str(fmnist_data["eval"]), preprocess)
        images, labels = encode_images(model, data.dataset, batch_size=256)
        prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates)
    finally:
        torch.set_num_threads(threads)
    return images, labels, prompts


def test_full_width_equals_clip_benchmark_evaluate(export_model, fmnist_data):
    model, preprocess, tokenizer = export_model
    data = load_classification_folder(str(fmnist_data["eval"]), preprocess)
    images, labels = encode_images(model, data.dataset)
    prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates)
    ours = zeroshot_metrics(images, labels, prompts, [256])[256]
    reference = zeroshot_classification.evaluate(
        model, DataLoader(data.dataset, batch_size=128), tokenizer, data.classnames, data.templates, "cpu",
        amp=False)
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours[name] - reference[name]) < 1e-4, (name, ours, reference)


def test_clip_benchmark_cli_reads_our_folder_and_agrees(trained_run, fmnist_data, tmp_path):
    out = tmp_path / "cb.json"
    result = run_module("clip_benchmark.cli", "eval", "--dataset", "wds/fashion_mnist_test",
                        "--dataset_root", fmnist_data["eval"], "--model", f"local-dir:{trained_run['export']}",
                        "--pretrained", "none", "--task", "zeroshot_classification", "--no_amp",
                        "--batch_size", "128", "--num_workers", "0", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(out.read_text())["metrics"]
    ours = run_zeroshot(f"local-dir:{trained_run['export']}", None, str(fmnist_data["eval"]), [256])
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours["metrics"]["256"][name] - reference[name]) < 1e-4, (name, ours, reference)


def zero_shot_logits64(images, prompts, m):
    """CLIP_benchmark's logits at dim m, 100 x cosine to the normalised mean of normalised prompts, in float64."""
    img = images[:, :m].double()
    img = img / img.norm(dim=1, keepdim=True)
    per_prompt = prompts[..., :m].double()
    per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
    classifier = per_prompt.mean(dim=1)
    classifier = classifier / classifier.norm(dim=-1, keepdim=True)
    return 100.0 * img @ classifier.T


def assert_zeroshot_matches_float64(metrics, images, labels, prompts, dims):
    """Float32 metrics {dim: {...}} from these features against float64 ones from the same features, except where
    float32 rounding may decide a ranking: an image whose float64 cosines at the boundary (its best two classes
    for acc1, its 5th and 6th for acc5) are within twice the float32 score error may go either way (each such image
    moves acc1 or acc5 by 1/N and its class's recall by 1/n_class).
    Score error, worst case: the image's normalisation gamma(m + 3); the classifier's, each prompt normalised
    (gamma(m + 3)), averaged over T templates (gamma(T + 1)) into a vector of norm |c| <= 1 and re-normalised:
    (gamma(m + 3) + gamma(T + 1)) / |c| + gamma(m + 3); the dot product gamma(m); the 100x scale is common."""
    for m in dims:
        img = images[:, :m].double()
        img = img / img.norm(dim=1, keepdim=True)
        per_prompt = prompts[..., :m].double()
        per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
        classifier = per_prompt.mean(dim=1)
        mean_norm = classifier.norm(dim=-1).min().item()
        classifier = classifier / classifier.norm(dim=-1, keepdim=True)
        scores = img @ classifier.T
        predicted = scores.argmax(dim=1)
        acc1 = (predicted == labels).double().mean().item()
        acc5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
        recalls = [(predicted[labels == c] == c).double().mean().item() for c in labels.unique()]
        g = numerics.gamma
        error = 2 * g(m + 3) + (g(m + 3) + g(prompts.shape[1] + 1)) / mean_norm + g(m)
        top6 = scores.topk(6, dim=1).values
        undecided = (top6[:, 0] - top6[:, 1] <= 2 * error).double()
        undecided5 = (top6[:, 4] - top6[:, 5] <= 2 * error).double()
        exact = numerics.gamma(len(recalls), numerics.U64)  # the float64 means themselves
        assert abs(metrics[m]["acc1"] - acc1) <= undecided.mean().item() + exact, (m, metrics[m], acc1)
        assert abs(metrics[m]["acc5"] - acc5) <= undecided5.mean().item() + exact, (m, metrics[m], acc5)
        per_class = sum(undecided[labels == c].mean().item() for c in labels.unique()) / len(recalls)
        assert abs(metrics[m]["mean_per_class_recall"] - sum(recalls) / len(recalls)) <= per_class + exact


def test_each_dim_matches_a_float64_recomputation(encoded):
    assert_zeroshot_matches_float64(zeroshot_metrics(*encoded, TINY_DIMS), *encoded, TINY_DIMS)


def test_eval_cli_json_and_table_match_a_float64_recount(trained_run, fmnist_data, encoded, tmp_path):
    """`python -m mrl_clip.eval zeroshot` on one thread: its JSON at each dim against a float64 recount from the
    features `encoded` computed (the same ones the CLI computed), its table the JSON's numbers in %, and a plot."""
    export = f"local-dir:{trained_run['export']}"
    result = run_module("mrl_clip.eval", "zeroshot", "--model", export, "--data", fmnist_data["eval"],
                        "--dims", "8,64,256", "--output", tmp_path / "r.json", "--plot", tmp_path / "r.png",
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["task"], report["model"], report["dims"]) == ("zeroshot", export, [8, 64, 256])
    assert report["metrics"] == report["models"]["export"]["metrics"]
    assert_zeroshot_matches_float64({int(m): v for m, v in report["metrics"].items()}, *encoded, [8, 64, 256])
    header, rule, *rows = result.stdout.splitlines()
    assert header.split() == ["dim", "acc1", "acc5", "mean_per_class_recall"]
    assert [row.split() for row in rows] == [[m] + [f"{100 * report['metrics'][m][name]:.2f}" for name in
                                                    header.split()[1:]] for m in ("8", "64", "256")]
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_retrieval_full_width_equals_clip_benchmark_cli(trained_run, fmnist_data, tmp_path):
    out = tmp_path / "cb.json"
    result = run_module("clip_benchmark.cli", "eval", "--dataset", "wds/captions",
                        "--dataset_root", fmnist_data["captions"], "--model", f"local-dir:{trained_run['export']}",
                        "--pretrained", "none", "--task", "zeroshot_retrieval", "--no_amp", "--recall_k", "1", "5",
                        "10", "--batch_size", "64", "--num_workers", "0", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(out.read_text())["metrics"]
    ours = run_module("mrl_clip.eval", "retrieval", "--model", f"local-dir:{trained_run['export']}",
                      "--data", fmnist_data["captions"], "--dims", "16,256", "--output", tmp_path / "ours.json")
    assert ours.returncode == 0, ours.stderr[-2000:]
    report = json.loads((tmp_path / "ours.json").read_text())
    full = report["models"]["export"]["metrics"]["256"]
    assert set(full) == set(reference) and len(full) == 6
    # both are CLIP_benchmark's recall_at_k hits averaged by the same float32 mean over the same queries: one hit
    # apart would be 1/400 apart, and equal hits give the same float, so the numbers must be equal
    assert full == reference
    # the single-model fields stay for older readers
    assert (report["model"], report["dims"], sorted(report["metrics"])) == \
        (f"local-dir:{trained_run['export']}", [16, 256], ["16", "256"])


def test_retrieval_on_a_classification_folder_is_a_one_line_error(fmnist_data, capfd):
    """Through run_cli in this process, what `python -m mrl_clip.eval` runs (tests/test_cli.py runs that spelling)."""
    with pytest.raises(SystemExit) as exited:
        run_cli(eval_main.main, ["retrieval", "--model", TINY, "--data", str(fmnist_data["eval"])])
    stderr = capfd.readouterr().err
    assert exited.value.code == 2 and "not a retrieval folder" in stderr
    assert "Traceback" not in stderr


def test_compare_puts_both_models_in_one_report_and_plot(trained_run, fmnist_data, tmp_path):
    result = run_module("mrl_clip.eval", "zeroshot", "--model", TINY, "--pretrained", trained_run["checkpoint"],
                        "--compare", f"local-dir:{trained_run['export']}", "--data", fmnist_data["eval"],
                        "--dims", "8,256", "--output", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["models"]) == [trained_run["checkpoint"].name, "export"]
    first, second = report["models"].values()
    assert first["metrics"] == second["metrics"]  # the same weights, as a checkpoint and as an export
    assert (tmp_path / "r.png").stat().st_size > 1000


# The probe CLI's dims: small, because sklearn's float64 reference (tol 1e-10) slows steeply with the dim, most
# without a penalty (weight_decay 0 is in the probe's grid; measured, 1,000 train images: ~10 s at 8 dims, ~55 s at
# 32, minutes at 256), and the probe's own grid of L-BFGS fits with it. Nothing the tests claim depends on the width.
PROBE_DIMS = "8,16"


def test_linear_probe_cli_learns_saves_heads_beside_checkpoint_and_caches(trained_run, fmnist_data, tmp_path):
    from mrl_clip.heads import load_heads

    cache = tmp_path / "cache"
    args = ["mrl_clip.eval", "linear-probe", "--model", TINY, "--pretrained", trained_run["checkpoint"],
            "--data", fmnist_data["eval"], "--dims", PROBE_DIMS, "--cache-dir", cache,
            "--output", tmp_path / "lp.json", "--plot", tmp_path / "lp.png"]
    result = run_module(*args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "lp.json").read_text())
    label = trained_run["checkpoint"].name
    assert set(report["models"]) == {f"{label} [mrl]", f"{label} [mrl-e]", f"{label} [fixed]"}
    # one cache entry per split at full width: the features every probe was fitted on and measured with
    assert len(list(cache.glob("features-*.pt"))) == 2
    features = cached_splits(cache)
    optima = {}  # the float64 per-dim optima, shared by the kinds that chose the same weight decay
    # heads live beside the checkpoint, not in its state_dict, with the train statistics they expect
    heads_dir = trained_run["checkpoint"].parent / f"{trained_run['checkpoint'].stem}.heads"
    for kind in ("mrl", "mrl-e", "fixed"):
        heads, meta = load_heads(heads_dir / f"{kind}.safetensors")
        entry = report["models"][f"{label} [{kind}]"]
        assert meta["kind"] == kind and heads.efficient == (kind == "mrl-e") and heads.dims == [8, 16]
        assert meta["chosen"] == entry["probe"]["chosen"]
        train_x, test_x = ((features[split][0] - meta["feature_mean"]) / meta["feature_std"]
                           for split in ("train", "test"))
        assert_at_float64_optimum(heads, kind, train_x, features["train"][1], meta["chosen"]["weight_decay"],
                                  optima)
        with torch.no_grad():
            logits = heads(test_x)
        assert_probe_metrics_match({int(m): v for m, v in entry["metrics"].items()}, logits, features["test"][1])
    # the cache is reused by a second run with other dims
    again = run_module(*args[:-6], "--dims", "4,32", "--cache-dir", cache, "--probes", "mrl",
                       env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train images" not in again.stderr  # nothing re-encoded
    assert len(list(cache.glob("features-*.pt"))) == 2


def test_linear_probe_of_an_export_saves_heads_inside_it(trained_run, fmnist_data, tmp_path):
    """`eval linear-probe --model local-dir:EXPORT` writes EXPORT/heads/KIND.safetensors and changes nothing else
    in EXPORT; reloaded through mrl_clip.heads and given the cached test features z-scored with the statistics
    saved in the file, the heads give the reported lp_acc1 / lp_acc5 (top-k recounted on their logits)."""
    from mrl_clip.heads import load_heads

    export = tmp_path / "export"
    shutil.copytree(trained_run["export"], export)
    before = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    assert eval_main.main(["linear-probe", "--model", f"local-dir:{export}", "--data", str(fmnist_data["eval"]),
                           "--dims", PROBE_DIMS, "--probes", "mrl-e", "--cache-dir", str(tmp_path / "cache"),
                           "--output", str(tmp_path / "lp.json")]) == 0
    entry = json.loads((tmp_path / "lp.json").read_text())["models"]["export [mrl-e]"]
    path = export / "heads" / "mrl-e.safetensors"
    assert entry["probe"]["heads"] == str(path)
    after = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    assert after.pop(path.relative_to(export)) and after == before
    heads, meta = load_heads(path)
    assert (meta["model"], meta["kind"], heads.dims) == (f"local-dir:{export}", "mrl-e", [8, 16]) and heads.efficient
    test_x, test_y = cached_splits(tmp_path / "cache")["test"]
    with torch.no_grad():
        logits = heads((test_x - meta["feature_mean"]) / meta["feature_std"])
    assert_probe_metrics_match({int(m): v for m, v in entry["metrics"].items()}, logits, test_y)


def cached_splits(cache) -> dict:
    """{split: (features, labels)} from a feature cache folder."""
    entries = [torch.load(path, weights_only=True) for path in cache.glob("features-*.pt")]
    return {json.loads(e["key"])["split"]: (e["features"], e["labels"]) for e in entries}


def assert_at_float64_optimum(heads, kind, x, y, wd, optima=None):
    """Fixed and MRL heads at sklearn's per-dim optimum (MRL's objective is their sum), MRL-E's shared head at
    scipy's optimum of its objective, within the float32 summation error of the fit (see references.U). Without
    a penalty (wd 0, in the probe's grid) the objective may have no minimum, only an infimum the probe's capped
    L-BFGS approaches: then no head may go below it, and nothing more is claimed. `optima` ({(m, wd): (x, optimum)})
    keeps sklearn's optima for another kind fitted on the same x."""
    n, dims = len(y), heads.dims
    if kind == "mrl-e":
        ours, _ = shared_objective(shared_theta(heads), f64(x), np.asarray(y), dims, heads.num_classes, wd)
        best = shared_optimum(x, y, dims, heads.num_classes, wd)
        assert ours >= best - (n + len(dims)) * U * best, (kind, ours, best)
        assert wd == 0 or abs(ours - best) <= (n + len(dims)) * U * best, (kind, ours, best)
        return
    ours = [head_objective(x, y, head.weight, head.bias, wd) for head in heads.heads]
    best = [per_dim_optimum(x, y, m, wd, {} if optima is None else optima) for m in dims]
    terms = n if kind == "fixed" else n + len(dims)  # MRL's one sum runs over every dim's terms
    for o, b in zip(ours, best):
        assert o >= b - terms * U * sum(best), (kind, ours, best)
    assert wd == 0 or abs(sum(ours) - sum(best)) <= terms * U * sum(best), (kind, ours, best)


def per_dim_optimum(x, y, m, wd, optima: dict) -> float:
    if (m, wd) not in optima or not torch.equal(optima[m, wd][0], x):
        optima[m, wd] = (x, sklearn_optimum(x, y, m, wd))
    return optima[m, wd][1]


def spy(monkeypatch, module, name) -> list:
    """Record every call of module.name as (arguments, result) while it runs as usual."""
    calls, original = [], getattr(module, name)

    def recorded(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(module, name, recorded)
    return calls


def cascade_numpy(probs: dict, dims, threshold):
    """(predicted class, answering dim) per sample: the smallest dim whose top probability reaches the threshold
    answers, full width the rest (compared in float32, the probabilities' type)."""
    full = dims[-1]
    predicted, answered = probs[full].argmax(axis=1), np.full(len(probs[full]), full)
    for m in reversed(dims[:-1]):
        confident = probs[m].max(axis=1) >= np.float32(threshold)
        predicted = np.where(confident, probs[m].argmax(axis=1), predicted)
        answered = np.where(confident, m, answered)
    return predicted, answered


def assert_reported_cascade(cascade, held_probs, held_y, test_probs, test_y, dims):
    """The reported cascade recomputed with numpy from the probabilities it was given: the threshold is the
    cheapest on held-out that reaches held-out full-width accuracy (the more accurate, then the first, on ties),
    and acc1, expected dims and answers per dim are those of that threshold on the test half. Reported means are
    float32: an exact sum divided once, so within u of the exact fraction."""
    held = {m: p.numpy() for m, p in held_probs.items()}
    test = {m: p.numpy() for m, p in test_probs.items()}
    held_y, test_y = held_y.numpy(), test_y.numpy()
    target = np.mean(held[dims[-1]].argmax(axis=1) == held_y)
    points = []
    for t in DEFAULT_THRESHOLDS:
        predicted, answered = cascade_numpy(held, dims, t)
        points.append((np.mean(answered), -np.mean(predicted == held_y), t))
    cheapest = min((p for p in points if -p[1] >= target), key=lambda p: p[:2])
    assert cascade["threshold"] == cheapest[2], (cascade["threshold"], points, target)
    predicted, answered = cascade_numpy(test, dims, cascade["threshold"])
    assert cascade["answered_at"] == {str(m): int(np.sum(answered == m)) for m in dims}
    expected = {"acc1": np.mean(predicted == test_y), "expected_dim": np.mean(answered),
                "full_dim_acc1": np.mean(test[dims[-1]].argmax(axis=1) == test_y)}
    for name, value in expected.items():
        assert abs(cascade[name] - value) <= U * value, (name, cascade[name], value)
    for point, t in zip(cascade["frontier"], DEFAULT_THRESHOLDS):
        predicted, answered = cascade_numpy(test, dims, t)
        assert point["threshold"] == t
        assert abs(point["acc1"] - np.mean(predicted == test_y)) <= U * np.mean(predicted == test_y), point
        assert abs(point["expected_dim"] - np.mean(answered)) <= U * np.mean(answered), point


def test_cascade_cli_zero_shot(export_model, trained_run, fmnist_data, tmp_path, monkeypatch):
    given = spy(monkeypatch, cascade_module, "evaluate_cascade")
    dims = [8, 32, 256]
    assert eval_main.main(["cascade", "--model", f"local-dir:{trained_run['export']}", "--data",
                           str(fmnist_data["eval"]), "--dims", "8,32,256", "--cache-dir", str(tmp_path / "cache"),
                           "--output", str(tmp_path / "c.json")]) == 0
    cascade = json.loads((tmp_path / "c.json").read_text())["models"]["export"]["cascade"]
    (held_probs, held_y, test_probs, test_y, given_dims), _ = given[0]
    assert given_dims == dims
    # the CLI's test images (from its cache) and the class prompts, encoded by this process with the same model
    images, labels = cached_splits(tmp_path / "cache")["test"]
    model, preprocess, tokenizer = export_model
    data = load_classification_folder(str(fmnist_data["eval"]), preprocess)
    prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates)
    # thresholds are chosen on half of the test split, a permutation seeded with 0, and reported on the other half
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    held, test = order[:len(labels) // 2], order[len(labels) // 2:]
    assert torch.equal(held_y, labels[held]) and torch.equal(test_y, labels[test])
    # The CLI computes in float32 from the same float32 features: each cosine of float32-normalised vectors (the
    # classifier a mean of T normalised prompts) is within 4 gamma(m + T) of the exact one, a logit (100 x) within
    # 100 times that (one gamma more covers the scaling's and the softmax's own rounding), and a softmax probability
    # moves by at most twice its largest logit change.
    for m in dims:
        probs = zero_shot_logits64(images, prompts, m).softmax(dim=1)
        bound = 2 * 100 * 5 * gamma(m + len(data.templates))
        assert (held_probs[m].double() - probs[held]).abs().max() <= bound, m
        assert (test_probs[m].double() - probs[test]).abs().max() <= bound, m
    assert_reported_cascade(cascade, held_probs, held_y, test_probs, test_y, dims)


def test_cascade_cli_through_an_mrl_probe(trained_run, fmnist_data, tmp_path, monkeypatch):
    fitted = spy(monkeypatch, probe_module, "select_and_train")
    given = spy(monkeypatch, cascade_module, "evaluate_cascade")
    dims = [4, 8, 16]  # small: the float64 reference fit's cost grows steeply with the dim (unpenalised most)
    assert eval_main.main(["cascade", "--source", "mrl", "--model", TINY, "--pretrained",
                           str(trained_run["checkpoint"]), "--data", str(fmnist_data["eval"]), "--dims", "4,8,16",
                           "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "c.json")]) == 0
    cascade = json.loads((tmp_path / "c.json").read_text())["models"][trained_run["checkpoint"].name]["cascade"]
    features = cached_splits(tmp_path / "cache")
    train_x, test_x = probe_module.standardize(features["train"][0], features["test"][0])
    train_y, test_y = features["train"][1], features["test"][1]
    # the probe is fitted on 80% of the train split (a permutation seeded with 1), thresholds chosen on the rest
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))
    held, fit = order[:len(order) // 5], order[len(order) // 5:]
    ((fit_x, fit_y, fit_dims, classes, kind), (heads, info)), = fitted
    assert torch.equal(fit_x, train_x[fit]) and torch.equal(fit_y, train_y[fit])
    assert (fit_dims, classes, kind, heads.dims) == (dims, 10, "mrl", dims)
    assert_at_float64_optimum(heads, "mrl", fit_x, fit_y, info["chosen"]["weight_decay"])
    # the cascade is given the heads' softmax on the held-out 20% and on the test split
    (held_probs, held_y, test_probs, test_y_given, given_dims), _ = given[0]
    with torch.no_grad():
        expected_held, expected_test = heads(train_x[held]), heads(test_x)
    assert given_dims == dims and torch.equal(held_y, train_y[held]) and torch.equal(test_y_given, test_y)
    for m in dims:
        assert torch.equal(held_probs[m], expected_held[m].softmax(dim=1))
        assert torch.equal(test_probs[m], expected_test[m].softmax(dim=1))
    assert_reported_cascade(cascade, held_probs, held_y, test_probs, test_y, dims)
