"""Two gloo ranks with gathered features give the gradients of one rank on the joined batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrl_clip.loss import MatryoshkaClipLoss

DIMS = [4, 8, 16]
BATCH = 8  # per rank


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
    return torch.randn(2 * BATCH, 10, generator=g), torch.randn(2 * BATCH, 12, generator=g)


def rank_main(rank, port, out_dir, local_loss, gather_with_grad):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(Towers())
    x, y = batch()
    x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
    loss_fn = MatryoshkaClipLoss(DIMS, local_loss=local_loss, gather_with_grad=gather_with_grad,
                                 rank=rank, world_size=2)
    total, _ = loss_fn(*model(x, y))
    total.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, os.path.join(out_dir, "grads.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("local_loss", [True, False])
def test_two_ranks_equal_one_rank_on_joined_batch(tmp_path, local_loss):
    mp.spawn(rank_main, args=(free_port(), str(tmp_path), local_loss, True), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)

    model = Towers()
    total, _ = MatryoshkaClipLoss(DIMS)(*model(*batch()))
    total.backward()
    for name, param in model.named_parameters():
        assert torch.allclose(distributed[name], param.grad, atol=1e-6, rtol=1e-5), name
