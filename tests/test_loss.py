import argparse
import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip_train.data import DataInfo
from open_clip_train.train import train_one_epoch

from mrl_clip import models
from mrl_clip.errors import UserError
from mrl_clip.loss import MatryoshkaClipLoss, MatryoshkaSigLipLoss
from mrl_clip.train.loop import train_step
from mrl_clip.train.plain_engine import PlainEngine, make_optimizer
from mrl_clip.train.stream import StreamSettings, make_train_stream
from tests import numerics

from .conftest import TINY


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


# SigLIP at open_clip_train's initial scale and bias (10, -10): each side within numerics.siglip_loss_tolerance of the
# exact value.
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0


@pytest.mark.parametrize("dtype,u", DTYPES)
def test_siglip_full_dim_equals_open_clip_siglip_loss(dtype, u):
    img, txt = features(dtype=dtype)
    scale, bias = torch.tensor(SIGLIP_SCALE, dtype=dtype), torch.tensor(SIGLIP_BIAS, dtype=dtype)
    ours, per_dim = MatryoshkaSigLipLoss([64])(img, txt, scale, bias)
    reference = SigLipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, bias)
    tolerance = 2 * numerics.siglip_loss_tolerance(SIGLIP_SCALE, SIGLIP_BIAS, [64], [1.0], 16, u=u)
    assert abs(float(ours) - float(reference)) <= tolerance
    assert list(per_dim) == [64]


@pytest.mark.parametrize("dtype,u", DTYPES)
def test_siglip_is_a_weighted_sum_of_open_clip_siglip_loss_per_prefix_in_float64(dtype, u):
    """The reference: open_clip's SigLipLoss on each re-normalised prefix, in float64 from the same features (made
    in float32, so that the float32 side's inputs are exact)."""
    img, txt = features()
    dims, weights = [8, 16, 32, 64], [2.0, 1.0, 0.5, 1.0]
    scale, bias = 7.0, -4.0
    total, per_dim = MatryoshkaSigLipLoss(dims, weights)(img.to(dtype), txt.to(dtype), torch.tensor(scale, dtype=dtype),
                                                         torch.tensor(bias, dtype=dtype))
    img64, txt64 = img.double(), txt.double()
    expected = 0.0
    for m, w in zip(dims, weights):
        ref = SigLipLoss()(F.normalize(img64[:, :m], dim=-1), F.normalize(txt64[:, :m], dim=-1),
                           torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
        tolerance = (numerics.siglip_loss_tolerance(scale, bias, [m], [1.0], 16, u=u) +
                     numerics.siglip_loss_tolerance(scale, bias, [m], [1.0], 16, u=numerics.U64))
        assert abs(float(per_dim[m]) - float(ref)) <= tolerance, m
        expected = expected + w * ref
    tolerance = (numerics.siglip_loss_tolerance(scale, bias, dims, weights, 16, u=u) +
                 numerics.siglip_loss_tolerance(scale, bias, dims, weights, 16, u=numerics.U64))
    assert abs(float(total) - float(expected)) <= tolerance


def test_siglip_float64_recomputation_by_hand():
    """The SigLIP paper's loss written out: -(1/B) sum_ij log sigmoid(y_ij (s cos_ij + b)), y = +1 on the
    diagonal and -1 elsewhere, per prefix."""
    img, txt = features(n=8, d=16, dtype=torch.float64)
    scale, bias = 5.0, -3.0
    total, _ = MatryoshkaSigLipLoss([4, 16], [1.0, 3.0])(img, txt, torch.tensor(scale, dtype=torch.float64),
                                                        torch.tensor(bias, dtype=torch.float64))
    expected = 0.0
    for m, w in ((4, 1.0), (16, 3.0)):
        a = img[:, :m].numpy() / np.linalg.norm(img[:, :m].numpy(), axis=1, keepdims=True)
        b = txt[:, :m].numpy() / np.linalg.norm(txt[:, :m].numpy(), axis=1, keepdims=True)
        signs = 2 * np.eye(8) - 1
        expected += w * np.log1p(np.exp(-signs * (scale * a @ b.T + bias))).sum() / 8
    tolerance = 2 * numerics.siglip_loss_tolerance(scale, bias, [4, 16], [1.0, 3.0], 8, u=numerics.U64)
    assert abs(float(total) - expected) <= tolerance


def test_siglip_float64_gradients_match_finite_differences():
    img, txt = features(n=6, d=12, dtype=torch.float64)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = MatryoshkaSigLipLoss([3, 6, 12], weights=[1.0, 0.5, 2.0])
    inputs = (img.requires_grad_(True), txt.requires_grad_(True), scale, bias)
    assert torch.autograd.gradcheck(lambda *x: loss(*x)[0], inputs, eps=1e-6, atol=1e-6)


def test_siglip_bad_dims_rejected():
    with pytest.raises(UserError):
        MatryoshkaSigLipLoss([16, 8])
    with pytest.raises(UserError):
        MatryoshkaSigLipLoss([8, 16], weights=[1.0])
    img, txt = features(d=32)
    with pytest.raises(ValueError):
        MatryoshkaSigLipLoss([8, 64])(img, txt, torch.tensor(1.0), torch.tensor(0.0))


@pytest.mark.parametrize("dtype,u", DTYPES)
def test_clip_loss_takes_a_logit_bias_as_open_clip_clip_loss_does(dtype, u):
    """A model with a logit_bias trained with the CLIP loss: added to the logits as open_clip's ClipLoss adds it
    (softmax ignores it: the loss is the unbiased one). The bias adds one rounding of |logit| <= scale + |bias| per
    logit, taken as a feature error of (scale + |bias|) / scale * u."""
    img, txt = features(dtype=dtype)
    scale, bias = torch.tensor(14.3, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
    ours, _ = MatryoshkaClipLoss([64])(img, txt, scale, bias)
    reference = ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, bias)
    tolerance = 2 * numerics.loss_tolerance(14.3, [64], [1.0], 16, u, feature_error=(24.3 / 14.3) * u)
    assert abs(float(ours) - float(reference)) <= tolerance


class OneBatchLoader(list):
    """What open_clip_train's train_one_epoch reads of a DataInfo's dataloader: its batches and their counts."""

    def __init__(self, batches, batch_size):
        super().__init__(batches)
        self.num_batches, self.num_samples = len(batches), len(batches) * batch_size


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_open_clip_train_loop_sums_and_logs_our_terms_and_steps_as_ours(siglip, fmnist_data, caplog):
    """open_clip_train's own train_one_epoch, one step of MRL-Tiny-28 on real Fashion-MNIST pairs with our loss
    (output_dict=True: it sums the terms and logs each), against mrl_clip.train's step (the tuple return) from the
    same weights: the terms it logs are our weighted per-dim losses, and both steps leave the same weights. Both
    run the same operations in the same order (forward, the terms summed from 0, one backward, AdamW), so the
    floats are equal, not close."""
    dims, weights, batch = [8, 32, 256], [1.0, 0.5, 2.0], 16
    torch.manual_seed(0)
    model, preprocess, _, tokenizer = models.create(TINY, siglip=siglip)
    images, texts, _ = next(iter(make_train_stream(
        StreamSettings(str(fmnist_data["train"]), preprocess, tokenizer, batch, batch, workers=0), epoch=0).loader))
    loss_class = MatryoshkaSigLipLoss if siglip else MatryoshkaClipLoss
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    theirs.output_dict = True  # as open_clip_train creates its model

    with torch.no_grad():
        out = theirs(images, texts)
        terms = loss_class(dims, weights)(**out, output_dict=True)
        total, per_dim = loss_class(dims, weights)(out["image_features"], out["text_features"], out["logit_scale"],
                                                   *([out["logit_bias"]] if siglip else []))
    assert list(terms) == [f"loss_dim{m}" for m in dims]
    assert all(float(terms[f"loss_dim{m}"]) == float(w * per_dim[m]) for m, w in zip(dims, weights))
    assert float(sum(terms.values())) == float(total)

    args = argparse.Namespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=True,
                              horovod=False, grad_clip_norm=None, rank=0, local_rank=0, world_size=1,
                              batch_size=batch, log_every_n_steps=1, wandb=False)
    their_optimizer = make_optimizer(theirs, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    caplog.set_level(logging.INFO)
    torch.manual_seed(1)
    train_one_epoch(theirs, {"train": DataInfo(OneBatchLoader([(images, texts)], batch))}, loss_class(dims, weights),
                    0, their_optimizer, None, None, None, args)
    logged = caplog.text
    assert all(f"Loss_dim{m}: {float(terms[f'loss_dim{m}']):#.5g}" in logged for m in dims), logged
    assert f"Loss: {float(total):#.5g}" in logged, logged

    engine = PlainEngine(ours, make_optimizer(ours, 1e-3, 0.2, (0.9, 0.98), 1e-6),
                         torch.amp.GradScaler(enabled=False))
    torch.manual_seed(1)
    assert not train_step(engine, loss_class(dims, weights), [(images, texts)]).skipped
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
