"""eval fewshot: nearest class mean against scikit-learn's NearestCentroid, the probe against scikit-learn's
LogisticRegression, the long-tailed split against its Zipf counts."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid

from mrl_clip.errors import UserError
from mrl_clip.eval import fewshot
from mrl_clip.eval.probe import standardize


def clustered(rng, n, centres, noise=2.5):
    labels = np.arange(n) % len(centres)   # every class present
    return (centres[labels] + noise * rng.standard_normal((n, centres.shape[1]))).astype(np.float32), labels


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 64))
    return (*clustered(rng, 320, centres), *clustered(rng, 200, centres))


def sklearn_ncm(train_x, train_y, test_x, dim):
    unit = lambda x: x[:, :dim] / np.linalg.norm(x[:, :dim], axis=1, keepdims=True)  # noqa: E731
    return NearestCentroid().fit(unit(train_x).astype(np.float64), train_y).predict(unit(test_x).astype(np.float64))


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # NearestCentroid's
# shrinkage statistics with one shot a class (n_samples == n_classes); its prediction does not use them
def test_fewshot_nearest_class_mean_equals_scikit_learn_averaged_over_draws(features):
    train_x, train_y, test_x, test_y = features
    dims, draws = [4, 16, 64], 3
    ours = fewshot.fewshot_metrics(train_x, train_y, test_x, test_y, dims, shots=[1, 5], draws=draws)
    for n in (1, 5):
        for m in dims:
            per_draw = []
            for seed in range(draws):
                picked = fewshot.draw_shots(train_y, n, seed)
                assert np.array_equal(np.bincount(train_y[picked]), np.full(8, n))   # n of each class, no repeat
                assert len(set(picked)) == len(picked)
                per_draw.append(np.mean(sklearn_ncm(train_x[picked], train_y[picked], test_x, m) == test_y))
            assert ours[m][f"fewshot{n}_ncm_acc1"] == pytest.approx(np.mean(per_draw), abs=1e-12)
            assert ours[m][f"fewshot{n}_ncm_acc1_std"] == pytest.approx(np.std(per_draw), abs=1e-12)
    assert ours[64]["fewshot5_ncm_acc1"] > ours[64]["fewshot1_ncm_acc1"] > 1 / 8   # more shots help; above chance


def test_fewshot_probe_predicts_as_scikit_learn_logistic_regression(features):
    """probe.py's objective at one dim is LogisticRegression with C = 1 / (weight_decay * N) on the same z-scored
    features; both solvers stop at a tolerance, so predictions are compared where scikit-learn's top-2 logit
    margin exceeds 1e-2 (far above either solver's gradient tolerance), and such rows must be most of them."""
    train_x, train_y, test_x, _ = features
    picked = fewshot.draw_shots(train_y, 10, 0)
    ours = fewshot.probe_predictions(train_x[picked], train_y[picked], test_x, [16, 64], 8)
    train, test = (t.double().numpy() for t in standardize(torch.as_tensor(train_x[picked]), torch.as_tensor(test_x)))
    for m in (16, 64):
        reference = LogisticRegression(C=1 / (fewshot.PROBE_WEIGHT_DECAY * len(picked)), max_iter=10000, tol=1e-10)
        reference.fit(train[:, :m], train_y[picked])
        logits = np.sort(reference.decision_function(test[:, :m]), axis=1)
        clear = logits[:, -1] - logits[:, -2] > 1e-2
        assert clear.mean() > 0.9
        assert np.array_equal(ours[m][clear], reference.predict(test[:, :m])[clear])


def test_long_tail_counts_and_frequent_rare_split(features):
    train_x, train_y, test_x, test_y = features
    picked, rank = fewshot.long_tail_subset(train_y, 40, 1.0, seed=0)
    counts = np.bincount(train_y[picked], minlength=8)
    assert np.array_equal(counts, [round(40 / (rank[c] + 1)) for c in range(8)])
    ours = fewshot.long_tail_metrics(train_x, train_y, test_x, test_y, [64], 40, 1.0, draws=1)[64]
    frequent = rank[test_y] < 4
    predictions = sklearn_ncm(train_x[picked], train_y[picked], test_x, 64)
    assert ours["longtail_ncm_acc1_frequent"] == pytest.approx(np.mean((predictions == test_y)[frequent]), abs=1e-12)
    assert ours["longtail_ncm_acc1_rare"] == pytest.approx(np.mean((predictions == test_y)[~frequent]), abs=1e-12)


@pytest.mark.parametrize("shots, message", [([0], "positive"), ([41], "more than the 40 train images")])
def test_bad_shots_are_one_line(features, shots, message):
    train_x, train_y, test_x, test_y = features
    with pytest.raises(UserError, match=message):
        fewshot.fewshot_metrics(train_x, train_y, test_x, test_y, [8], shots=shots, draws=1)


def test_eval_fewshot_cli_nearest_class_mean_equals_scikit_learn(trained_run, fmnist_data, tmp_path):
    """`python -m mrl_clip.eval fewshot` with the long tail: each dim's mean over draws of the nearest class mean ==
    scikit-learn's NearestCentroid on the same draws of the features the run cached."""
    import json

    from .conftest import TINY, run_module
    from .test_eval import cached_splits

    cache = tmp_path / "cache"
    result = run_module("mrl_clip.eval", "fewshot", "--model", TINY, "--pretrained", trained_run["checkpoint"],
                        "--data", fmnist_data["eval"], "--dims", "8,256", "--shots", "1,5", "--draws", "1",
                        "--long-tail-largest", "50", "--cache-dir", cache, "--output", tmp_path / "fs.json",
                        "--plot", tmp_path / "fs.png")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "fs.json").read_text())["models"][trained_run["checkpoint"].name]["metrics"]
    features = cached_splits(cache)
    (train_x, train_y), (test_x, test_y) = ((x.numpy(), y.numpy()) for x, y in (features["train"], features["test"]))
    for dim in (8, 256):
        for n in (1, 5):
            expected = np.mean([np.mean(sklearn_ncm(train_x[p], train_y[p], test_x, dim) == test_y)
                                for p in (fewshot.draw_shots(train_y, n, seed) for seed in range(1))])
            assert metrics[str(dim)][f"fewshot{n}_ncm_acc1"] == pytest.approx(expected, abs=1e-12)
        assert {"longtail_ncm_acc1_frequent", "longtail_lp_acc1_rare"} <= set(metrics[str(dim)])
    too_many = run_module("mrl_clip.eval", "fewshot", "--model", TINY, "--pretrained", trained_run["checkpoint"],
                          "--data", fmnist_data["eval"], "--shots", "1000", "--cache-dir", cache)
    assert too_many.returncode == 2 and "train images of the smallest class" in too_many.stderr
    assert len(too_many.stderr.strip().splitlines()) == 1
