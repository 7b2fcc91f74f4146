"""Stopping and resuming the plain trainer where a run is most fragile: at the very end of an epoch, on the
pre-emption signal, and on another number of loader workers."""
import signal
import time

import pytest
import torch

from pipelines import fashion_mnist

from .conftest import run_module
from .test_reliability import TRAIN, assert_same_training_state, log_records, start_module


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """One shard of 200 samples. At batch 32 with 1 worker an epoch is 7 steps: 6 batches use 192 samples, the 8
    left make no batch, and the 7th batch comes from a second pass over the shard."""
    folder = tmp_path_factory.mktemp("one_shard")
    return fashion_mnist.build_train_shards(fashion_mnist.DEBIAN_DIR, folder, shard_size=200, limit=200)


EPOCHS, STEPS = 2, 14


def two_epochs(data, logs, *extra):
    return [*TRAIN, "--train-data", data, "--workers", "1", "--epochs", str(EPOCHS), "--logs", logs, *extra]


def final_state(logs):
    return torch.load(logs / "run" / "checkpoints" / f"step_{STEPS}.pt", weights_only=True)


@pytest.fixture(scope="module")
def unbroken(one_shard, tmp_path_factory):
    logs = tmp_path_factory.mktemp("unbroken")
    result = run_module(*two_epochs(one_shard, logs, "--name", "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    return final_state(logs)


def test_resume_after_the_last_full_pass_takes_the_unbroken_runs_last_batch(one_shard, unbroken, tmp_path):
    """Stopped after step 6, the resumed stream skips the 192 samples read, reads the 8 left (no batch), and must
    go on to the second pass rather than end the epoch on a pass that yielded nothing; the run then goes on
    through the next epoch to the unbroken run's weights."""
    stopped = run_module(*two_epochs(one_shard, tmp_path, "--name", "run", "--max-steps", "6"))
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    resumed = run_module(*two_epochs(one_shard, tmp_path, "--name", "run", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 6" in resumed.stderr and f"done: {STEPS} steps" in resumed.stderr
    assert_same_training_state(unbroken, final_state(tmp_path))


def test_usr1_without_deepspeed_checkpoints_exits_75_and_resumes_bitwise(one_shard, unbroken, tmp_path):
    """SLURM's pre-emption warning to a plain (non-DeepSpeed) run: it checkpoints the step it is at and exits 75;
    the resumed run ends with the unbroken run's weights and optimizer state, to the bit."""
    proc = start_module(*two_epochs(one_shard, tmp_path, "--name", "run", "--save-every-n-steps", "100"))
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 75, stderr[-2000:]
    stopped_at = int(stderr.split("pre-empted: checkpoint at step ")[1].split()[0])
    assert 2 <= stopped_at < STEPS
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped_at}.pt").is_file()

    resumed = run_module(*two_epochs(one_shard, tmp_path, "--name", "run", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {stopped_at}" in resumed.stderr
    assert [r["step"] for r in log_records(tmp_path / "run")] == list(range(1, STEPS + 1))
    assert_same_training_state(unbroken, final_state(tmp_path))


def test_resume_on_another_number_of_workers_takes_the_remaining_batches(fmnist_data, tmp_path):
    """Positions are per loader worker, so a checkpoint of a 2-worker run cannot place a 1-worker stream: the
    resumed epoch starts afresh minus the batches already taken (README), and the run still ends at the planned
    step with every step logged once and the new layout's position in its checkpoint."""
    common = [*TRAIN, "--train-data", fmnist_data["train"], "--train-num-samples", "320", "--epochs", "1",
              "--logs", tmp_path, "--name", "run", "--save-every-n-steps", "4"]
    first = run_module(*common, "--workers", "2", "--max-steps", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_module(*common, "--workers", "1", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed at step 4" in second.stderr and "done: 10 steps" in second.stderr
    assert [r["step"] for r in log_records(tmp_path / "run")] == list(range(1, 11))
    (position,) = torch.load(tmp_path / "run" / "checkpoints" / "step_10.pt", weights_only=True)["data"]
    # the 1-worker stream skipped 4 batches by count, then read the 6 batches still to take (no bad samples)
    assert position["workers"] == 1 and position["batches"] == 10
    assert position["consumed"] == {0: 10 * 32} and position["bad"] == {0: 0}
