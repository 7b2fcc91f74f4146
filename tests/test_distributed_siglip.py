"""Gloo DDP ranks with MatryoshkaSigLipLoss: for each of open_clip's ways of exchanging text features (its
SigLipLoss `dist_impl`), the ranks' loss and gradients, ours and open_clip's own SigLipLoss called once per prefix
on the same ranks, against one process on the joined batch in float64 (open_clip's SigLipLoss per prefix); ours
exchanges the features once per step, that one once per dim. Four ranks, so that 'bidir' runs both of open_clip's
exchanges (a two-way one and the one-way remainder) and 'shift' passes features on through more than one hop.
Tolerances: tests/numerics.py."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip import loss as open_clip_loss
from open_clip.loss import SigLipLoss

from mrl_clip import loss as mrl_loss
from mrl_clip.loss import MatryoshkaSigLipLoss
from tests import numerics

from .test_distributed import free_port

DIMS = [4, 8, 16]
WEIGHTS = [1.0, 0.5, 2.0]
BATCH = 4  # per rank
RANKS = 4
IMPLS = ["bidir", "shift", "reduce", "gather"]
EXCHANGES = ("neighbour_exchange_with_grad", "neighbour_exchange_bidir_with_grad")


class SigLipTowers(torch.nn.Module):
    """Two linear towers with open_clip_train's SigLIP initialisation of the temperature and the bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(10, 16)
        self.text = torch.nn.Linear(12, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, x, y):
        return self.image(x), self.text(y), self.logit_scale.exp(), self.logit_bias


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(RANKS * BATCH, 10, generator=g), torch.randn(RANKS * BATCH, 12, generator=g)


def open_clip_per_prefix(image, text, scale, bias, **siglip_args):
    """Our loss written with open_clip's SigLipLoss: one call per dim on the re-normalised prefixes, weighted."""
    loss = SigLipLoss(**siglip_args)
    total = sum(w * loss(F.normalize(image[:, :m], dim=-1), F.normalize(text[:, :m], dim=-1), scale, bias)
                for m, w in zip(DIMS, WEIGHTS))
    return total, None


def count_exchanges(counts):
    """Wrap open_clip's neighbour exchanges where both losses look them up, counting the calls."""
    for module in (mrl_loss, open_clip_loss):
        for name in EXCHANGES:
            def counted(*args, _f=getattr(module, name), **kwargs):
                counts[0] += 1
                return _f(*args, **kwargs)
            setattr(module, name, counted)


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(1)
    counts = [0]
    count_exchanges(counts)
    model = torch.nn.parallel.DistributedDataParallel(SigLipTowers())
    x, y = batch()
    x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
    found = {}
    for impl in IMPLS:
        mode = {"rank": rank, "world_size": RANKS, "dist_impl": impl}
        for name, loss_fn in [("ours", MatryoshkaSigLipLoss(DIMS, WEIGHTS, **mode)),
                              ("open_clip", lambda *f: open_clip_per_prefix(*f, **mode))]:
            model.zero_grad()
            counts[0] = 0
            total, _ = loss_fn(*model(x, y))
            exchanges = counts[0]
            total.backward()
            mean_loss = total.detach().clone()
            dist.all_reduce(mean_loss)
            found[impl, name] = {"loss": float(mean_loss) / RANKS, "exchanges": exchanges,
                                 "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}}
    if rank == 0:
        torch.save(found, os.path.join(out_dir, "found.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """Rank 0's view (DDP-averaged gradients, the ranks' mean loss) for every dist_impl, ours and open_clip's."""
    out = tmp_path_factory.mktemp("siglip_ranks")
    mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=RANKS, join=True)
    return torch.load(out / "found.pt", weights_only=True)


@pytest.fixture(scope="module")
def joined():
    """Float64 gradients and loss of one process on the joined batch (open_clip's SigLipLoss per prefix), and the
    float32 tolerances."""
    grads, tolerances, info = numerics.reference(SigLipTowers(), batch(), open_clip_per_prefix, DIMS, WEIGHTS,
                                                 ranks=RANKS, sigmoid=True)
    x, y = batch()
    total, _ = open_clip_per_prefix(*SigLipTowers().double()(x.double(), y.double()))
    return grads, tolerances, info, float(total.detach())


@pytest.mark.parametrize("impl", IMPLS)
def test_ranks_equal_one_process_on_the_joined_batch(distributed, joined, impl):
    """DDP averages the ranks' gradients, and each rank's loss (its images against every rank's texts, over its
    batch size) averages to the joined batch's loss: the exchange carries gradients back to the sender, so the
    average is the joined batch's gradient. Each rank's float32 loss is within siglip_loss_tolerance of exact."""
    grads, tolerances, info, loss = joined
    loss_tolerance = (numerics.siglip_loss_tolerance(info["logit_scale"], info["logit_bias"], DIMS, WEIGHTS, BATCH,
                                                     texts=RANKS * BATCH) +
                      numerics.siglip_loss_tolerance(info["logit_scale"], info["logit_bias"], DIMS, WEIGHTS,
                                                     RANKS * BATCH, u=numerics.U64))
    for name in ("ours", "open_clip"):
        got = distributed[impl, name]
        assert abs(got["loss"] - loss) <= loss_tolerance, (name, got["loss"], loss, loss_tolerance)
        numerics.assert_gradients_within(got["grads"], grads, tolerances, f"{impl} {name}")


@pytest.mark.parametrize("impl,per_step", [("bidir", 2), ("shift", RANKS - 1)])
def test_text_features_are_exchanged_once_not_once_per_dim(distributed, impl, per_step):
    """With four ranks 'bidir' makes one two-way exchange and the one-way remainder; 'shift' passes features on
    RANKS - 1 times. open_clip's SigLipLoss called per prefix repeats that for every dim."""
    assert distributed[impl, "ours"]["exchanges"] == per_step
    assert distributed[impl, "open_clip"]["exchanges"] == per_step * len(DIMS)
