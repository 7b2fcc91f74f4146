"""A training run's first logged step recomputed outside the trainer, for the tests of the real CLI: the initial
model (open_clip_train's seeding, open_clip's constructor), the step's samples (the run's own stream, rebuilt from
its flags), float64 features, and open_clip's own ClipLoss / SigLipLoss on each re-normalised prefix.

The trainer logs the step's loss before any update, from float32 features of those weights and samples; the
reference is exact to float64. The bound (tests/numerics.py): the float32 features are off by LAMBDA u sqrt(N) of
their rows' scale (N: the rounding events of the model's forward and backward at this batch, numerics.
rounding_events), and the loss chain from such features is bounded by numerics.loss_tolerance (CLIP, a worst case)
or siglip_tolerance below (SigLIP, from the reference's own terms); the float64 side adds the worst case at
u = 2^-53. Measured on MRL-Tiny-28: the logged losses are within ~1e-6 of the reference, the bounds ~4e-3 to 5e-3
per dim, and the first loss of a model seeded otherwise misses by 0.02 to 1.1 per dim."""
import math
from itertools import islice

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip_train.main import random_seed

from mrl_clip.train.stream import StreamSettings, make_train_stream

from . import numerics
from .ds_grad_probe import seeded_batch

# open_clip_train's --siglip: the SigLIP paper's initial temperature 10 and bias -10, given to open_clip's constructor
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


def first_step(model_name, train_data, num_samples, batch_size, accum_freq=1, seed=0, siglip=False):
    """(float64 image features, text features, exp(logit_scale)[, logit_bias with siglip]) of the run's initial model
    on its first step's batch_size x accum_freq samples (one process; the run had --workers 0)."""
    random_seed(seed, 0)  # what mrl_clip.train does before creating the model, as open_clip_train does
    model, preprocess, _ = open_clip.create_model_and_transforms(model_name, **(SIGLIP_INIT if siglip else {}))
    tokenizer = open_clip.get_tokenizer(model_name)
    stream = make_train_stream(StreamSettings(train_data, preprocess, tokenizer, batch_size, num_samples, seed=seed,
                                              workers=0, accum_freq=accum_freq), epoch=0)
    batches = list(islice(stream.loader, accum_freq))
    images, texts = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        return tuple(t.detach() for t in model.double()(images.double(), texts))


def per_prefix_tensors(features, dims):
    """{m: open_clip's loss on the prefixes [:, :m], each L2-normalised}: ClipLoss, or SigLipLoss given a bias."""
    image, text, *scalars = features
    loss = SigLipLoss() if len(scalars) == 2 else ClipLoss()
    return {m: loss(F.normalize(image[:, :m], dim=-1), F.normalize(text[:, :m], dim=-1), *scalars) for m in dims}


def per_prefix(features, dims):
    return {m: float(loss) for m, loss in per_prefix_tensors(features, dims).items()}


def feature_error(model_name, batch, dims, siglip=False):
    """LAMBDA u sqrt(N): the float32 features' error relative to their rows' scale (tests/numerics.py; N counts
    the rounding events of the model's forward and backward and of the loss at this batch size, an over-count for
    the features alone)."""
    model = open_clip.create_model(model_name, **(SIGLIP_INIT if siglip else {}))
    events = numerics.rounding_events(model, seeded_batch(batch), dims, sigmoid=siglip)
    return numerics.LAMBDA * numerics.U32 * math.sqrt(events)


def tolerance(features, dims, weights, error):
    """|float32 evaluation - float64 reference| for the weighted sum over `dims` of per_prefix's losses, from
    float32 features off by `error` of their rows' scale. The trainer's exp(logit_scale) is one float32 rounding
    (<= u relative) from the reference's, which moves a logit by at most u s: within a feature error of u."""
    image, _, scale, *bias = features
    batch, scale, error = image.shape[0], float(scale.reshape(-1)[0]), error + numerics.U32
    if bias:
        return (siglip_tolerance(features, dims, weights, error) +
                numerics.siglip_loss_tolerance(scale, float(bias[0]), dims, weights, batch, u=numerics.U64))
    return (numerics.loss_tolerance(scale, dims, weights, batch, feature_error=error) +
            numerics.loss_tolerance(scale, dims, weights, batch, u=numerics.U64))


def siglip_tolerance(features, dims, weights, error, u=numerics.U32):
    """The SigLIP loss's float32 error bound with the terms' sizes taken from the float64 reference, where
    numerics.siglip_loss_tolerance (no reference at hand) takes every one of the B x B pairs at its largest: at
    open_clip_train's initial bias -10 the off-diagonal terms are ~e^-10, and that worst case (~0.4 here) would
    not tell another model's first loss from this one's.

    Per dim m and pair ij, the exact logit z = s cos_ij + b and its term f(z) = softplus(-y z) = -log sigmoid(y z)
    (y = +1 on the diagonal, -1 elsewhere; f > 0). The computed logit is within d = s (gamma(3 m + 8) + 2 error)
    + gamma(2) (s + |b|) of z (numerics.siglip_loss_tolerance), and |f'| = sigmoid(-y z) grows by at most e^d
    over |t| <= d, so the term moves by at most d e^d sigmoid(-y z). torch's log_sigmoid(x) = min(x, 0) -
    log1p(exp(-|x|)), whose two parts' sizes add up to f itself: a few ulps each, gamma(8) f of the computed term.
    The B^2 positive terms are summed in any order (gamma(B^2) of their sum) and divided by B; the weighted sum of
    the dims adds gamma(len(dims) + 2) of its size."""
    image, text, scale, bias = features
    batch, s, b = image.shape[0], float(scale.reshape(-1)[0]), float(bias.reshape(-1)[0])
    signs = 2 * torch.eye(batch, dtype=image.dtype) - 1
    total, size = 0.0, 0.0
    for m, w in zip(dims, weights):
        d = s * (numerics.gamma(3 * m + 8, u) + 2 * error) + numerics.gamma(2, u) * (s + abs(b))
        cosines = F.normalize(image[:, :m], dim=-1) @ F.normalize(text[:, :m], dim=-1).T
        z = signs * (s * cosines + b)
        moved = d * math.exp(d) * torch.sigmoid(-z)
        terms = F.softplus(-z) + moved
        pair = moved + numerics.gamma(8, u) * terms
        per_dim = float(pair.sum() + numerics.gamma(batch * batch + 1, u) * (terms + pair).sum()) / batch
        total += abs(w) * per_dim
        size += abs(w) * (float(terms.sum()) / batch + per_dim)
    return total + numerics.gamma(len(dims) + 2, u) * size


def assert_first_record_is_open_clips_loss(record, features, dims, weights, error):
    """A run's first log.jsonl record: every dim's loss, and their weighted sum, within the bound of open_clip's
    loss per prefix on the same weights and samples."""
    reference = per_prefix(features, dims)
    assert set(record["loss_dim"]) == {str(m) for m in dims}, record
    for m in dims:
        got, bound = record["loss_dim"][str(m)], tolerance(features, [m], [1.0], error)
        assert abs(got - reference[m]) <= bound, (m, got, reference[m], bound)
    total = sum(w * reference[m] for m, w in zip(dims, weights))
    bound = tolerance(features, dims, weights, error)
    assert abs(record["loss"] - total) <= bound, (record["loss"], total, bound)
