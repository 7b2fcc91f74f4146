import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mrl_clip.errors import UserError
from mrl_clip.loss import MatryoshkaClipLoss
from tests import numerics


def features(n=16, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


# Both sides evaluate the same maths from the same features, each within numerics.loss_tolerance (a worst case, any
# summation order) of the exact value: they may differ by twice that. Run in float32 (what training uses) and in
# float64, where the same bound is 2^29 times smaller and any difference in the maths shows.
DTYPES = [(torch.float32, numerics.U32), (torch.float64, numerics.U64)]


@pytest.mark.parametrize("dtype,u", DTYPES)
def test_full_dim_equals_open_clip_clip_loss(dtype, u):
    img, txt = features(dtype=dtype)
    scale = torch.tensor(14.3, dtype=dtype)
    ours, per_dim = MatryoshkaClipLoss([64])(img, txt, scale)
    reference = ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    assert abs(float(ours) - float(reference)) <= 2 * numerics.loss_tolerance(14.3, [64], [1.0], 16, u)
    assert list(per_dim) == [64]


@pytest.mark.parametrize("dtype,u", DTYPES)
def test_each_dim_is_clip_loss_on_renormalised_prefix_weighted(dtype, u):
    img, txt = features(dtype=dtype)
    scale = torch.tensor(10.0, dtype=dtype)
    dims, weights = [8, 16, 32, 64], [2.0, 1.0, 0.5, 1.0]
    total, per_dim = MatryoshkaClipLoss(dims, weights)(img, txt, scale)
    expected = 0.0
    for m, w in zip(dims, weights):
        ref = ClipLoss()(F.normalize(img[:, :m], dim=-1), F.normalize(txt[:, :m], dim=-1), scale)
        assert abs(float(per_dim[m]) - float(ref)) <= 2 * numerics.loss_tolerance(10.0, [m], [1.0], 16, u)
        expected = expected + w * ref
    assert abs(float(total) - float(expected)) <= 2 * numerics.loss_tolerance(10.0, dims, weights, 16, u)


@pytest.mark.parametrize("dtype,u", DTYPES)
def test_prefix_is_renormalised_not_sliced_from_normalised_vector(dtype, u):
    """Normalising at full width first moves each coordinate by a relative gamma(64 + 3) (sum of squares, sqrt,
    division), which the bound takes as a feature error; slicing without re-normalising is other maths, further
    from ours than rounding can explain."""
    img, txt = features(dtype=dtype)
    scale = torch.tensor(10.0, dtype=dtype)
    loss = MatryoshkaClipLoss([8, 64])
    raw, _ = loss(img, txt, scale)
    pre_normalised, _ = loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    tolerance = 2 * numerics.loss_tolerance(10.0, [8, 64], [1.0, 1.0], 16, u, feature_error=numerics.gamma(67, u))
    assert abs(float(raw) - float(pre_normalised)) <= tolerance
    wrong = ClipLoss()(F.normalize(img, dim=-1)[:, :8], F.normalize(txt, dim=-1)[:, :8], scale)
    _, per_dim = loss(img, txt, scale)
    assert abs(float(per_dim[8]) - float(wrong)) > tolerance


def test_float64_gradients_match_finite_differences():
    img, txt = features(n=6, d=12, dtype=torch.float64)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    loss = MatryoshkaClipLoss([3, 6, 12], weights=[1.0, 0.5, 2.0])
    assert torch.autograd.gradcheck(lambda a, b, s: loss(a, b, s)[0], (img, txt, scale), eps=1e-6, atol=1e-6)


def test_float64_recomputation_by_hand():
    img, txt = features(n=8, d=16, dtype=torch.float64)
    scale = 7.0
    total, _ = MatryoshkaClipLoss([4, 16])(img, txt, torch.tensor(scale, dtype=torch.float64))
    expected = 0.0
    for m in (4, 16):
        a = img[:, :m] / img[:, :m].norm(dim=1, keepdim=True)
        b = txt[:, :m] / txt[:, :m].norm(dim=1, keepdim=True)
        logits = scale * a @ b.T
        diag = torch.diagonal(logits)
        i2t = (torch.logsumexp(logits, dim=1) - diag).mean()
        t2i = (torch.logsumexp(logits, dim=0) - diag).mean()
        expected += (i2t + t2i) / 2
    tolerance = 2 * numerics.loss_tolerance(scale, [4, 16], [1.0, 1.0], 8, numerics.U64)
    assert abs(float(total) - float(expected)) <= tolerance


@pytest.mark.parametrize("dims", [[], [0, 8], [16, 8], [8, 8], [-1]])
def test_bad_dims_rejected(dims):
    with pytest.raises(UserError):
        MatryoshkaClipLoss(dims)


def test_weights_must_match_dims():
    with pytest.raises(UserError):
        MatryoshkaClipLoss([8, 16], weights=[1.0])


def test_dims_above_feature_width_rejected():
    img, txt = features(d=32)
    with pytest.raises(ValueError):
        MatryoshkaClipLoss([8, 64])(img, txt, torch.tensor(1.0))
