"""Two gloo DDP ranks with gathered features: the gradient each feature-gathering mode gives, ours and open_clip's own
ClipLoss run on the same ranks, against one process on the joined batch in float64 (open_clip's ClipLoss per
prefix). Tolerances: tests/numerics.py (per element, the float32 rounding bound of the reference gradient, with the
gather and all-reduce terms counted)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mrl_clip.loss import MatryoshkaClipLoss
from tests import numerics

DIMS = [4, 8, 16]
WEIGHTS = [1.0, 0.5, 2.0]
BATCH = 8  # per rank
RANKS = 2


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(10, 16)
        self.text = torch.nn.Linear(12, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        return self.image(x), self.text(y), self.logit_scale.exp()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(RANKS * BATCH, 10, generator=g), torch.randn(RANKS * BATCH, 12, generator=g)


def open_clip_matryoshka(image, text, scale, **clip_loss_args):
    """Our loss written with open_clip's ClipLoss: one ClipLoss per dim on the re-normalised prefixes, weighted."""
    loss = ClipLoss(**clip_loss_args)
    return sum(w * loss(F.normalize(image[:, :m], dim=-1), F.normalize(text[:, :m], dim=-1), scale)
               for m, w in zip(DIMS, WEIGHTS))


MODES = [(local_loss, gather_with_grad) for local_loss in (True, False) for gather_with_grad in (True, False)]


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(Towers())
    x, y = batch()
    x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
    grads = {}
    for local_loss, gather_with_grad in MODES:
        mode = {"local_loss": local_loss, "gather_with_grad": gather_with_grad, "rank": rank, "world_size": RANKS}
        for name, loss_fn in [("ours", lambda *f: MatryoshkaClipLoss(DIMS, WEIGHTS, **mode)(*f)[0]),
                              ("open_clip", lambda *f: open_clip_matryoshka(*f, **mode))]:
            model.zero_grad()
            loss_fn(*model(x, y)).backward()
            grads[local_loss, gather_with_grad, name] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "grads.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """Rank 0's gradients (DDP-averaged) for every mode, ours and open_clip's, from one spawn of two ranks."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=RANKS, join=True)
    return torch.load(out / "grads.pt", weights_only=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_side_loss(image, text, scale):
    """The joined batch's loss with the gathered side cut from the graph: row i of each direction's logits has a
    gradient through its own feature (the query) only."""
    total, labels = 0.0, torch.arange(image.shape[0])
    for m, w in zip(DIMS, WEIGHTS):
        a, b = F.normalize(image[:, :m], dim=-1), F.normalize(text[:, :m], dim=-1)
        total = total + w * (F.cross_entropy(scale * a @ b.detach().T, labels) +
                             F.cross_entropy(scale * b @ a.detach().T, labels)) / 2
    return total, None


def expected(local_loss, gather_with_grad):
    """DDP averages the ranks' gradients. Gathering with grad, the ranks' losses (full, or each its rows' share of
    the full one with local loss) back-propagate into every rank's features: the average is the joined batch's
    gradient. Without grad (open_clip's default) a rank's gradient reaches only its own features:
    - without local loss each rank computes the whole loss L but differentiates it through its own rows only, so the
      towers get (1/RANKS) sum_r dL/dθ through rank r's rows = dL/dθ / RANKS; logit_scale, used whole on every
      rank, gets dL/ds;
    - with local loss (the gathered features all detached) rank r's rows' logits reach the towers only through their
      own, query-side features: the average is the gradient of query_side_loss on the joined batch, logit_scale's
      included (the same dL/ds)."""
    def joined_loss(*features):  # open_clip's ClipLoss per prefix on the joined batch, one process
        return open_clip_matryoshka(*features), None
    loss_fn = query_side_loss if local_loss and not gather_with_grad else joined_loss
    grads, tolerances, _ = numerics.reference(Towers(), batch(), loss_fn, DIMS, WEIGHTS, ranks=RANKS)
    if not local_loss and not gather_with_grad:
        for name in grads:
            if name != "logit_scale":
                grads[name], tolerances[name] = grads[name] / RANKS, tolerances[name] / RANKS
    return grads, tolerances


@pytest.mark.parametrize("local_loss,gather_with_grad", MODES)
def test_ranks_give_the_gradient_each_gather_mode_promises(distributed, local_loss, gather_with_grad):
    grads, tolerances = expected(local_loss, gather_with_grad)
    for name in ("ours", "open_clip"):
        numerics.assert_gradients_within(distributed[local_loss, gather_with_grad, name], grads, tolerances, name)
