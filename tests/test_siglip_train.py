"""mrl_clip.train --siglip: the model as open_clip_train's --siglip creates it, the logit_bias through --accum-freq,
both engines (plain and DeepSpeed ZeRO-2 on the CPU) from the real CLI, what is logged, and checkpoints and exports
that plain open_clip loads with their bias."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mrl_clip.loss import MatryoshkaSigLipLoss
from mrl_clip.train.loop import train_step
from mrl_clip.train.plain_engine import PlainEngine
from tests import first_step, numerics
from tests.conftest import ROOT, TINY, TINY_DIMS
from tests.test_deepspeed import STEPS, train
from tests.test_distributed_siglip import DIMS, WEIGHTS, SigLipTowers


@pytest.fixture(scope="module")
def plain_run(fmnist_data, tmp_path_factory):
    """The plain loop through the real CLI, --siglip and --accum-freq 2: steps of two loader batches of 32."""
    return train(fmnist_data, tmp_path_factory.mktemp("siglip"), "plain", "--siglip", "--accum-freq", "2")


@pytest.fixture(scope="module")
def ds_run(fmnist_data, tmp_path_factory):
    """The same through a DeepSpeed ZeRO-2 engine."""
    return train(fmnist_data, tmp_path_factory.mktemp("siglip_ds"), "ds", "--siglip", "--accum-freq", "2",
                 "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json")


def test_accumulated_micro_batches_give_the_joined_batch_gradient_bias_included():
    """--accum-freq 4 with the SigLIP loss: the gradient (logit_scale's and logit_bias's counted once) is that of
    one batch of all 16 pairs, within the float32 rounding bound of its float64 value."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 10, generator=g), torch.randn(16, 12, generator=g)
    model = SigLipTowers()
    engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler(enabled=False))
    train_step(engine, MatryoshkaSigLipLoss(DIMS, WEIGHTS), [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)])
    grads, tolerances, _ = numerics.reference(SigLipTowers(), (x, y), MatryoshkaSigLipLoss(DIMS, WEIGHTS), DIMS,
                                              WEIGHTS, micro_batches=4, sigmoid=True)
    numerics.assert_gradients_within({n: p.grad for n, p in model.named_parameters()}, grads, tolerances)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_both_engines_start_from_open_clip_trains_siglip_init_and_log_open_clips_first_loss(plain_run, ds_run,
                                                                                            fmnist_data):
    """open_clip_train's --siglip creates the model with logit_scale log(10) and logit_bias -10: the first step's
    loss uses exactly those (before any update) and logs both; its loss and every dim's are, for both engines,
    open_clip's SigLipLoss on each re-normalised prefix of the seeded initial model's features of the run's first
    2 x 32 samples, within the float32 bound (tests/first_step.py)."""
    features = first_step.first_step(TINY, fmnist_data["train"], 2048, 32, accum_freq=2, siglip=True)
    error = first_step.feature_error(TINY, 64, TINY_DIMS, siglip=True)
    for run_dir in (plain_run, ds_run):
        logged = records(run_dir)
        assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
        first = logged[0]
        assert abs(first["logit_scale"] - 10.0) <= 10.0 * numerics.gamma(2)  # exp of float32(log 10)
        assert first["logit_bias"] == -10.0
        assert all("logit_bias" in r for r in logged)
        first_step.assert_first_record_is_open_clips_loss(first, features, TINY_DIMS, [1.0] * len(TINY_DIMS), error)


def test_checkpoints_and_exports_load_in_plain_open_clip_with_their_bias(plain_run, ds_run, tmp_path):
    """Both engines' open_clip checkpoints hold a 0-dim logit_bias (the engine trains it as [1]) and say --siglip;
    their local-dir exports build it in plain open_clip (no mrl_clip imported), with the checkpoint's value."""
    runs = {"plain": plain_run, "ds": ds_run}
    script = ("import sys, json, open_clip\n"
              "out = {}\n"
              f"for name, folder in {json.dumps({k: str(v / 'export') for k, v in runs.items()})}.items():\n"
              "    model = open_clip.create_model_and_transforms('local-dir:' + folder)[0]\n"
              "    out[name] = [model.logit_bias.item(), model.logit_scale.item(), list(model.logit_bias.shape)]\n"
              "assert 'mrl_clip' not in sys.modules\n"
              "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = json.loads(proc.stdout)
    for name, run_dir in runs.items():
        checkpoint = torch.load(run_dir / "checkpoints" / f"step_{STEPS}.pt", weights_only=True)
        state = checkpoint["state_dict"]
        assert checkpoint["siglip"] is True and state["logit_bias"].shape == ()
        assert exported[name] == [state["logit_bias"].item(), state["logit_scale"].item(), []], name
        assert state["logit_bias"].item() != -10.0  # trained
        config = json.loads((run_dir / "export" / "open_clip_config.json").read_text())["model_cfg"]
        assert config["init_logit_bias"] == -10.0 and np.isclose(config["init_logit_scale"], np.log(10))


def test_resume_from_a_saved_step_ends_bitwise_equal_to_the_unbroken_run(plain_run, fmnist_data, tmp_path):
    """The real CLI, --siglip: resumed from the unbroken run's step_2.pt, the run's step 4 (weights, logit_bias,
    Adam's state, RNG and stream position) and its logged losses are the unbroken run's, to the bit."""
    from tests.test_reliability import assert_same_training_state

    resumed = train(fmnist_data, tmp_path, "resumed", "--siglip", "--accum-freq", "2", "--resume",
                    plain_run / "checkpoints" / "step_2.pt")
    assert [r["step"] for r in records(resumed)] == [3, 4]
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in records(plain_run)][2:]
    final = [torch.load(run / "checkpoints" / f"step_{STEPS}.pt", weights_only=True) for run in (plain_run, resumed)]
    assert_same_training_state(*final)


RANKS, BATCH = 2, 8  # per rank: two micro-batches of 4


def rank_main(rank, port, out_dir):
    """One trainer step (loop.train_step through a DDP PlainEngine, --accum-freq 2) on this rank's rows."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(1)
    model = SigLipTowers()
    engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler(enabled=False),
                         rank=rank, world_size=RANKS)
    engine.distribute(torch.device("cpu"))
    x, y = joined_batch()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    micro = [(x[rows][i:i + BATCH // 2], y[rows][i:i + BATCH // 2]) for i in (0, BATCH // 2)]
    result = train_step(engine, MatryoshkaSigLipLoss(DIMS, WEIGHTS, rank=rank, world_size=RANKS), micro)
    torch.save({"loss": result.loss, "skipped": result.skipped,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def joined_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(RANKS * BATCH, 10, generator=g), torch.randn(RANKS * BATCH, 12, generator=g)


def test_two_gloo_ranks_step_with_the_joined_batchs_gradient(tmp_path):
    """--siglip on two gloo ranks through the trainer's step (DDP, accumulation of two micro-batches, the text
    features exchanged between ranks): DDP's averaged gradient, logit_scale's and logit_bias's included, is the
    float64 gradient of one process on the joined 16 pairs within the float32 bound of tests/numerics.py (N
    counting the ranks' and micro-batches' terms); the ranks' mean loss is its loss within siglip_loss_tolerance
    (each rank's own float32 total, and the float64 reference's rounding)."""
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    mp.spawn(rank_main, args=(free_port(), str(tmp_path)), nprocs=RANKS, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]
    x, y = joined_batch()
    loss_fn = MatryoshkaSigLipLoss(DIMS, WEIGHTS)
    grads, tolerances, info = numerics.reference(SigLipTowers(), (x, y), loss_fn, DIMS, WEIGHTS, ranks=RANKS,
                                                 micro_batches=2, sigmoid=True)
    for got in ranks:
        assert not got["skipped"]
        numerics.assert_gradients_within(got["grads"], grads, tolerances, "DDP rank")
    exact = float(loss_fn(*SigLipTowers().double()(x.double(), y.double()))[0])
    tolerance = (numerics.siglip_loss_tolerance(info["logit_scale"], info["logit_bias"], DIMS, WEIGHTS, BATCH,
                                                texts=RANKS * BATCH) +
                 numerics.siglip_loss_tolerance(info["logit_scale"], info["logit_bias"], DIMS, WEIGHTS,
                                                RANKS * BATCH, u=numerics.U64))
    mean_loss = sum(got["loss"] for got in ranks) / RANKS
    assert abs(mean_loss - exact) <= tolerance, (mean_loss, exact, tolerance)
