import pytest
import torch

from mrl_clip.eval.cascade import (
    cascade_predict,
    choose_threshold,
    evaluate_cascade,
    sweep,
)

DIMS = [8, 64, 256]


def probabilities():
    """Three samples: confident at 8 dims, confident only at 64, never confident (full width answers)."""
    return {
        8: torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.5, 0.5]]),
        64: torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]]),
        256: torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.3, 0.7]]),
    }


def test_smallest_confident_dim_answers():
    predicted, answered_at = cascade_predict(probabilities(), DIMS, threshold=0.85)
    assert predicted.tolist() == [0, 1, 1]
    assert answered_at.tolist() == [8, 64, 256]


def test_extreme_thresholds():
    _, at_zero = cascade_predict(probabilities(), DIMS, threshold=0.0)
    _, above_one = cascade_predict(probabilities(), DIMS, threshold=1.01)
    assert at_zero.tolist() == [8, 8, 8] and above_one.tolist() == [256, 256, 256]


def test_sweep_and_choice_reach_full_width_accuracy_cheaply():
    labels = torch.tensor([0, 1, 1])
    points = sweep(probabilities(), labels, DIMS, thresholds=[0.0, 0.85, 1.01])
    assert [p.acc1 for p in points] == pytest.approx([1 / 3, 1.0, 1.0])
    chosen = choose_threshold(points, target_acc1=1.0)
    assert chosen.threshold == 0.85 and chosen.expected_dim == pytest.approx((8 + 64 + 256) / 3)


def test_evaluate_cascade_reports_the_frontier():
    labels = torch.tensor([0, 1, 1])
    result = evaluate_cascade(probabilities(), labels, probabilities(), labels, DIMS, thresholds=[0.0, 0.85, 1.01])
    assert result["threshold"] == 0.85 and result["acc1"] == 1.0 and result["full_dim_acc1"] == 1.0
    assert result["answered_at"] == {"8": 1, "64": 1, "256": 1}
    assert len(result["frontier"]) == 3
