"""The cluster path on a real (local, one-node) Slurm cluster: sbatch, srun ranks, DeepSpeed ZeRO-2 on gloo,
pre-emption and requeue. CI sets MRL_CLIP_REQUIRE_SLURM=1 (a skip there is a failure); elsewhere these tests
start the local cluster when run as root and skip, saying why, when they cannot."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import ds_grad_probe
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
CLUSTER = ROOT / "slurm" / "local_cluster.sh"


def cluster_idle() -> bool:
    if shutil.which("sinfo") is None:
        return False
    found = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return found.returncode == 0 and "idle" in found.stdout


@pytest.fixture(scope="module")
def slurm():
    started = False
    if not cluster_idle():
        reason = None
        if os.geteuid() != 0:
            reason = "no idle Slurm node and not root (the local cluster needs root: sudo slurm/local_cluster.sh start)"
        else:
            run = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
            if run.returncode != 0:
                reason = f"local Slurm cluster did not start: {run.stderr.strip()[-500:]}"
            started = run.returncode == 0
        if reason:
            if os.environ.get("MRL_CLIP_REQUIRE_SLURM") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
    yield
    if started:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)


def sbatch_env(tmp_path, train_data, **extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "TRAIN_DATA": train_data,
            "OUTPUT_DIR": str(tmp_path / "runs"), "RUN_NAME": "tiny", **extra}


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_sbatch_two_ranks_zero2_trains_is_preempted_requeues_finishes_and_exports(slurm, fmnist_data, tmp_path):
    """slurm/train_tiny.sh: two ZeRO-2 ranks, each on its own half of the shards, train one epoch and export. On the
    way, USR1 to the batch shell (what `#SBATCH --signal=B:USR1@60` does before the time limit): the ranks
    checkpoint and exit, the job requeues itself, and the requeued job resumes and ends at the planned step.
    Slurm holds a requeued job for about two minutes before it may start again; the test lifts that hold.
    (One job for both claims: an uninterrupted job would train the same run again.)"""
    out = tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", "--output", str(out), str(ROOT / "slurm" / "train_tiny.sh"),
                                "--log-every-n-steps", "1"],
                               cwd=ROOT, env=sbatch_env(tmp_path, fmnist_data["train"]), capture_output=True,
                               text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    run_dir = tmp_path / "runs" / "tiny"
    try:
        deadline = time.time() + 900
        while len(read_log(run_dir)) < 4:
            assert time.time() < deadline and job_fields(job_id)["JobState"] in ("PENDING", "RUNNING"), \
                "job ended or stalled before step 4"
            time.sleep(1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        final = wait_for_requeued_job(job_id, deadline)
    finally:
        if job_fields(job_id).get("JobState") not in FINISHED:
            subprocess.run(["scancel", job_id])
    text = out.read_text()
    assert final == ("COMPLETED", "0:0"), (final, text[-3000:])
    preempted_at = int(text.split("pre-empted: checkpoint at step ")[1].split()[0])
    assert 4 <= preempted_at < 16
    assert "requeueing job" in text and "(restart 1)" in text
    assert f"resumed at step {preempted_at}" in text
    assert "done: 16 steps" in text
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, 17))  # 1 epoch of 2048 samples, global batch 128, each once
    # two ranks, each on its own half of the shards, in the first job and in the requeued one (the output appends)
    reads = [line.split("reads shards: ")[1].split() for line in text.splitlines() if "reads shards: " in line]
    shards = sorted(str(p) for p in Path(fmnist_data["train"]).parent.glob("train-*.tar"))
    assert len(reads) == 4, reads
    for job_reads in (reads[:2], reads[2:]):
        assert not set(job_reads[0]) & set(job_reads[1]) and sorted(job_reads[0] + job_reads[1]) == shards
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert (run_dir / "checkpoints" / "deepspeed" / "latest").read_text() == "step_16"

    import open_clip
    loaded = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'export'}")[0]
    from_checkpoint = open_clip.create_model_and_transforms(
        "MRL-Tiny-28", pretrained=str(run_dir / "checkpoints" / "step_16.pt"))[0]
    for (name, a), b in zip(loaded.state_dict().items(), from_checkpoint.state_dict().values()):
        assert torch.equal(a, b), name


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
            "OUT_OF_MEMORY"}


def job_fields(job_id) -> dict:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def wait_for_requeued_job(job_id, deadline) -> tuple[str, str]:
    """Wait until the job, requeued once, has run again and ended; return its (JobState, ExitCode). Not
    `sbatch --wait`: that polls the job every few seconds and takes it for ended when a poll falls in the moment
    of the requeue. Slurm holds a requeued job for about two minutes before it may start again; this lifts it."""
    ran_again, job = False, {}
    while time.time() < deadline:
        job = job_fields(job_id)
        requeued = int(job.get("Restarts", "0")) >= 1
        if requeued and "BeginTime" in job.get("Reason", ""):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        ran_again = ran_again or (requeued and job["JobState"] == "RUNNING")
        if ran_again and job["JobState"] in FINISHED:
            return job["JobState"], job["ExitCode"]
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not run again and end in time: {job}")


def test_train_vitb_script_runs_on_cpu_ranks(slurm, fmnist_data, tmp_path):
    """The GPU job script's plumbing (resampled shards, DeepSpeed, requeue-safe run name, extra flags: here
    open_clip's --lock-image on two ZeRO-2 ranks) with its GPU header overridden on the sbatch command line and the
    demo model in place of ViT-B-32-768."""
    out = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--wait", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--output", str(out), str(ROOT / "slurm" / "train_vitb.sh"), "--model", "MRL-Tiny-28",
                          "--dims", "8,256", "--device", "cpu", "--batch-size", "32", "--max-steps", "4",
                          "--workers", "1", "--threads", "1", "--lock-image", "--lock-image-unlocked-groups", "1"],
                         cwd=ROOT, env=sbatch_env(tmp_path, fmnist_data["train"],
                                                  DS_CONFIG=str(ROOT / "configs" / "ds_zero2_fp32.json")),
                         capture_output=True, text=True, timeout=600)
    text = out.read_text()
    assert job.returncode == 0, text[-3000:]
    assert "2 ranks" in text and "done: 4 steps" in text
    checkpoint = torch.load(tmp_path / "runs" / "tiny" / "checkpoints" / "step_4.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and checkpoint["dims"] == [8, 256]
    assert checkpoint["locks"] == "--lock-image --lock-image-unlocked-groups 1"  # extra flags reach every rank


def test_two_ranks_zero2_gradients_equal_one_rank_on_joined_batch(slurm, tmp_path):
    """srun -n 2, DeepSpeed ZeRO-2, gather-with-grad + local loss, batch B per rank: the engine's averaged gradient
    is the float64 gradient of one process on the joined 2B batch within the float32 rounding bound of
    tests/numerics.py, and its SGD step applies it (ds_grad_probe.check; the same check runs under torchrun in
    tests/test_deepspeed.py)."""
    out = tmp_path / "grads.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    probe = subprocess.run(["srun", "-n", "2", sys.executable, str(ROOT / "tests" / "ds_grad_probe.py"), str(out),
                            "--steps", "2", "--lr", "0.1"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    run = torch.load(out, weights_only=True)
    assert run["world_size"] == 2
    ds_grad_probe.check(run, "srun, two ranks, ZeRO-2, step")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
