"""tests/numerics.py, the float32 bounds the gradient tests use: what they rest on holds, they accept float32
autograd and they reject the bugs the engine tests are for."""
import copy

import pytest
import torch

from mrl_clip.loss import MatryoshkaClipLoss
from tests import numerics
from tests.ds_grad_probe import DIMS, seeded_batch, seeded_model

BATCH = 8


def float32_sums(x):
    """The same sum in float32, in the orders kernels use: sequential both ways, sorted by size, pairwise/vector."""
    def sequential(values):
        total = torch.zeros((), dtype=torch.float32)
        for v in values:
            total = total + v
        return total
    return [sequential(x), sequential(x.flip(0)), sequential(x[x.abs().argsort()]), x.sum(), x.view(-1, 8).sum(0).sum()]


def test_any_summation_order_is_within_gamma_n_of_the_exact_sum():
    """Higham's bound, the base of loss_tolerance and update_tolerance: whatever the order, a float32 sum of n terms
    is within gamma(n - 1) * sum|terms| of the exact sum (the float64 sum used as exact is itself off by at most
    gamma(n - 1) at u = 2^-53)."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-3, 1e4):
        x = (torch.randn(1024, generator=g) * torch.exp(torch.randn(1024, generator=g)) * scale).float()
        exact = x.double().sum()
        for total in float32_sums(x):
            bound = numerics.gamma(x.numel() - 1) + numerics.gamma(x.numel() - 1, numerics.U64)
            assert abs(float(total) - float(exact)) <= bound * float(x.double().abs().sum())


@pytest.fixture(scope="module")
def case():
    model = seeded_model()
    batch = seeded_batch(BATCH)
    loss_fn = MatryoshkaClipLoss(DIMS)
    grads, tolerances, info = numerics.reference(model, batch, loss_fn, DIMS, loss_fn.weights)
    model.zero_grad()
    loss_fn(*model(*batch))[0].backward()
    float32 = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"model": model, "batch": batch, "loss_fn": loss_fn, "grads": grads, "tolerances": tolerances,
            "info": info, "float32": float32}


def test_reference_is_plain_float64_autograd(case):
    """The hooks and the written-out attention compute the same function: the instrumented float64 gradient equals
    plain float64 autograd of the unmodified model, to the same bound at float64's u (twice: two evaluations)."""
    model = copy.deepcopy(case["model"]).double()
    images, texts = case["batch"]
    case["loss_fn"](*model(images.double(), texts))[0].backward()
    plain = {name: p.grad for name, p in model.named_parameters()}
    float64_tolerances = {name: 2 * t * numerics.U64 / numerics.U32 for name, t in case["tolerances"].items()}
    numerics.assert_gradients_within(plain, case["grads"], float64_tolerances, "plain float64")


def test_float32_autograd_is_within_the_bound_and_unused_embedding_rows_are_exact(case):
    numerics.assert_gradients_within(case["float32"], case["grads"], case["tolerances"], "float32 autograd")
    unused = case["tolerances"]["token_embedding.weight"].sum(1) == 0
    assert unused.sum() > 49000 and (case["float32"]["token_embedding.weight"][unused] == 0).all()


@pytest.mark.parametrize("bug", ["missing 1/world_size", "1/accum twice", "1% too large", "another batch"])
def test_bound_rejects_materially_different_gradients(case, bug):
    """What the engine tests must catch, made from the correct float32 gradient: every element within the bound
    would mean the test could not tell these from rounding."""
    if bug == "another batch":
        model = case["model"]
        model.zero_grad()
        case["loss_fn"](*model(*seeded_batch(BATCH, step=1)))[0].backward()
        wrong = {name: p.grad.clone() for name, p in model.named_parameters()}
    else:
        factor = {"missing 1/world_size": 2.0, "1/accum twice": 0.5, "1% too large": 1.01}[bug]
        wrong = {name: factor * g for name, g in case["float32"].items()}
    with pytest.raises(AssertionError, match="outside the float32 rounding bound"):
        numerics.assert_gradients_within(wrong, case["grads"], case["tolerances"], bug)


def test_loss_tolerance_covers_float32_losses_of_exact_features():
    """loss_tolerance is a worst case: a float32 evaluation of the loss from float32 features is within it of the
    float64 evaluation of the same features, at the logit scales training sees."""
    g = torch.Generator().manual_seed(0)
    dims, weights = [8, 32, 256], [1.0, 0.5, 2.0]
    for scale in (1.0, 1 / 0.07, 100.0):
        image, text = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
        loss_fn = MatryoshkaClipLoss(dims, weights)
        single, _ = loss_fn(image, text, torch.tensor(scale))
        double, _ = loss_fn(image.double(), text.double(), torch.tensor(scale, dtype=torch.float64))
        assert abs(float(single) - float(double)) <= numerics.loss_tolerance(scale, dims, weights, 64)
