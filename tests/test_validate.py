"""--val-data and --report-to tensorboard in mrl_clip.train, through the real CLI: validation never changes the
weights, runs on open_clip's --val-frequency schedule plus --val-every-n-steps, measures the weights the run saved,
runs once per due step across pre-emption and resume, and TensorBoard's own reader finds a series per dim."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import torch

from mrl_clip.eval.zeroshot import run_zeroshot
from mrl_clip.eval.zeroshot_retrieval import run_retrieval
from mrl_clip.train.validate import ValSchedule

from .conftest import ROOT, TINY, run_module
from .test_reliability import assert_same_training_state, log_records, start_module

# a ViT whose patch dropout draws from torch's global RNG in train mode only: a validation that left the model in
# eval mode, or let its DataLoader's seed draw advance that RNG, changes which patches later steps drop
DROPOUT_MODEL = "Tiny-PatchDropout-Test"
DROPOUT_CONFIG = {"embed_dim": 64,
                  "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "patch_size": 7, "patch_dropout": 0.5},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def train(data, logs, name, *extra, model=TINY, dims="32,256", configs=None):
    """The real CLI (under tests/with_model_configs.py for a test-local model config)."""
    launch = [ROOT / "tests" / "with_model_configs.py", configs] if configs else ["-m"]
    args = [sys.executable, *launch, "mrl_clip.train", "--model", model, "--train-data", data["train"], "--dims", dims,
            "--batch-size", "32", "--lr", "1e-3", "--warmup", "2", "--workers", "0", "--threads", "1",
            "--logs", logs, "--name", name, "--log-every-n-steps", "1", *extra]
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return logs / name


def val_records(run_dir):
    return [r for r in log_records(run_dir) if "val_dim" in r]


def test_epoch_validation_follows_open_clips_val_frequency():
    """open_clip_train's evaluate() runs its val set after completed epoch e when `val_frequency and (e %
    val_frequency == 0 or e == epochs)`; --val-every-n-steps adds every N-th step on top."""
    for epochs in range(1, 6):
        for frequency in range(4):
            for every in (None, 2):
                schedule = ValSchedule(every, frequency, steps_per_epoch=3, total_steps=3 * epochs)
                ours = [s for s in range(1, 3 * epochs + 1) if schedule.due(s)]
                by_epoch = {3 * e for e in range(1, epochs + 1) if frequency and (e % frequency == 0 or e == epochs)}
                by_step = {s for s in range(1, 3 * epochs + 1) if every and s % every == 0}
                assert ours == sorted(by_epoch | by_step), (epochs, frequency, every)


def test_validation_leaves_the_weights_and_optimizer_bitwise(fmnist_data, tmp_path, one_thread):
    """Two epochs of 4 steps with and without --val-data (zero-shot, every 3 steps and every epoch): the same
    weights and optimizer state to the bit, on a model whose training draws from torch's global RNG. The last
    validation's records are mrl_clip.eval's zero-shot of the checkpoint saved at that step."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{DROPOUT_MODEL}.json").write_text(json.dumps(DROPOUT_CONFIG))
    common = ["--train-num-samples", "128", "--epochs", "2", "--save-every-n-steps", "100"]
    plain = train(fmnist_data, tmp_path, "plain", *common, model=DROPOUT_MODEL, dims="16,64", configs=configs)
    validated = train(fmnist_data, tmp_path, "val", *common, "--val-data", fmnist_data["eval"],
                      "--val-every-n-steps", "3", model=DROPOUT_MODEL, dims="16,64", configs=configs)
    records = val_records(validated)
    assert [r["step"] for r in records] == [3, 4, 6, 8]
    assert all(r["val_task"] == "zeroshot" and set(r["val_dim"]) == {"16", "64"} for r in records)
    assert set(records[0]["val_dim"]["64"]) == {"acc1", "acc5", "mean_per_class_recall"}
    final = [torch.load(run / "checkpoints" / "step_8.pt", weights_only=True) for run in (plain, validated)]
    assert_same_training_state(*final)
    # the same features as the trainer's validation (its batch size, one thread, eval mode): equal, not close
    open_clip.add_model_config(configs)
    fresh = run_zeroshot(DROPOUT_MODEL, str(validated / "checkpoints" / "step_8.pt"), str(fmnist_data["eval"]),
                         [16, 64], batch_size=32)
    assert fresh["metrics"] == records[-1]["val_dim"]


def scalars(run_dir) -> dict:
    """{tag: {step: value}} as TensorBoard's own reader loads RUN/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        out[tag] = {e.step: e.value for e in events}
        assert len(out[tag]) == len(events), (tag, "two values at one step")
    return out


def f32(x):
    """A TensorBoard scalar holds a float32."""
    return float(np.float32(x))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer ran (--threads 1): the same kernels, the same features
    yield
    torch.set_num_threads(threads)


def test_tensorboard_series_per_dim_match_the_log_and_the_saved_weights(fmnist_data, tmp_path, one_thread):
    """--report-to tensorboard with retrieval --val-data: TensorBoard's EventAccumulator reads a train loss series
    per dim, lr, logit scale and a val series per metric and dim, each value the log.jsonl one at its step; the
    last validation equals mrl_clip.eval's retrieval of the checkpoint the run saved at that step."""
    run = train(fmnist_data, tmp_path, "tb", "--max-steps", "4", "--val-data", fmnist_data["captions"],
                "--val-every-n-steps", "2", "--report-to", "tensorboard")
    read = scalars(run)
    train_records = [r for r in log_records(run) if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for r in train_records:
        expected = {"train/loss": r["loss"], "train/lr": r["lr"], "train/scale": r["logit_scale"],
                    "train/samples_per_second": r["samples_per_s"],
                    **{f"train/loss_dim{m}": v for m, v in r["loss_dim"].items()}}
        assert {tag: read[tag][r["step"]] for tag in expected} == {tag: f32(v) for tag, v in expected.items()}
    records = val_records(run)
    assert [r["step"] for r in records] == [2, 4]
    metrics = [f"{side}_retrieval_recall@{k}" for k in (1, 5, 10) for side in ("image", "text")]
    assert {t for t in read if t.startswith("val/")} == {f"val/{name}_dim{m}" for name in metrics for m in (32, 256)}
    for r in records:
        for m, values in r["val_dim"].items():
            assert {name: read[f"val/{name}_dim{m}"][r["step"]] for name in metrics} == \
                   {name: f32(values[name]) for name in metrics}
    fresh = run_retrieval(TINY, str(run / "checkpoints" / "step_4.pt"), str(fmnist_data["captions"]), [32, 256],
                          batch_size=32)
    assert fresh["metrics"] == records[-1]["val_dim"]


def test_preempted_and_resumed_runs_validate_every_due_step_once(fmnist_data, tmp_path):
    """Validation at every step, over three attempts: one stopped by --max-steps at step 3, one pre-empted by
    SIGUSR1 (its checkpoint comes before the validation of its last step), one resumed to the end. The resumed
    runs start with the validation the pre-emption cut off and repeat none: log.jsonl and TensorBoard hold one
    validation per step."""
    common = ["mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"], "--dims", "32,256",
              "--batch-size", "32", "--train-num-samples", "320", "--epochs", "1", "--warmup", "2", "--workers", "0",
              "--threads", "1", "--logs", tmp_path, "--name", "run", "--log-every-n-steps", "1",
              "--save-every-n-steps", "100", "--val-data", fmnist_data["captions"], "--val-every-n-steps", "1",
              "--report-to", "tensorboard"]
    first = run_module(*common, "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-2000:]

    proc = start_module(*common, "--resume", "latest")
    log, deadline = tmp_path / "run" / "log.jsonl", time.monotonic() + 300
    while max((r["step"] for r in log_records(tmp_path / "run")), default=0) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    second = proc.communicate(timeout=300)[1]
    assert proc.returncode == 75, second[-2000:]
    stopped_at = int(second.split("pre-empted: checkpoint at step ")[1].split()[0])
    assert 5 <= stopped_at < 10 and "val at step 3 (" not in second
    assert f"val at step {stopped_at} (" not in second, "the pre-emption checkpoint comes first"

    third = run_module(*common, "--resume", "latest")
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"resumed at step {stopped_at}" in third.stderr and f"val at step {stopped_at} (" in third.stderr
    assert [r["step"] for r in val_records(tmp_path / "run")] == list(range(1, 11))
    assert log.is_file() and sorted(scalars(tmp_path / "run")["val/image_retrieval_recall@1_dim32"]) == \
        list(range(1, 11))
