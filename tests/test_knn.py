"""eval knn against scikit-learn's KNeighborsClassifier (cosine, brute force) on the same features."""
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from mrl_clip.errors import UserError
from mrl_clip.eval.knn import knn_metrics


def clustered_features(rng, n, centres, noise):
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + noise * rng.standard_normal((n, centres.shape[1]))).astype(np.float32), labels


def sklearn_acc1(train_x, train_y, test_x, test_y, dim, k):
    # cosine distance d = 1 - similarity; k > 1 votes with the similarity, as mrl_clip.eval.knn does
    weights = "uniform" if k == 1 else (lambda d: 1 - d)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute", weights=weights)
    knn.fit(train_x[:, :dim], train_y)
    return float(np.mean(knn.predict(test_x[:, :dim]) == test_y))


def test_knn_accuracy_equals_scikit_learn_at_every_dim_and_k():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 128))
    train_x, train_y = clustered_features(rng, 400, centres, 2.5)
    test_x, test_y = clustered_features(rng, 150, centres, 2.5)
    dims, ks = [4, 16, 64, 128], [1, 5, 20]
    ours = knn_metrics(train_x, train_y, test_x, test_y, dims, ks)
    for dim in dims:
        for k in ks:
            assert ours[dim][f"knn{k}_acc1"] == sklearn_acc1(train_x, train_y, test_x, test_y, dim, k), (dim, k)
    # the data is neither trivial nor hopeless at these dims, so the comparison can fail
    assert 0.2 < ours[16]["knn1_acc1"] < ours[128]["knn1_acc1"] < ours[128]["knn20_acc1"] < 1.0


@pytest.mark.parametrize("ks, message", [([0], "positive"), ([1, 500], "more than the 400 train images")])
def test_bad_k_is_one_line(ks, message):
    rng = np.random.default_rng(1)
    x, y = clustered_features(rng, 400, rng.standard_normal((3, 8)), 1.0)
    with pytest.raises(UserError, match=message):
        knn_metrics(x, y, x[:10], y[:10], [8], ks)


def test_eval_knn_cli_equals_scikit_learn_on_the_cached_features(trained_run, fmnist_data, tmp_path):
    """`python -m mrl_clip.eval knn` on the trained tiny model: its JSON at each dim and k == scikit-learn's
    KNeighborsClassifier fitted on the train split's features the run cached (full width, our encoder)."""
    import json

    from .conftest import TINY, run_module
    from .test_eval import cached_splits

    cache = tmp_path / "cache"
    result = run_module("mrl_clip.eval", "knn", "--model", TINY, "--pretrained", trained_run["checkpoint"],
                        "--data", fmnist_data["eval"], "--dims", "8,32,256", "--k", "1,10", "--cache-dir", cache,
                        "--output", tmp_path / "knn.json", "--plot", tmp_path / "knn.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "knn10_acc1" in result.stdout and (tmp_path / "knn.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "knn.json").read_text())["models"][trained_run["checkpoint"].name]["metrics"]
    features = cached_splits(cache)
    (train_x, train_y), (test_x, test_y) = ((x.numpy(), y.numpy()) for x, y in (features["train"], features["test"]))
    for dim in (8, 32, 256):
        for k in (1, 10):
            assert metrics[str(dim)][f"knn{k}_acc1"] == sklearn_acc1(train_x, train_y, test_x, test_y, dim, k)
    assert metrics["256"]["knn10_acc1"] > 0.5   # the trained model's neighbours carry its classes (chance: 0.1)


def test_eval_knn_k_zero_is_one_line(trained_run, fmnist_data, tmp_path):
    from .conftest import TINY, run_module

    result = run_module("mrl_clip.eval", "knn", "--model", TINY, "--pretrained", trained_run["checkpoint"],
                        "--data", fmnist_data["eval"], "--k", "0", "--cache-dir", tmp_path)
    assert result.returncode == 2 and "--k takes positive integers" in result.stderr, result.stderr[-500:]
    assert len(result.stderr.strip().splitlines()) == 1
