"""The DeepSpeed engine's part of a step (fp32, one gloo rank on the CPU): non-finite gradients skipped by ZeRO's
optimizers, and a guard that names the checkpoint --resume takes. (Accumulation: tests/test_deepspeed.py.)"""
import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch

from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train.loop import train_step
from mrl_clip.train.plain_engine import PlainEngine

from .conftest import ROOT, TINY, TINY_DIMS, run_module

ZERO2 = ROOT / "configs" / "ds_zero2_fp32.json"


def deepspeed_cli(fmnist_data, logs, name, *extra):
    return run_module("mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"],
                      "--dims", ",".join(map(str, TINY_DIMS)), "--workers", "0", "--threads", "1", "--logs", logs,
                      "--name", name, "--log-every-n-steps", "1", "--deepspeed", ZERO2, *extra)


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-1 runs the same optimizer code as ZeRO-2
def test_a_non_finite_gradient_is_skipped_by_zero_2_and_3(stage):
    """A NaN gradient with a finite loss: ZeRO's optimizer finds it in the gradient norm, skips the update on
    every rank (fp32 masters unchanged) and the trainer counts the step as skipped; the next step updates every
    weight."""
    probe = subprocess.run([sys.executable, str(ROOT / "tests" / "ds_nonfinite_probe.py"), str(stage)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.split("RESULT ", 1)[1])
    assert result["loss_finite"] and result["skipped"] == [True, False], result
    assert result["unchanged_after_skip"] and result["finite"], result
    assert result["changed_by_next_step"] == result["parameters"], result
    assert result["is_engine"]  # a real DeepSpeedEngine satisfies the trainer's Engine protocol


def test_a_non_finite_gradient_is_skipped_by_the_plain_engine():
    model = open_clip.create_model(TINY)
    engine = PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.amp.GradScaler(enabled=False))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 28, 28, generator=g), torch.randint(1, 1000, (8, 16), generator=g))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    poison = model.visual.conv1.weight.register_hook(lambda grad: grad * float("nan"))
    result = train_step(engine, MatryoshkaClipLoss([8, 256]), [batch])
    poison.remove()
    assert result.skipped and result.loss == result.loss
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not engine.optimizer.state  # AdamW never saw the step


def test_deepspeed_guard_names_the_checkpoint_resume_takes(fmnist_data, tmp_path):
    """--lr 1e30: step 1 is finite and throws the weights to ~1e30, every later loss is not finite. The guard's
    message names DeepSpeed's checkpoint folder of step 1 (what --resume takes with --deepspeed), not a step_N.pt
    (which --resume refuses for a DeepSpeed run)."""
    result = deepspeed_cli(fmnist_data, tmp_path, "nan", "--batch-size", "32", "--lr", "1e30", "--warmup", "1",
                           "--max-nonfinite-steps", "3", "--save-every-n-steps", "1", "--max-steps", "20")
    assert result.returncode == 3, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    folder = tmp_path / "nan" / "checkpoints" / "deepspeed" / "step_1"
    assert len(error) == 1 and f"last checkpoint {folder} is intact" in error[0], error
    assert folder.is_dir() and not list((tmp_path / "nan" / "checkpoints").glob("step_*.pt"))
