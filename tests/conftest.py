import os
import subprocess
import sys
from pathlib import Path

import pytest

import mrl_clip  # noqa: F401  (registers model configs)
from mrl_clip.checkpoint import latest_checkpoint
from pipelines import fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
TINY = "MRL-Tiny-28"
TINY_DIMS = [8, 16, 32, 64, 128, 256]


def run_module(*args, timeout=600, env=None):
    """Run `python -m ...` as a user would; returns the CompletedProcess (text, both streams)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


@pytest.fixture(scope="session")
def fmnist_data(tmp_path_factory):
    """Small real-data shards: 4 x 512 training pairs, a CLIP_benchmark classification folder (500 test and 1000
    train images) and a retrieval folder (200 images x 2 captions), both written by CLIP_benchmark's converters."""
    if not (fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST missing: {fashion_mnist.INSTALL_HINT} (make test installs it)")
    out = tmp_path_factory.mktemp("fmnist")
    pattern = fashion_mnist.build_train_shards(fashion_mnist.DEBIAN_DIR, out, shard_size=512, limit=2048)
    eval_dir = fashion_mnist.build_eval_folder(fashion_mnist.DEBIAN_DIR, out / "fashion_mnist_test", limit=500,
                                               train_limit=1000)
    captions = fashion_mnist.build_retrieval_folder(fashion_mnist.DEBIAN_DIR, out / "captions", per_class=20)
    return {"root": out, "train": pattern, "eval": eval_dir, "captions": captions}


@pytest.fixture(scope="session")
def trained_run(fmnist_data, tmp_path_factory):
    """A tiny MRL model trained by the real CLI for a small budget (shared by the eval and interop tests)."""
    logs = tmp_path_factory.mktemp("runs")
    result = run_module("mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"],
                        "--dims", ",".join(map(str, TINY_DIMS)), "--batch-size", "64", "--epochs", "4",
                        "--lr", "1e-3", "--warmup", "10", "--workers", "1", "--threads", "2",
                        "--logs", logs, "--name", "tiny", "--save-every-n-steps", "40")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = logs / "tiny"
    return {"dir": run_dir, "checkpoint": latest_checkpoint(run_dir / "checkpoints"),
            "export": run_dir / "export", "stderr": result.stderr}


def pytest_collection_modifyitems(items):
    """For `make test`'s two pytest-xdist workers (--dist loadgroup): the tests on the trained model share one
    worker (the model is trained once), the cluster tests another (one Slurm cluster), and every other module
    stays whole on one worker, so its module fixtures (a training run, a DeepSpeed run) are made once."""
    for item in items:
        if "trained_run" in item.fixturenames:
            group = "trained_run"
        elif "slurm" in item.fixturenames:
            group = "slurm"
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
