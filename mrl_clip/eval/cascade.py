"""Adaptive classification (the MRL paper's cascades): answer with the smallest dim that is confident enough.

For each sample, dims are tried from the smallest up; the first whose max softmax probability clears the threshold
answers, and the full width answers whatever is left. One threshold serves all dims; it is swept on a held-out
split, and the cheapest threshold whose held-out accuracy matches full width is then applied to the test split.
"""
from dataclasses import dataclass

import torch

from ..files import write_json
from . import probe
from .report import dims_for
from .zeroshot import encode_class_prompts, load_classification_folder, zeroshot_logits

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


def run_cascade(args, name, pretrained, dims):
    """Softmax probabilities per dim on a held-out split and on --split, through evaluate_cascade."""
    if args.source == "zeroshot":
        model, preprocess, tokenizer, features = probe.load_with_features(args, name, pretrained, [args.split])
        x, y = features[args.split]
        data = load_classification_folder(args.data, preprocess, args.split)
        prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates, args.device)
        probs = {m: zeroshot_logits(x, prompts, m).softmax(dim=1) for m in dims}
        # thresholds are chosen on half of the split (a fixed permutation), reported on the other half
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        held, test = order[: len(y) // 2], order[len(y) // 2:]
        return evaluate_cascade({m: p[held] for m, p in probs.items()}, y[held],
                                {m: p[test] for m, p in probs.items()}, y[test], dims)

    train_x, train_y, test_x, test_y, num_classes, _ = probe.standardized_probe_data(args, name, pretrained)
    # the probe is fitted on 80% of the train split; its thresholds are chosen on the other 20%
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))
    held, fit = order[: len(order) // 5], order[len(order) // 5:]
    heads, _ = probe.select_and_train(train_x[fit], train_y[fit], dims, num_classes, args.source)
    with torch.no_grad():
        held_probs = {m: logits.softmax(dim=1) for m, logits in heads(train_x[held]).items()}
        test_probs = {m: logits.softmax(dim=1) for m, logits in heads(test_x).items()}
    return evaluate_cascade(held_probs, train_y[held], test_probs, test_y, dims)


def format_cascade(label, result) -> str:
    lines = [f"{label}: threshold {result['threshold']} (chosen on held-out) -> acc1 {100 * result['acc1']:.2f} "
             f"with {result['expected_dim']:.1f} expected dims (full width: {100 * result['full_dim_acc1']:.2f})",
             "  threshold   acc1  expected dims"]
    lines += [f"  {p['threshold']:9.3f}  {100 * p['acc1']:5.2f}  {p['expected_dim']:13.1f}" for p in result["frontier"]]
    return "\n".join(lines)


def add_flags(sub):
    probe.add_feature_flags(sub)
    sub.add_argument("--source", choices=["zeroshot", "mrl", "mrl-e"], default="zeroshot",
                     help="zero-shot logits, or an MRL / MRL-E probe's")


def run_task(args, entries, requested) -> int:
    """`eval cascade`: each model's cascade (its threshold, accuracy, expected dims and frontier) as text and JSON."""
    results = {}
    for label, name, ckpt in entries:
        dims = dims_for(name, requested)
        results[label] = {"dims": dims, "source": args.source, "cascade": run_cascade(args, name, ckpt, dims)}
        print(format_cascade(label, results[label]["cascade"]))
    if args.output:
        write_json({"task": "cascade", "data": args.data, "split": args.split, "models": results}, args.output)
    return 0
