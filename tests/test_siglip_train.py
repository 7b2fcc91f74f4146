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
