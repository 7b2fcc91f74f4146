"""MRL-Tiny-28 through a DeepSpeed ZeRO engine: each step's gradient and its SGD step, written to a file.

    python tests/ds_grad_probe.py OUT [--stage 2] [--accum 1] [--steps 1] [--batch 8] [--lr 0]

One process, or several ranks (srun -n 2, torchrun --nproc_per_node 2): every rank builds the same seeded model
(logit scale 1, see tests/numerics.py), takes its rows [rank*B, (rank+1)*B) of each step's seeded batch of
world*B pairs and computes the Matryoshka loss on gathered features (gather-with-grad, local loss) when there are
several ranks. The step is the trainer's own (mrl_clip.train.loop.train_step through its DeepSpeedEngine): with
--accum A the rank's B rows are A loader batches accumulated open_clip's way (features of every batch cached
without grad, then one pass per batch with the whole step's loss, logit_scale's gradient from one pass, no 1/A
scaling). Rank 0 saves, per step, the fp32 weights the step started from and DeepSpeed's full (rank-averaged)
gradient at the accumulation boundary; then the engine takes the SGD step (and clamps logit_scale to [0, ln 100],
as the trainer does)."""
import argparse

import torch
import torch.distributed as dist
from open_clip_train.distributed import init_distributed_device_so

from mrl_clip import models
from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train import deepspeed_engine as ds_engine
from mrl_clip.train.engine import LOGIT_SCALE_MAX
from mrl_clip.train.loop import train_step

DIMS = [8, 32, 256]
BATCH = 8  # per rank


def seeded_batch(n, step=0):
    g = torch.Generator().manual_seed(1 + step)
    return torch.randn(n, 3, 28, 28, generator=g), torch.randint(1, 1000, (n, 16), generator=g)


def seeded_model():
    torch.manual_seed(0)
    model = models.create("MRL-Tiny-28")[0]
    ds_engine.vector_logit_scale(model)
    with torch.no_grad():
        model.logit_scale.zero_()
    return model


def recording_engine(engine):
    """mrl_clip's DeepSpeedEngine, reading DeepSpeed's full (rank-averaged) gradient at the accumulation boundary,
    just before its optimizer step: everything else is the trainer's own step (loop.train_step)."""
    from deepspeed.utils import safe_get_full_grad

    class Recording(ds_engine.DeepSpeedEngine):
        def step(self):
            self.grads = {n: safe_get_full_grad(p).detach().clone() for n, p in self.engine.module.named_parameters()}
            return super().step()

    return Recording(engine, "MRL-Tiny-28")


def check(run, label):
    """What the maths guarantees about a probe's output, for any ZeRO stage, ranks and accumulation: it starts from
    the seeded weights; each step's gradient is within tests/numerics.py's float32 bound of the float64 gradient of
    one process on the joined batch, at the weights the engine reports for that step (the plain float32 loop is
    held to the same bound); each step moves the weights by -lr times that gradient, to gamma_2 (two roundings).
    Returns the worst ratio error / bound over the steps."""
    from tests import numerics

    model, world = seeded_model(), run["world_size"]
    for name, param in model.named_parameters():
        assert torch.equal(run["steps"][0]["weights"][name], param.detach()), name
    loss_fn = MatryoshkaClipLoss(DIMS)
    worst = 0.0
    for step, record in enumerate(run["steps"]):
        model.load_state_dict(record["weights"])
        batch = seeded_batch(run["batch"] * world, step)
        grads, tolerances, _ = numerics.reference(model, batch, loss_fn, DIMS, loss_fn.weights, ranks=world,
                                                  micro_batches=run["accum"])
        worst = max(worst, numerics.assert_gradients_within(record["grads"], grads, tolerances, f"{label} {step}"))
        model.zero_grad()
        loss_fn(*model(*batch))[0].backward()
        plain = {name: param.grad for name, param in model.named_parameters()}
        numerics.assert_gradients_within(plain, grads, tolerances, f"plain loop, step {step}")
        after = run["steps"][step + 1]["weights"] if step + 1 < len(run["steps"]) else run["final"]
        for name, before in record["weights"].items():
            grad = record["grads"][name]
            expected = before.double() - run["lr"] * grad.double()
            if name == "logit_scale":  # the trainer's clamp after every step
                expected = expected.clamp(0, LOGIT_SCALE_MAX)
            error = (after[name].double() - expected).abs()
            assert (error <= numerics.update_tolerance(before, grad, run["lr"])).all(), (label, step, name)
    return worst


def main(argv=None):
    from deepspeed.utils import safe_get_full_fp32_param

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--lr", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    init_distributed_device_so(device="cpu")
    ds_engine.ensure_process_group(torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = seeded_model()
    config = {"train_micro_batch_size_per_gpu": args.batch // args.accum, "gradient_accumulation_steps": args.accum,
              "train_batch_size": args.batch * world, "zero_optimization": {"stage": args.stage},
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    ds, _ = ds_engine.initialize(model, torch.optim.SGD(model.parameters(), lr=args.lr), config)
    engine = recording_engine(ds)
    loss_fn = MatryoshkaClipLoss(DIMS, local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world)
    steps = []
    for step in range(args.steps):
        weights = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in ds.module.named_parameters()}
        images, texts = seeded_batch(args.batch * world, step)
        rows = slice(rank * args.batch, (rank + 1) * args.batch)
        batches = list(zip(images[rows].chunk(args.accum), texts[rows].chunk(args.accum)))
        assert not train_step(engine, loss_fn, batches).skipped
        steps.append({"weights": weights, "grads": engine.grads})
    final = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in ds.module.named_parameters()}
    if rank == 0:
        torch.save({"world_size": world, "batch": args.batch, "accum": args.accum, "lr": args.lr, "steps": steps,
                    "final": final}, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
