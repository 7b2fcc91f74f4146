"""Linear probes through MRL / MRL-E heads, on synthetic features (no trained model needed)."""
import pickle

import pytest
import torch

from mrl_clip.errors import UserError
from mrl_clip.eval.probe import (
    cached_features,
    checkpoint_identity,
    probe_metrics,
    select_and_train,
    standardize,
    train_fixed_feature_probes,
    train_mrl_probe,
)
from mrl_clip.heads import MRLHeads, load_heads, save_heads
from tests import numerics

from .references import (
    U,
    assert_probe_metrics_match,
    f64,
    head_objective,
    shared_objective,
    shared_optimum,
    shared_theta,
    sklearn_optimum,
    topk_accuracy,
)

DIMS = [8, 16, 32, 64]
CLASSES = 10


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: a second intra-op thread only adds contention on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mixture(n, seed, d=64, k=CLASSES):
    """Gaussian classes whose mean separation decays along the coordinates: the signal sits in the first dims.
    Offset and scaled so that standardization matters."""
    scale = 1.2 * torch.exp(-torch.arange(d) / 12.0)
    means = torch.randn(k, d, generator=torch.Generator().manual_seed(123)) * scale
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    return 3.0 * (means[y] + torch.randn(n, d, generator=g)) + 5.0, y


@pytest.fixture(scope="module")
def data():
    train_x, train_y = mixture(2000, seed=1)
    test_x, test_y = mixture(1000, seed=2)
    train_x, test_x = standardize(train_x, test_x)
    return train_x, train_y, test_x, test_y


def zscore_error(train, z):
    """Worst-case |computed - exact| of float32 z-scores (x - mean) / std per column of n rows, any summation order:
    the mean is off by <= gamma(n) mean|x|; the variance, two-pass or Welford, by <= gamma(3n) (1 + mean^2 / var)
    relative (Chan, Golub & LeVeque 1983), the std by half that plus a sqrt's u; the subtraction and the division
    add 2u of |z|."""
    n = train.shape[0]
    x = train.double()
    mean_error = numerics.gamma(n) * x.abs().mean(0) / x.std(0, unbiased=False)
    std_error = numerics.gamma(3 * n) * (1 + x.mean(0) ** 2 / x.var(0, unbiased=False)) / 2 + numerics.U32
    return mean_error + (std_error + 2 * numerics.U32) * z.double().abs()


def test_standardize_is_coordinatewise_so_prefixes_commute():
    """Each column is standardised on its own: a prefix's z-scores are the full ones to rounding (each within
    zscore_error of exact, so within twice that of each other); the columns have mean 0 and std 1 to rounding."""
    train, other = torch.randn(50, 16) * 4 + 2, torch.randn(20, 16)
    full_train, full_other = standardize(train, other)
    error = zscore_error(train, full_train)
    # float32 mean/std of the z-scores: moved by the z-scores' errors (the std is 1-Lipschitz in rms), plus their
    # own rounding (the z-scores' mean^2 / var is < 1, so the std's relative error is < gamma(150))
    mean_bound = error.mean(0) + numerics.gamma(50) * full_train.double().abs().mean(0)
    std_bound = error.pow(2).mean(0).sqrt() + numerics.gamma(150) + numerics.U32
    assert (full_train.mean(0).double().abs() <= mean_bound).all()
    assert ((full_train.std(0, unbiased=False).double() - 1).abs() <= std_bound).all()
    pre_train, pre_other = standardize(train[:, :8], other[:, :8])
    assert ((pre_train - full_train[:, :8]).double().abs() <= 2 * error[:, :8]).all()
    assert ((pre_other - full_other[:, :8]).double().abs() <= 2 * zscore_error(train, full_other)[:, :8]).all()


def test_mrl_e_logits_are_prefix_of_shared_weight():
    heads = MRLHeads(DIMS, CLASSES, efficient=True)
    x = torch.randn(7, 64)
    w, b = heads.shared.weight, heads.shared.bias
    logits = heads(x)
    assert list(logits) == DIMS
    for m in DIMS:
        assert torch.allclose(logits[m], x[:, :m] @ w[:, :m].T + b)
    assert sum(p.numel() for p in heads.parameters()) == 64 * CLASSES + CLASSES


def test_mrl_head_sees_only_its_prefix():
    heads = MRLHeads(DIMS, CLASSES)
    assert [h.in_features for h in heads.heads] == DIMS
    x = torch.randn(5, 64)
    changed = x.clone()
    changed[:, 16:] = torch.randn(5, 48)
    a, b = heads(x), heads(changed)
    assert torch.equal(a[8], b[8]) and torch.equal(a[16], b[16])
    assert not torch.allclose(a[32], b[32])


def test_heads_reject_bad_dims():
    with pytest.raises(UserError):
        MRLHeads([16, 8], CLASSES)
    with pytest.raises(ValueError):
        MRLHeads(DIMS, CLASSES)(torch.randn(2, 32))


WD = 1e-3


def assert_metrics_are_the_heads_accuracy(heads, x, y):
    with torch.no_grad():
        logits = heads(x)
    assert_probe_metrics_match(probe_metrics(heads, x, y), logits, y)


@pytest.fixture(scope="module")
def train_optima(data):
    """The float64 optima of the probe objectives on the train split: sklearn's per dim, and MRL-E's."""
    train_x, train_y, _, _ = data
    y = train_y.numpy()
    return {"per_dim": {m: sklearn_optimum(train_x, y, m, WD) for m in DIMS},
            "shared": shared_optimum(train_x, y, DIMS, CLASSES, WD)}


def test_fixed_probes_are_sklearns_l2_logistic_regression_at_every_dim(data, train_optima):
    train_x, train_y, test_x, test_y = data
    heads = train_fixed_feature_probes(train_x, train_y, DIMS, CLASSES, weight_decay=WD)
    n = len(train_y)
    for m, head in zip(DIMS, heads.heads):
        ours, best = head_objective(train_x, train_y.numpy(), head.weight, head.bias, WD), train_optima["per_dim"][m]
        assert abs(ours - best) <= n * U * best, (m, ours, best)
    assert_metrics_are_the_heads_accuracy(heads, test_x, test_y)


def test_mrl_heads_jointly_reach_the_sum_of_sklearns_per_dim_optima(data, train_optima):
    """With equal weights MRL's objective is the sum of the per-dim ones: each head must be at its optimum."""
    train_x, train_y, test_x, test_y = data
    heads = train_mrl_probe(train_x, train_y, DIMS, CLASSES, weight_decay=WD)
    ours = [head_objective(train_x, train_y.numpy(), h.weight, h.bias, WD) for h in heads.heads]
    best = [train_optima["per_dim"][m] for m in DIMS]
    # one float32 sum over n samples of each dim's terms, then over the dims
    tolerance = (len(train_y) + len(DIMS)) * U * sum(best)
    assert abs(sum(ours) - sum(best)) <= tolerance, (ours, best)
    assert all(o >= b - tolerance for o, b in zip(ours, best)), (ours, best)
    assert_metrics_are_the_heads_accuracy(heads, test_x, test_y)


def test_mrl_e_reaches_the_float64_optimum_of_its_shared_objective(data, train_optima):
    train_x, train_y, test_x, test_y = data
    heads = train_mrl_probe(train_x, train_y, DIMS, CLASSES, efficient=True, weight_decay=WD)
    ours, _ = shared_objective(shared_theta(heads), f64(train_x), train_y.numpy(), DIMS, CLASSES, WD)
    best = train_optima["shared"]
    assert abs(ours - best) <= (len(train_y) + len(DIMS)) * U * best, (ours, best)
    assert_metrics_are_the_heads_accuracy(heads, test_x, test_y)


def test_fixed_probe_heads_are_trained_independently(data):
    train_x, train_y, _, _ = data
    packed = train_fixed_feature_probes(train_x, train_y, DIMS, CLASSES, weight_decay=1e-3)
    alone = train_fixed_feature_probes(train_x, train_y, [16], CLASSES, weight_decay=1e-3)
    assert torch.allclose(packed.heads[1].weight, alone.heads[0].weight)


def test_acc5_is_nan_under_five_classes():
    x, y = torch.randn(40, 8), torch.arange(40) % 3
    heads = train_mrl_probe(x, y, [4, 8], 3, max_iter=20)
    result = probe_metrics(heads, x, y)
    assert all(result[m]["lp_acc5"] != result[m]["lp_acc5"] for m in (4, 8))  # nan
    with torch.no_grad():
        logits = heads(x)
    assert [result[m]["lp_acc1"] for m in (4, 8)] == [topk_accuracy(logits[m], y, 1) for m in (4, 8)]


def test_select_and_train_picks_on_validation_then_retrains_on_all_of_train(data):
    train_x, train_y, test_x, test_y = data
    grid = {"weight_decay": [0.0, 1e-3, 1e-1]}
    heads, info = select_and_train(train_x, train_y, DIMS, CLASSES, "mrl-e", grid=grid, max_iter=100)
    # the documented procedure by hand: 20% of train (a permutation seeded with 0) validates each value, the best
    # mean top-1 over dims wins (the first on ties), and the heads are refitted on all of train with it
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    val, fit = order[:len(order) // 5], order[len(order) // 5:]
    val_acc1 = {}
    for wd in grid["weight_decay"]:
        fitted = train_mrl_probe(train_x[fit], train_y[fit], DIMS, CLASSES, efficient=True, weight_decay=wd,
                                 max_iter=100)
        with torch.no_grad():
            logits = fitted(train_x[val])
        val_acc1[wd] = {m: topk_accuracy(logits[m], train_y[val], 1) for m in DIMS}
    mean = {wd: sum(acc.values()) / len(DIMS) for wd, acc in val_acc1.items()}
    chosen = max(grid["weight_decay"], key=mean.get)
    assert info["chosen"] == {"weight_decay": chosen}
    assert info["val_acc1"] == val_acc1[chosen]
    assert info["tried"] == [{"weight_decay": wd, "val_mean_acc1": mean[wd]} for wd in grid["weight_decay"]]
    refitted = train_mrl_probe(train_x, train_y, DIMS, CLASSES, efficient=True, weight_decay=chosen, max_iter=100)
    assert heads.efficient and heads.dims == DIMS
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), refitted.state_dict().values()))
    assert_metrics_are_the_heads_accuracy(heads, test_x, test_y)
    with pytest.raises(UserError):
        select_and_train(train_x, train_y, DIMS, CLASSES, "linear", grid=grid)


def _key(ckpt, split="train", dataset="/data/fmnist"):
    return {"model": "MRL-Tiny-28", "checkpoint": checkpoint_identity(ckpt), "dataset": dataset, "split": split}


def _counting(x):
    calls = []

    def compute():
        calls.append(1)
        return x, torch.arange(x.shape[0])
    return compute, calls


def test_cache_is_keyed_by_checkpoint_and_split_not_dims(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "step_10.pt", tmp_path / "step_20.pt"
    a.write_bytes(b"checkpoint a")
    b.write_bytes(b"checkpoint b")
    x = torch.randn(6, 64)
    compute, calls = _counting(x)

    first, labels = cached_features(cache, _key(a), compute)
    assert torch.equal(first, x) and torch.equal(labels, torch.arange(6))
    again, _ = cached_features(cache, _key(a), compute)  # same key: served from disk
    assert len(calls) == 1 and torch.equal(again, x)
    # dims are no part of the key: one full-width entry serves every dim (the CLI slices after the cache)
    with pytest.raises(ValueError):
        cached_features(cache, {**_key(a), "dims": DIMS}, compute)

    cached_features(cache, _key(b), compute)  # another checkpoint file
    assert len(calls) == 2
    cached_features(cache, _key(a, split="test"), compute)  # another split
    assert len(calls) == 3
    cached_features(cache, _key(a, dataset="/data/other"), compute)  # another dataset
    assert len(calls) == 4

    a.write_bytes(b"checkpoint a, overwritten by a later run")  # same path, new content
    cached_features(cache, _key(a), compute)
    assert len(calls) == 5
    assert len(list(cache.glob("*.pt"))) == 5 and not list(cache.glob("*.tmp"))


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"c")
    x = torch.randn(3, 8)
    compute, calls = _counting(x)
    cached_features(tmp_path / "cache", _key(ckpt), compute)
    (entry,) = (tmp_path / "cache").glob("*.pt")
    entry.write_bytes(b"garbage")
    got, _ = cached_features(tmp_path / "cache", _key(ckpt), compute)
    assert len(calls) == 2 and torch.equal(got, x)


@pytest.mark.parametrize("efficient", [False, True])
def test_save_load_round_trip(tmp_path, efficient):
    heads = MRLHeads(DIMS, CLASSES, efficient=efficient)
    mean, std = torch.randn(64), torch.rand(64) + 0.5
    path = save_heads(tmp_path / "heads.safetensors", heads,
                      {"kind": "mrl-e" if efficient else "mrl", "chosen": {"weight_decay": 1e-3},
                       "feature_mean": mean, "feature_std": std})
    loaded, meta = load_heads(path)
    assert loaded.dims == DIMS and loaded.num_classes == CLASSES and loaded.efficient == efficient
    assert meta["chosen"] == {"weight_decay": 1e-3} and torch.equal(meta["feature_mean"], mean)
    assert torch.equal(meta["feature_std"], std)
    x = torch.randn(4, 64)
    with torch.no_grad():
        before, after = heads(x), loaded(x)
    assert all(torch.equal(before[m], after[m]) for m in DIMS)


def test_load_refuses_pickle(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "heads.safetensors"
    path.write_bytes(pickle.dumps({"state": Boom()}))
    with pytest.raises(UserError, match="not an mrl_clip heads file"):
        load_heads(path)
    torch.save(MRLHeads(DIMS, CLASSES).state_dict(), tmp_path / "heads.pt")
    with pytest.raises(UserError):
        load_heads(tmp_path / "heads.pt")
    with pytest.raises(UserError, match="not found"):
        load_heads(tmp_path / "missing.safetensors")
