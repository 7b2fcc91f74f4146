"""The DeepSpeed engine path of mrl_clip.train on the CPU (one process, gloo): the same training as the plain
loop, its checkpoints and their conversion, pre-emption and resume, and the config mistakes users make."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, TINY, TINY_DIMS, run_module

STEPS = 4


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


def zero_config(tmp_path, stage):
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return path


@pytest.fixture(scope="module")
def plain_run(fmnist_data, tmp_path_factory):
    """The plain loop's run for each --accum-freq, made once and shared by the stages compared with it."""
    logs, runs = tmp_path_factory.mktemp("plain"), {}

    def get(accum_freq):
        if accum_freq not in runs:
            runs[accum_freq] = train(fmnist_data, logs, f"plain{accum_freq}", "--accum-freq", str(accum_freq))
        return runs[accum_freq]
    return get


@pytest.mark.parametrize("stage,accum_freq", [(2, 1), pytest.param(3, 1, marks=pytest.mark.slow),
                                              pytest.param(1, 2, marks=pytest.mark.slow)])
def test_zero_engine_trains_exactly_like_the_plain_loop(fmnist_data, plain_run, tmp_path, stage, accum_freq):
    """fp32 ZeRO on one rank changes where optimizer state lives, not the maths: same losses at every step and
    the same weights after 4 AdamW steps (to float32 rounding), with open_clip-style accumulation too."""
    plain = plain_run(accum_freq)
    engine = train(fmnist_data, tmp_path, "ds", "--accum-freq", str(accum_freq),
                   "--deepspeed", zero_config(tmp_path, stage))
    assert losses(engine) == pytest.approx(losses(plain), rel=1e-5)
    plain_weights, engine_weights = weights(plain), weights(engine)
    assert engine_weights.keys() == plain_weights.keys()
    assert engine_weights["logit_scale"].shape == torch.Size([])  # open_clip's layout, not the engine's
    for name, value in plain_weights.items():
        got = engine_weights[name]
        if name.endswith("attn.in_proj_bias"):
            # the key bias's gradient is zero in exact arithmetic (softmax ignores a per-query constant), so
            # AdamW turns rounding noise (~1e-10, summed in another order) into lr-sized steps: compare q and v
            width = value.shape[0] // 3
            keep = torch.cat([torch.arange(width), torch.arange(2 * width, 3 * width)])
            assert value[width:2 * width].abs().max() < 1e-3 and got[width:2 * width].abs().max() < 1e-3
            got, value = got[keep], value[keep]
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def ds_run(fmnist_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ds")
    return train(fmnist_data, logs, "ds", "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json")


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
        result = run_module("mrl_clip.convert_deepspeed", ds_dir, "--tag", tag, "--out", tmp_path / tag)
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
