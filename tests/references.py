"""Independent float64 references the tests compare against: the linear-probe objectives and their optima (sklearn,
scipy), top-k accuracy, and the float32 error bounds tolerances are derived from."""
import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

# Probes are fitted in float32: a sum of n terms is exact only to n * u of its magnitude (the bound for recursive
# summation, u = 2^-24), so a converged fit cannot be told from the optimum by less than that, and must be within
# it of the float64 optimum. (On test_probe.py's data a penalty off by a factor 2 misses it by over 1e-3, twenty
# times more.)
U = 2.0 ** -24


def gamma(n: int) -> float:
    """Higham's bound on the relative error of a float32 sum or dot product of n terms: n u / (1 - n u)."""
    return n * U / (1 - n * U)


def f64(t):
    return t.detach().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def mean_cross_entropy(logits, y):
    """(mean cross-entropy, softmax probabilities) in float64."""
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean(), np.exp(log_p)


def head_objective(x, y, weight, bias, wd):
    """One head's objective, mean CE(x[:, :m] @ W.T + b) + wd / 2 * ||W||^2 (sklearn's with C = 1 / (wd n))."""
    weight, bias = f64(weight), f64(bias)
    loss, _ = mean_cross_entropy(f64(x)[:, :weight.shape[1]] @ weight.T + bias, np.asarray(y))
    return loss + 0.5 * wd * (weight ** 2).sum()


def sklearn_optimum(x, y, m, wd):
    """The per-dim optimum, solved by sklearn in float64 far below float32 resolution."""
    y = np.asarray(y)
    penalty = {"C": 1.0 / (wd * len(y))} if wd > 0 else {"penalty": None}
    reference = LogisticRegression(**penalty, tol=1e-10, max_iter=10000).fit(f64(x)[:, :m], y)
    return head_objective(x, y, reference.coef_, reference.intercept_, wd)


def shared_objective(theta, x, y, dims, classes, wd):
    """MRL-E's objective, sum over m of mean CE(x[:, :m] @ W[:, :m].T + b) + wd / 2 * ||W||^2, and its gradient,
    written out in float64 (theta = W flattened, then b)."""
    weight, bias = theta[:-classes].reshape(classes, -1), theta[-classes:]
    total, grad_w, grad_b = 0.5 * wd * (weight ** 2).sum(), wd * weight, np.zeros(classes)
    one_hot = np.eye(classes)[y]
    for m in dims:
        loss, p = mean_cross_entropy(x[:, :m] @ weight[:, :m].T + bias, y)
        total += loss
        grad_w[:, :m] += (p - one_hot).T @ x[:, :m] / len(y)
        grad_b += (p - one_hot).mean(axis=0)
    return total, np.concatenate([grad_w.ravel(), grad_b])


def shared_theta(heads):
    return np.concatenate([f64(heads.shared.weight).ravel(), f64(heads.shared.bias)])


def shared_optimum(x, y, dims, classes, wd):
    """MRL-E's optimum by scipy's L-BFGS-B on the float64 objective above (no code shared with the probe)."""
    x, y = f64(x), np.asarray(y)
    start = np.zeros(classes * x.shape[1] + classes)
    result = minimize(shared_objective, start, args=(x, y, dims, classes, wd), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 10000})
    return result.fun


def topk_accuracy(logits, y, k):
    """Top-k accuracy recomputed with numpy from the heads' logits."""
    top = np.argsort(-f64(logits), axis=1)[:, :k]
    return float((top == np.asarray(y)[:, None]).any(axis=1).sum()) / len(y)


def assert_probe_metrics_match(metrics: dict, logits: dict, y):
    """Reported {dim: {"lp_acc1", "lp_acc5"}} against top-1 and top-5 recomputed from the logits {dim: [N, C]}."""
    for m, values in logits.items():
        assert metrics[m]["lp_acc1"] == topk_accuracy(values, y, 1), (m, metrics[m])
        assert metrics[m]["lp_acc5"] == topk_accuracy(values, y, 5), (m, metrics[m])
