"""One DeepSpeed ZeRO-2 step's gradients on this rank's half of a fixed batch (run with srun -n 2).

Every rank builds the same MRL-Tiny-28, takes rows [rank*B, (rank+1)*B) of a seeded batch of 2B, computes the
Matryoshka loss with gathered features (gather-with-grad, local loss) and back-propagates through the engine;
rank 0 saves DeepSpeed's full (rank-averaged) gradient of every parameter to OUT."""
import sys

import torch
from open_clip_train.distributed import init_distributed_device_so

from mrl_clip import models
from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train import deepspeed_engine as ds_engine

DIMS = [8, 32, 256]
BATCH = 8  # per rank


def seeded_batch(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 28, 28, generator=g), torch.randint(1, 1000, (n, 16), generator=g)


def seeded_model():
    torch.manual_seed(0)
    model = models.create("MRL-Tiny-28")[0]
    ds_engine.vector_logit_scale(model)
    return model


def main(out):
    from deepspeed.utils import safe_get_full_grad

    info = init_distributed_device_so(device="cpu")
    rank, world = info["global_rank"], info["world_size"]
    model = seeded_model()
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
              "train_batch_size": BATCH * world, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True}
    engine, _ = ds_engine.initialize(model, torch.optim.SGD(model.parameters(), lr=0.0), config)
    images, texts = seeded_batch(BATCH * world)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    loss_fn = MatryoshkaClipLoss(DIMS, local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    total, _ = loss_fn(*engine(images[rows], texts[rows]))
    engine.backward(total)
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"world_size": world, "grads": grads}, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
