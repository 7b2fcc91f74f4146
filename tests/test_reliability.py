"""Faults injected for real: kill -9 of a trainer and of a process inside a save, broken shards, a loss that
turns non-finite, a checkpoint carrying a pickled payload."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import open_clip
import torch
from PIL import Image

from mrl_clip.checkpoint import (
    latest_checkpoint,
    load_checkpoint_file,
    newest_loadable_checkpoint,
    step_checkpoints,
)
from mrl_clip.eval.probe import cache_path, cached_features
from pipelines.shards import png_bytes, write_shards

from .conftest import ROOT, TINY, run_module

TRAIN = ["mrl_clip.train", "--model", TINY, "--dims", "32,256", "--batch-size", "32", "--warmup", "2",
         "--threads", "1", "--log-every-n-steps", "1"]


def log_records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def start_module(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_at_step(proc, log_path, step, timeout=300):
    """SIGKILL the trainer as soon as log.jsonl shows `step` done (it may have gone a step or two further)."""
    def steps_done():
        done = 0
        for line in log_path.read_text().splitlines() if log_path.is_file() else []:
            try:
                done = max(done, json.loads(line).get("step", 0))
            except json.JSONDecodeError:  # a line being written
                pass
        return done

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and steps_done() < step:
        time.sleep(0.02)
    assert proc.poll() is None, f"the trainer ended before step {step}: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def assert_same_tree(a, b, where=""):
    """Equal to the bit, all the way down: the same keys (dicts), lengths (lists, tuples), tensors (dtype, shape
    and every element), objects' attributes and plain values."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(map(str, set(a) ^ set(b))))
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), (where, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # an object pickled whole (DeepSpeed's)
        assert_same_tree(vars(a), vars(b), f"{where}.{type(a).__name__}")
    else:
        assert a == b, (where, a, b)


# what two runs of the same training may differ in: the run's name, and the last step a run with --val-data
# validated (None without it)
RUN_LABELS = ("name", "validated_step")


def assert_same_training_state(a, b, context=""):
    """Two plain-engine checkpoints hold the same training state: weights, the optimizer's whole state dict (every
    parameter's state and the param groups), the RNG states, the stream positions, the step and everything else
    saved, to the bit; only RUN_LABELS may differ."""
    assert a["optimizer"]["state"] and a["state_dict"], context  # a checkpoint of a run that trained
    assert_same_tree({k: v for k, v in a.items() if k not in RUN_LABELS},
                     {k: v for k, v in b.items() if k not in RUN_LABELS}, context)


def replay_seed() -> int:
    """MRL_CLIP_TEST_SEED if set (to replay a failure), else a fresh one: a test prints the seed it used."""
    return int(os.environ.get("MRL_CLIP_TEST_SEED") or random.SystemRandom().randrange(2 ** 32))


def test_kill_9_then_resume_latest_ends_bitwise_equal_to_an_unbroken_run(fmnist_data, tmp_path):
    """Epoch mode (resampled mode resumes by the same stream position: tests/test_data.py checks it)."""
    # 2 epochs of 10 steps, 2 workers, a checkpoint every 3 steps: the kill lands mid-epoch, and the last
    # checkpoint is usually at a step that is not a multiple of the workers
    steps_per_epoch, total = 10, 20
    common = TRAIN + ["--train-data", fmnist_data["train"], "--train-num-samples", str(32 * steps_per_epoch),
                      "--epochs", "2", "--workers", "2", "--save-every-n-steps", "3", "--logs", tmp_path]
    seed = replay_seed()
    kill_step = random.Random(seed).randint(4, total - 3)
    # the seed fixes the step the kill waits for; it may land a step or two later (the trainer runs on meanwhile)
    replay = f"kill at step {kill_step}; replay with MRL_CLIP_TEST_SEED={seed}"
    print(replay)
    unbroken = run_module(*common, "--name", "unbroken")
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]

    proc = start_module(*common, "--name", "killed")
    kill_at_step(proc, tmp_path / "killed" / "log.jsonl", kill_step)
    assert not (tmp_path / "killed" / "checkpoints" / f"step_{total}.pt").exists(), replay
    resumed_from = latest_checkpoint(tmp_path / "killed" / "checkpoints")
    replay += f", resumed from {resumed_from.name}"
    resumed = run_module(*common, "--name", "killed", "--resume", "latest")
    assert resumed.returncode == 0, (replay, resumed.stderr[-2000:])
    assert f"resumed at step {resumed_from.stem.split('_')[1]}" in resumed.stderr, (replay, resumed.stderr[-2000:])

    a = torch.load(tmp_path / "unbroken" / "checkpoints" / f"step_{total}.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / f"step_{total}.pt", weights_only=True)
    assert_same_training_state(a, b, replay)
    # the per-step losses after the resume are the unbroken run's, to the bit
    after = int(resumed_from.stem.split("_")[1])
    unbroken_loss = {r["step"]: r["loss"] for r in log_records(tmp_path / "unbroken")}
    resumed_loss = {r["step"]: r["loss"] for r in log_records(tmp_path / "killed")[-(total - after):]}
    assert resumed_loss == {s: unbroken_loss[s] for s in range(after + 1, total + 1)}, replay


KILL_DURING_SAVES = """
import json, os, random, signal, sys, time
import torch
from mrl_clip.checkpoint import load_checkpoint_file, prune_checkpoints, step_checkpoints
from mrl_clip.files import atomic_torch_save, remove_partial_files

folder, cycles = sys.argv[1], int(sys.argv[2])
state = {"state_dict": {"w": torch.randn(8 * 2**20)}, "step": 0}  # 32 MiB
rng = random.Random()
atomic_torch_save(state, os.path.join(folder, "step_0.pt"))  # the run has a checkpoint: no kill may lose it
for cycle in range(cycles):
    found = step_checkpoints(folder)
    step = found[-1][0] if found else 0
    child = os.fork()
    if child == 0:  # a saver as the trainer does it: save step N, prune to the last 2, forever
        while True:
            step += 1
            state["step"] = step
            atomic_torch_save(state, os.path.join(folder, f"step_{step}.pt"))
            prune_checkpoints(folder, 2)
    time.sleep(rng.uniform(0.05, 0.8))
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    partial = [p.name for p in remove_partial_files(folder)]
    found = step_checkpoints(folder)
    loaded = {str(s): load_checkpoint_file(p)["step"] for s, p in found}  # raises if any file is not whole
    print(json.dumps({"partial": partial, "loaded": loaded}), flush=True)
"""


def test_kill_9_during_saves_never_leaves_a_partial_latest(tmp_path):
    """A process saving 32 MiB checkpoints in a loop is kill -9ed at random moments, 8 times over: after each
    kill every step file loads whole, and `latest` is the newest of them. At least one kill must land inside a
    write (its temporary file is found), else the test proved nothing."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVES, folder, "8"], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cycles = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(cycles) == 8
    for cycle in cycles:
        assert cycle["loaded"] and all(int(s) == step for s, step in cycle["loaded"].items()), cycle
        assert len(cycle["loaded"]) <= 3, cycle  # the kill may fall between a save and its prune
        assert all(name.startswith(".step_") and name.endswith(".tmp") for name in cycle["partial"]), cycle
    assert any(cycle["partial"] for cycle in cycles), cycles
    found = step_checkpoints(folder)
    assert newest_loadable_checkpoint(folder)[0] == latest_checkpoint(folder) == found[-1][1]
    assert found[-1][0] == max(int(s) for s in cycles[-1]["loaded"])


def test_latest_passes_over_a_damaged_newest_file(tmp_path, capsys):
    for step in (1, 2):
        torch.save({"state_dict": {"w": torch.ones(1000)}, "step": step}, tmp_path / f"step_{step}.pt")
    with open(tmp_path / "step_2.pt", "r+b") as f:  # a disk fault: atomic saves never leave this
        f.truncate(500)
    path, checkpoint = newest_loadable_checkpoint(tmp_path)
    assert path == tmp_path / "step_1.pt" and checkpoint["step"] == 1
    assert "passing over" in capsys.readouterr().err


def broken_shards(folder, corrupt_every=None):
    """4 shards x 40 pairs. Unless `corrupt_every`: one corrupt png (shard 0), one empty caption (shard 1),
    shard 2 truncated mid-file; with it: every n-th image corrupt."""
    def samples():
        for i in range(160):
            png = png_bytes(Image.new("L", (28, 28), color=i % 250))
            caption = f"a grey square number {i}"
            if corrupt_every and i % corrupt_every == 0 or corrupt_every is None and i == 5:
                png = b"\x89PNG not really"
            if corrupt_every is None and i == 45:
                caption = "  "
            yield {"__key__": f"s{i:04d}", "png": png, "txt": caption}

    write_shards(samples(), folder, "train", shard_size=40)
    if corrupt_every is None:
        shard = folder / "train-0002.tar"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 123])


def test_bad_data_is_skipped_counted_and_named(tmp_path):
    data = tmp_path / "data"
    broken_shards(data)
    # train-0004.tar is listed but missing: 1 of 5 shards, within --max-bad-fraction 0.25
    result = run_module(*TRAIN, "--train-data", data / "train-{0000..0004}.tar", "--train-num-samples", "128",
                        "--workers", "1", "--epochs", "1", "--max-bad-fraction", "0.25", "--logs", tmp_path,
                        "--name", "bad", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 5 shards missing" in result.stderr and "train-0004.tar" in result.stderr
    records = log_records(tmp_path / "bad")
    named = [r["bad_sample"] for r in records if "bad_sample" in r]
    assert any(n.startswith("train-0000.tar:s0005:") for n in named), named
    assert any(n.startswith("train-0001.tar:s0045: empty caption") for n in named), named
    assert any("train-0002.tar" in n and "s00" not in n for n in named), named      # the truncated tar
    assert any("train-0004.tar" in n and "No such file" in n for n in named), named  # the missing shard
    steps = [r for r in records if "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["bad_samples"] == len(named) >= 4
    assert f"bad samples skipped: {len(named)}" in result.stderr
    assert "warning: skipped bad sample train-0000.tar:s0005" in result.stderr


def test_too_many_bad_samples_stop_the_run_with_its_last_checkpoint_intact(tmp_path):
    data = tmp_path / "data"
    broken_shards(data, corrupt_every=5)  # 20% bad
    result = run_module(*TRAIN, "--train-data", data / "train-{0000..0003}.tar", "--train-num-samples", "160",
                        "--batch-size", "16", "--workers", "1", "--epochs", "4", "--save-every-n-steps", "3",
                        "--max-bad-fraction", "0.1", "--logs", tmp_path, "--name", "halt", timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "exceed --max-bad-fraction 0.1" in error[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = latest_checkpoint(tmp_path / "halt" / "checkpoints")
    assert f"last checkpoint {last} is intact" in error[0]
    checkpoint = load_checkpoint_file(last)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    halted_at = int(error[0].split("stopped at step ")[1].split(";")[0])
    # the guard runs before the step's save: the checkpoint is the last one strictly before the halt
    assert checkpoint["step"] == (halted_at - 1) // 3 * 3 and halted_at < 40


def test_non_finite_loss_is_skipped_counted_and_stops_the_run(fmnist_data, tmp_path):
    # initial weights with logit_scale far above its bound (exp(20) ~ 5e8): the trainer clamps it
    model = open_clip.create_model(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(20.0)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hot.pt")
    # --lr 1e30: step 1 (a finite loss) throws the weights to ~1e30, and every later loss is NaN
    result = run_module(*TRAIN, "--train-data", fmnist_data["train"], "--workers", "1", "--logs", tmp_path,
                        "--name", "nan", "--pretrained", tmp_path / "hot.pt", "--lr", "1e30",
                        "--max-nonfinite-steps", "3", "--save-every-n-steps", "1")
    assert result.returncode == 3, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    checkpoints = tmp_path / "nan" / "checkpoints"
    assert len(error) == 1 and "not finite at steps 2..4" in error[0] and "stopped at step 4" in error[0], error
    assert f"last checkpoint {checkpoints / 'step_1.pt'} is intact" in error[0]
    assert "Traceback" not in result.stderr
    assert [s for s, _ in step_checkpoints(checkpoints)] == [1]  # none written inside the run of NaN steps
    weights = load_checkpoint_file(checkpoints / "step_1.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert weights["logit_scale"] <= math.log(100)
    records = log_records(tmp_path / "nan")
    assert [r["skipped_step"] for r in records] == [False, True, True, True]
    assert math.isfinite(records[0]["loss"]) and records[-1]["skipped_steps"] == 3
    assert all(r["logit_scale"] <= 100 + 1e-4 for r in records)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickled_payload_checkpoint(path, marker):
    """A real open_clip-looking checkpoint whose pickle runs os.mkdir(marker) when loaded unsafely."""
    torch.save({"state_dict": open_clip.create_model(TINY).state_dict(), "extra": Payload(marker)}, path)
    return path


def test_feature_cache_holding_a_pickled_payload_is_recomputed_not_run(tmp_path):
    key = {"model": TINY, "checkpoint": {"name": TINY}, "dataset": "d", "split": "test"}
    path = cache_path(tmp_path, key)
    pickled_payload_checkpoint(path, tmp_path / "PWNED")
    features, labels = cached_features(tmp_path, key, lambda: (torch.ones(2, 4), [0, 1]))
    assert torch.equal(features, torch.ones(2, 4)) and labels.tolist() == [0, 1]
    assert not (tmp_path / "PWNED").exists()


def test_a_disk_that_fills_up_during_a_checkpoint_is_one_line_and_the_last_checkpoint_stays_intact(tmp_path):
    """A real tmpfs with room for one checkpoint (and the logs) but not two: the second save fails on the full disk.
    One line naming the file, exit 2, no partial file, and the first checkpoint equal to the same run's on a roomy
    disk."""
    data = tmp_path / "data"
    broken_shards(data)
    args = [*TRAIN, "--train-data", data / "train-{0000..0003}.tar", "--train-num-samples", "128", "--batch-size", "16",
            "--workers", "1", "--save-every-n-steps", "2", "--max-steps", "4", "--max-bad-fraction", "0.5"]
    roomy = run_module(*args, "--logs", tmp_path, "--name", "roomy", timeout=300)
    assert roomy.returncode == 0, roomy.stderr[-3000:]
    size = (tmp_path / "roomy" / "checkpoints" / "step_2.pt").stat().st_size
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(mount)]).returncode:
        import pytest
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        full = run_module(*args, "--logs", mount, "--name", "full", timeout=300)
        errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        assert full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert f"cannot write {mount / 'full' / 'checkpoints' / 'step_4.pt'}: the disk is full" in errors[0]
        checkpoints = mount / "full" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2.pt"]  # no partial file left
        assert_same_training_state(load_checkpoint_file(checkpoints / "step_2.pt"),
                                   load_checkpoint_file(tmp_path / "roomy" / "checkpoints" / "step_2.pt"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)
