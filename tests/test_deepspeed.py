"""The DeepSpeed engine path of mrl_clip.train on the CPU (one process, gloo): the same gradients and SGD steps as the
plain maths, the same first loss through the CLI, its checkpoints and their conversion, pre-emption and resume, and
the config mistakes users make."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from mrl_clip.loss import MatryoshkaClipLoss
from tests import ds_grad_probe, numerics
from tests.conftest import ROOT, TINY, TINY_DIMS, run_module
from tests.ds_grad_probe import seeded_batch, seeded_model

STEPS = 4
PROBE_BATCH = 16


def train(fmnist_data, logs, name, *extra, steps=STEPS):
    result = run_module("mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"],
                        "--dims", ",".join(map(str, TINY_DIMS)), "--batch-size", "32", "--max-steps", steps,
                        "--lr", "1e-3", "--warmup", "2", "--workers", "0", "--threads", "1", "--logs", logs,
                        "--name", name, "--log-every-n-steps", "1", "--save-every-n-steps", "2", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return logs / name


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def weights(run_dir, step=STEPS):
    return torch.load(run_dir / "checkpoints" / f"step_{step}.pt", weights_only=True)["state_dict"]


LR = 0.1  # the SGD step moves weights by up to ~1e-2: a gradient taken at stale weights is far outside the bound


def zero_config(tmp_path, stage):
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return path


def probe(tmp_path, *args, ranks=1):
    """Two SGD steps of tests/ds_grad_probe.py in processes of their own (ZeRO-3 patches torch process-wide)."""
    out = tmp_path / "probe.pt"
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    result = subprocess.run([*launch, str(ROOT / "tests" / "ds_grad_probe.py"), str(out), "--steps", "2",
                             "--lr", str(LR), *map(str, args)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage,accum", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow),
                                         pytest.param(3, 1, marks=pytest.mark.slow),
                                         pytest.param(3, 2, marks=pytest.mark.slow)])
def test_zero_engine_gradients_and_sgd_steps_are_the_plain_maths(tmp_path, stage, accum):
    """fp32 ZeRO-1/2/3 on one rank changes where gradients and optimizer state live, not the maths. Two SGD steps of
    MRL-Tiny-28 through the engine (tests/ds_grad_probe.py; with accum 2, open_clip's cached-feature accumulation):
    each step's gradient, read from the engine, is the float64 gradient of the plain loss at the weights the engine
    reports for that step, and each step moves the weights by exactly -lr times that gradient.

    Tolerance (tests/numerics.py): per element, LAMBDA u sqrt(N) kappa U_ij. IEEE 754 fixes the size of every
    rounding (u = 2^-24); AVX-512 vs AVX2, the BLAS kernel, blocking, FMA and threads only reorder the sums, i.e.
    change which roundings happen, not their size or number, so a bound built from the count N of rounded terms
    (the final accumulation's n rows plus every forward/backward accumulation) and from the float64 magnitudes of
    the terms holds for any order: U_ij = sum_k |dY_ki| ||X_k|| + ||dY_k|| |X_kj| over the rows of the final
    accumulation g = dY^T X, kappa = 1 + 4 exp(logit_scale) the loss's conditioning, and LAMBDA = 9 the
    Azuma-Hoeffding factor of the probabilistic rounding analysis (Higham & Mary 2019, Ipsen & Zhou 2020): a chance
    excess has probability < 1e-11 over all elements. The plain float32 loop is held to the same bound (it uses
    ~1-3% of it here); a missing 1/accum, the other micro-batch's gradient or stale weights exceed it ~1000x.
    The update is two roundings: |w1 - (w0 - lr g)| <= gamma_2 (|w0| + lr |g|) (Higham's worst case)."""
    run = probe(tmp_path, "--stage", stage, "--accum", accum, "--batch", PROBE_BATCH)
    ds_grad_probe.check(run, f"ZeRO-{stage} step")


@pytest.mark.slow
def test_two_ranks_zero2_gradients_are_one_rank_on_the_joined_batch(tmp_path):
    """torchrun, two gloo ranks, ZeRO-2, gather-with-grad + local loss, B rows each: the engine's rank-averaged
    gradient is that of one process on the joined 2B batch, within the same bound (its N counts the gathered
    features' and the all-reduce's terms); also run by srun in tests/test_slurm.py."""
    run = probe(tmp_path, ranks=2)
    assert run["world_size"] == 2
    ds_grad_probe.check(run, "two ranks, ZeRO-2, step")


@pytest.fixture(scope="module")
def ds_run(fmnist_data, tmp_path_factory):
    """ZeRO-2 through the real CLI, --accum-freq 2: steps of two loader batches of 32."""
    logs = tmp_path_factory.mktemp("ds")
    return train(fmnist_data, logs, "ds", "--accum-freq", "2", "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json")


@pytest.fixture(scope="module")
def plain_first_step(fmnist_data, tmp_path_factory):
    return train(fmnist_data, tmp_path_factory.mktemp("plain"), "plain", "--accum-freq", "2", steps=2)


def first_loss_tolerance(batch):
    """Both runs evaluate the same float32 forward of the same seeded weights on the same first batch. The loss's
    own chain is bounded in the worst case (numerics.loss_tolerance); the features it starts from carry the
    rounding of the towers, LAMBDA u sqrt(N) of their rows' scale by the rounding model of tests/numerics.py, N
    counted on MRL-Tiny-28 at this batch size. Twice: two evaluations."""
    model = seeded_model()
    loss_fn = MatryoshkaClipLoss(TINY_DIMS)
    _, _, info = numerics.reference(model, seeded_batch(batch), loss_fn, TINY_DIMS, loss_fn.weights)
    feature_error = numerics.LAMBDA * numerics.U32 * info["events"] ** 0.5
    return 2 * numerics.loss_tolerance(1 / 0.07, TINY_DIMS, loss_fn.weights, batch, feature_error=feature_error)


def test_zero_engine_cli_takes_the_plain_loops_first_step(ds_run, plain_first_step):
    """The real CLI with --deepspeed and --accum-freq 2: the first step's loss (computed before any update, from
    the same seeded initial weights on the same 2 x 32 samples) equals the plain loop's to float32 rounding; every
    step is DeepSpeed's accumulation of two micro-batches of one loader batch each (4 optimizer steps, 8 batches,
    256 samples read)."""
    engine_losses, plain_losses = losses(ds_run), losses(plain_first_step)
    assert len(engine_losses) == STEPS and len(plain_losses) == 2
    assert abs(engine_losses[0] - plain_losses[0]) <= first_loss_tolerance(64)
    state = torch.load(ds_run / "checkpoints" / "deepspeed" / f"step_{STEPS}" / "mp_rank_00_model_states.pt",
                       weights_only=False)
    assert state["global_steps"] == STEPS and state["data"][0]["batches"] == 2 * STEPS
    assert state["data"][0]["consumed"] == {0: 2 * STEPS * 32}


def test_validation_under_zero2_leaves_the_weights_bitwise(ds_run, fmnist_data, tmp_path):
    """ds_run again with --val-data (retrieval, every 2 steps, on rank 0 through the engine's module): the same
    final weights to the bit."""
    validated = train(fmnist_data, tmp_path, "ds", "--accum-freq", "2", "--deepspeed",
                      ROOT / "configs" / "ds_zero2_fp32.json", "--val-data", fmnist_data["captions"],
                      "--val-every-n-steps", "2")
    records = [json.loads(line) for line in (validated / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_dim" in r] == [2, STEPS]
    for name, value in weights(ds_run).items():
        assert torch.equal(weights(validated)[name], value), name


def test_deepspeed_run_writes_open_clip_checkpoints_and_converts(ds_run, tmp_path):
    """DeepSpeed keeps its own checkpoints at every save; the run's last step is also rebuilt as an open_clip
    checkpoint and export. convert_deepspeed rebuilds any kept step the same way."""
    import open_clip

    ds_dir = ds_run / "checkpoints" / "deepspeed"
    assert (ds_dir / "latest").read_text() == f"step_{STEPS}"
    assert (ds_dir / "step_2").is_dir()
    assert sorted(p.name for p in (ds_run / "checkpoints").glob("step_*.pt")) == [f"step_{STEPS}.pt"]
    written = weights(ds_run, STEPS)
    for tag in ("step_2", f"step_{STEPS}"):
        result = run_module("mrl_clip", "convert-deepspeed", ds_dir, "--tag", tag, "--out", tmp_path / tag)
        assert result.returncode == 0, result.stderr[-2000:]
    converted = torch.load(tmp_path / f"step_{STEPS}" / f"step_{STEPS}.pt", weights_only=True)
    assert converted["step"] == STEPS and converted["model"] == TINY and converted["dims"] == TINY_DIMS
    for name, value in written.items():
        assert torch.equal(converted["state_dict"][name], value), name
    earlier = torch.load(tmp_path / "step_2" / "step_2.pt", weights_only=True)
    assert earlier["step"] == 2 and not torch.equal(earlier["state_dict"]["text_projection"],
                                                    written["text_projection"])
    exported = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / f'step_{STEPS}' / 'export'}")[0]
    for name, value in exported.state_dict().items():
        if name in written:
            assert torch.equal(value, written[name]), name


def test_usr1_checkpoints_and_exits_then_resume_finishes(fmnist_data, tmp_path):
    """SIGUSR1 (SLURM's pre-emption warning): checkpoint at the current step, exit 75; --resume latest goes on
    from that step to the planned one."""
    cmd = [sys.executable, "-m", "mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"],
           "--dims", ",".join(map(str, TINY_DIMS)), "--batch-size", "32", "--max-steps", "12", "--workers", "0",
           "--threads", "1", "--logs", tmp_path, "--name", "run", "--log-every-n-steps", "1",
           "--save-every-n-steps", "100", "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json",
           "--resume", "latest"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    trainer = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert trainer.poll() is None and time.time() < deadline, trainer.stderr.read()[-2000:]
        time.sleep(0.2)
    trainer.send_signal(signal.SIGUSR1)
    _, stderr = trainer.communicate(timeout=300)
    assert trainer.returncode == 75, stderr[-2000:]
    stopped_at = int(stderr.split("pre-empted: checkpoint at step ")[1].split()[0])
    assert 3 <= stopped_at < 12
    assert (tmp_path / "run" / "checkpoints" / "deepspeed" / "latest").read_text() == f"step_{stopped_at}"

    resumed = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {stopped_at}" in resumed.stderr
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("config_text,extra,message", [
    ("{not json", [], "is not valid JSON"),
    ('{"optimizer": {"type": "Adam"}}', [], "leave 'optimizer' and 'scheduler' out"),
    ('{"bf16": {"enabled": true}}', [], "set zero_optimization.stage to 1, 2 or 3"),
    ('{"zero_optimization": {"stage": 2}}', ["--precision", "amp_bf16"], "precision is set in the DeepSpeed config"),
    ('{"zero_optimization": {"stage": 2}}', ["--resume", "nowhere/step_3"], "DeepSpeed checkpoint folder"),
])
def test_bad_deepspeed_input_is_one_line(fmnist_data, tmp_path, capsys, config_text, extra, message):
    """In-process (the same run_cli the module's __main__ uses): all of these stop before any engine exists."""
    from mrl_clip.errors import run_cli
    from mrl_clip.train.main import main

    config = tmp_path / "ds.json"
    config.write_text(config_text)
    argv = ["--model", TINY, "--train-data", fmnist_data["train"], "--dims", "8,256", "--logs", str(tmp_path),
            "--deepspeed", str(config), *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: ") and message in stderr[0], stderr
    assert not torch.distributed.is_initialized()
