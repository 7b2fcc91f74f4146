"""Adaptive classification (the MRL paper's cascades): answer with the smallest dim that is confident enough.

For each sample, dims are tried from the smallest up; the first whose max softmax probability clears the threshold
answers, and the full width answers whatever is left. One threshold serves all dims; it is swept on a held-out
split, and the cheapest threshold whose held-out accuracy matches full width is then applied to the test split.
"""
from dataclasses import dataclass

import torch

# the last value can never be reached: full width answers everything, the frontier's end point
DEFAULT_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 0.9999, 1.01]


def cascade_predict(probs_by_dim: dict, dims, threshold: float):
    """(predicted class [N], dim that answered [N]) for probabilities {dim: [N, C]}."""
    n = next(iter(probs_by_dim.values())).shape[0]
    predicted = torch.full((n,), -1, dtype=torch.long)
    answered_at = torch.full((n,), dims[-1], dtype=torch.long)
    open_ = torch.ones(n, dtype=torch.bool)
    for m in dims:
        confidence, label = probs_by_dim[m].max(dim=1)
        take = open_ & ((confidence >= threshold) | (m == dims[-1]))
        predicted[take] = label[take]
        answered_at[take] = m
        open_ &= ~take
    return predicted, answered_at


@dataclass
class CascadePoint:
    threshold: float
    acc1: float
    expected_dim: float

    def as_dict(self):
        return {"threshold": self.threshold, "acc1": self.acc1, "expected_dim": self.expected_dim}


def sweep(probs_by_dim: dict, labels, dims, thresholds=DEFAULT_THRESHOLDS) -> list:
    points = []
    for t in thresholds:
        predicted, answered_at = cascade_predict(probs_by_dim, dims, t)
        points.append(CascadePoint(t, (predicted == labels).float().mean().item(),
                                   answered_at.float().mean().item()))
    return points


def choose_threshold(points: list, target_acc1: float) -> CascadePoint:
    """The cheapest point reaching the target accuracy, else the most accurate one."""
    reaching = [p for p in points if p.acc1 >= target_acc1]
    if reaching:
        return min(reaching, key=lambda p: (p.expected_dim, -p.acc1))
    return max(points, key=lambda p: (p.acc1, -p.expected_dim))


def evaluate_cascade(heldout_probs, heldout_labels, test_probs, test_labels, dims,
                     thresholds=DEFAULT_THRESHOLDS) -> dict:
    """Threshold chosen on held-out to match its full-width accuracy; reported on test with the whole frontier."""
    full = dims[-1]
    heldout_full = (heldout_probs[full].argmax(1) == heldout_labels).float().mean().item()
    chosen = choose_threshold(sweep(heldout_probs, heldout_labels, dims, thresholds), heldout_full)
    predicted, answered_at = cascade_predict(test_probs, dims, chosen.threshold)
    test_full = (test_probs[full].argmax(1) == test_labels).float().mean().item()
    return {
        "threshold": chosen.threshold,
        "acc1": (predicted == test_labels).float().mean().item(),
        "expected_dim": answered_at.float().mean().item(),
        "full_dim_acc1": test_full,
        "answered_at": {str(m): int((answered_at == m).sum()) for m in dims},
        "frontier": [p.as_dict() for p in sweep(test_probs, test_labels, dims, thresholds)],
    }
