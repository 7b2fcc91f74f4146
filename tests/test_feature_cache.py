"""--deterministic-towers and --feature-cache through the real CLI: a cached run trains exactly what the uncached
run with --deterministic-towers trains (bitwise: the stored trunk outputs are those the uncached forward computes;
on this machine's CPU kernels a row's result does not depend on the rows beside it, so batch composition does not
change a feature — were it to, the first assertion to fail would name the tensor), a changed key misses, a damaged
file is rebuilt, a killed build resumes, a full disk is one line, and the cache works with resume, --accum-freq,
two ranks and DeepSpeed."""
import json
from contextlib import nullcontext
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mrl_clip.train import feature_cache, finetune, locked_towers
from mrl_clip.train.main import main as train_main
from tests.conftest import ROOT, TINY, TINY_DIMS, one_line_exit
from tests.test_finetune import HF_TINY, LITE0, LITE0_DIMS, lite0_configs, one_error_line  # noqa: F401

LOCK_BOTH = ["--lock-image", "--lock-text", "--lock-text-freeze-layer-norm", "--deterministic-towers"]
LOCK_IMAGE = ["--lock-image", "--deterministic-towers"]  # LiT: the image tower cached, the text tower trains


def two_shards(data) -> str:
    return re.sub(r"\{0000\.\.\d+\}", "{0000..0001}", str(data["train"]))


def train_flags(data, logs, name, *extra, steps=4, model=TINY, dims=TINY_DIMS) -> list:
    """mrl_clip.train's flags on two Fashion-MNIST shards (1024 pairs), 8 pairs a batch."""
    return ["--model", model, "--train-data", two_shards(data), "--train-num-samples", "1024", "--dims",
            ",".join(map(str, dims)), "--batch-size", "8", "--max-steps", steps, "--lr", "1e-2", "--warmup", "1",
            "--workers", "1", "--threads", "1", "--output-dir", logs, "--name", name, "--log-every-n-steps", "1",
            "--save-every-n-steps", "2", *extra]


def train(data, logs, name, *extra, steps=4, model=TINY, dims=TINY_DIMS, configs=None, env=None, launch=None,
          check=True):
    """The real CLI, in a process of its own: train_flags()."""
    head = launch or ([sys.executable, ROOT / "tests" / "with_model_configs.py", configs] if configs
                      else [sys.executable, "-m"])
    args = [*head, "mrl_clip.train", *train_flags(data, logs, name, *extra, steps=steps, model=model, dims=dims)]
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                 **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(logs, name, step=4):
    return torch.load(Path(logs) / name / "checkpoints" / f"step_{step}.pt", weights_only=True)


def assert_same_training(logs, a, b, step=4):
    wa, wb = weights(logs, a, step), weights(logs, b, step)
    for key, value in wb["state_dict"].items():
        assert torch.equal(wa["state_dict"][key], value), key
    la = [json.loads(line)["loss"] for line in (Path(logs) / a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (Path(logs) / b / "log.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == step


def folders(cache):
    return sorted(p.name for p in Path(cache).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def cached_pair(fmnist_data, tmp_path_factory):
    """Both towers of MRL-Tiny-28 locked: a cached run and the uncached run, 4 steps each."""
    logs = tmp_path_factory.mktemp("cache_runs")
    cache = logs / "cache"
    cached = train(fmnist_data, logs, "cached", *LOCK_BOTH, "--feature-cache", cache)
    train(fmnist_data, logs, "plain", *LOCK_BOTH)
    return logs, cache, cached.stderr


def test_cached_run_equals_the_uncached_deterministic_run(cached_pair, fmnist_data):
    logs, cache, stderr = cached_pair
    assert_same_training(logs, "cached", "plain")
    assert "fully locked trunks in eval mode: image (vit), text (clip-text), cached from --feature-cache" in stderr
    assert folders(cache)[0].startswith("image-vit-") and folders(cache)[1].startswith("text-clip-text-")
    for folder in folders(cache):  # per sample: 4 bytes x the tower's 256-d output
        arrays = sorted((cache / folder).glob("*.npy"))
        assert len(arrays) == 2 and all(a.stat().st_size == 128 + 512 * 256 * 4 for a in arrays)
    assert weights(logs, "cached")["deterministic_towers"] is True
    assert json.loads((logs / "cached" / "params.json").read_text())["deterministic_towers"] is True
    # another run of the same key (other dims weights: a standard run) shares it: all hits
    again = train(fmnist_data, logs, "shared", *LOCK_BOTH, "--feature-cache", cache, "--dim-weights",
                  "0,0,0,0,0,1", steps=2)
    assert again.stderr.count("2 of 2 shards already built") == 2 and folders(cache) == folders(logs / "cache")


def test_timm_trunk_and_hugging_face_tower_cached_equal_uncached(fmnist_data, lite0_configs, tmp_path):
    """A timm tower (its trunk cached, its head trains; BatchNorm frozen) and a BERT tower (its pooled output
    cached, its projection trains; hidden dropout 0.1, which --deterministic-towers turns off in both runs)."""
    timm = [*LOCK_IMAGE, "--lock-image-freeze-bn-stats"]
    common = dict(model=LITE0, dims=LITE0_DIMS, configs=lite0_configs, steps=2)
    train(fmnist_data, tmp_path, "timm-cached", *timm, "--feature-cache", tmp_path / "cache", **common)
    train(fmnist_data, tmp_path, "timm-plain", *timm, **common)
    assert_same_training(tmp_path, "timm-cached", "timm-plain", step=2)
    hf = ["--lock-text", "--lock-text-freeze-layer-norm", "--deterministic-towers"]
    common = dict(model=HF_TINY, dims=LITE0_DIMS, configs=lite0_configs, steps=2)
    train(fmnist_data, tmp_path, "hf-cached", *hf, "--feature-cache", tmp_path / "cache", **common)
    train(fmnist_data, tmp_path, "hf-plain", *hf, **common)
    assert_same_training(tmp_path, "hf-cached", "hf-plain", step=2)
    assert [f.split("-")[:3] for f in folders(tmp_path / "cache")] == [["image", "timm", "trunk"],
                                                                       ["text", "hf", "pooled"]]


def test_changed_weights_transform_or_precision_is_another_key():
    """The key of a tower changes with each thing that decides its features (so the run reads another folder)."""
    import open_clip

    args = SimpleNamespace(lock_image=True, lock_image_unlocked_groups=0, lock_image_freeze_bn_stats=False,
                           lock_text=False)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    finetune.lock_image(model, SimpleNamespace(model=TINY, **vars(args)))
    (trunk,), _ = locked_towers.fully_locked(model, SimpleNamespace(**vars(args), lock_text_unlocked_layers=0))
    cfg = open_clip.get_model_config(TINY)

    def folder(precision="fp32", transform=preprocess):
        return feature_cache.key_folder(Path("c"), feature_cache.cache_key(trunk, cfg, transform, None, precision))
    base = folder()
    assert folder() == base  # the same model: the same key (function addresses left out of the transform)
    assert folder("amp_bf16") != base
    _, _, other_size = open_clip.create_model_and_transforms(TINY, force_image_size=32)
    assert folder(transform=other_size) != base
    with torch.no_grad():
        model.visual.conv1.weight[0, 0, 0, 0] += 1e-6
    assert folder() != base


def test_damaged_cache_files_are_rebuilt(cached_pair, fmnist_data, tmp_path):
    """A truncated .npy, a flipped byte and an unreadable .json: each is said and rebuilt, and the run trains as
    the uncached run did (never a wrong feature)."""
    logs, cache, _ = cached_pair
    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    image, text = [damaged / f for f in folders(damaged)]
    npys = sorted(image.glob("*.npy"))
    with open(npys[0], "r+b") as f:
        f.truncate(1000)
    data = bytearray(npys[1].read_bytes())
    data[-3] ^= 0x40
    npys[1].write_bytes(bytes(data))
    sorted(p for p in text.glob("*.json") if p.name != "key.json")[0].write_text("{not json")
    result = train(fmnist_data, logs, "damaged", *LOCK_BOTH, "--feature-cache", damaged)
    assert "is missing or truncated: rebuilding it" in result.stderr
    assert "is corrupt (its digest does not match): rebuilding it" in result.stderr
    assert "is unreadable (JSONDecodeError): rebuilding it" in result.stderr
    assert_same_training(logs, "damaged", "plain")


def test_killed_build_resumes_with_the_shards_it_finished(fmnist_data, tmp_path):
    cache = tmp_path / "cache"
    killed = train(fmnist_data, tmp_path, "k", *LOCK_IMAGE, "--feature-cache", cache, check=False,
                   env={"MRL_CLIP_TEST_KILL_BUILD_AFTER": "1"})  # SIGKILL once the first shard is written
    assert killed.returncode == -9
    (folder,) = [cache / f for f in folders(cache)]
    finished = sorted(folder.glob("*.json"))
    assert len(finished) == 2 and finished[0].name == "key.json"  # key.json and the first shard's record
    first = sorted(folder.glob("*.npy"))[0]
    before = first.stat().st_mtime_ns
    resumed = train(fmnist_data, tmp_path, "k2", *LOCK_IMAGE, "--feature-cache", cache, steps=2)
    assert "1 of 2 shards already built" in resumed.stderr and first.stat().st_mtime_ns == before
    train(fmnist_data, tmp_path, "k-plain", *LOCK_IMAGE, steps=2)
    assert_same_training(tmp_path, "k2", "k-plain", step=2)


def test_resume_of_a_cached_run_is_bitwise(cached_pair, fmnist_data):
    logs, cache, _ = cached_pair
    train(fmnist_data, logs, "broken", *LOCK_BOTH, "--feature-cache", cache, steps=2)
    train(fmnist_data, logs, "broken", *LOCK_BOTH, "--feature-cache", cache, "--resume", "latest")
    wa, wb = weights(logs, "broken"), weights(logs, "cached")
    assert all(torch.equal(wa["state_dict"][k], v) for k, v in wb["state_dict"].items())
    refused = train(fmnist_data, logs, "broken", *LOCK_BOTH[:-1], "--resume", "latest", "--max-steps", "6",
                    check=False)
    assert refused.returncode == 2 and "trained with --deterministic-towers" in one_error_line(refused.stderr)


def test_accum_freq_cached_equals_uncached(fmnist_data, tmp_path):
    train(fmnist_data, tmp_path, "acc-cached", *LOCK_IMAGE, "--feature-cache", tmp_path / "c", "--accum-freq", "2",
          steps=2)
    train(fmnist_data, tmp_path, "acc-plain", *LOCK_IMAGE, "--accum-freq", "2", steps=2)
    assert_same_training(tmp_path, "acc-cached", "acc-plain", step=2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_build_their_shares_and_train_as_uncached(fmnist_data, tmp_path):
    def launch():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m"]
    cached = train(fmnist_data, tmp_path, "r-cached", *LOCK_IMAGE, "--feature-cache", tmp_path / "c", "--device",
                   "cpu", "--dist-backend", "gloo", launch=launch(), steps=2)
    assert "(rank 1): 0 of 1 shards already built" in cached.stderr
    train(fmnist_data, tmp_path, "r-plain", *LOCK_IMAGE, "--device", "cpu", "--dist-backend", "gloo",
          launch=launch(), steps=2)
    assert_same_training(tmp_path, "r-cached", "r-plain", step=2)


@pytest.mark.slow
def test_deepspeed_cached_equals_uncached(fmnist_data, tmp_path):
    ds = ["--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json"]
    train(fmnist_data, tmp_path, "ds-cached", *LOCK_IMAGE, *ds, "--feature-cache", tmp_path / "c", steps=2)
    train(fmnist_data, tmp_path, "ds-plain", *LOCK_IMAGE, *ds, steps=2)
    assert_same_training(tmp_path, "ds-cached", "ds-plain", step=2)


@pytest.mark.parametrize("flags,message", [
    (["--lock-image", "--feature-cache", "X"], "--feature-cache needs --deterministic-towers"),
    (["--lock-image", "--lock-image-unlocked-groups", "1", "--deterministic-towers", "--feature-cache", "X"],
     "the image tower is not fully locked"),
    (["--lock-text", "--deterministic-towers", "--feature-cache", "X"], "needs --lock-text-freeze-layer-norm"),
    (["--deterministic-towers", "--feature-cache", "X"], "no tower is locked"),
])
def test_refused_in_one_line(fmnist_data, tmp_path, flags, message, capfd):
    flags = [str(tmp_path / "c") if f == "X" else f for f in flags]
    code, stderr = one_line_exit(train_main, train_flags(fmnist_data, tmp_path, "bad", *flags), capfd)
    assert code == 2 and message in one_error_line(stderr)


def test_unwritable_cache_directory_is_one_line(fmnist_data, tmp_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    flags = train_flags(fmnist_data, tmp_path, "bad", *LOCK_IMAGE, "--feature-cache", blocker / "cache")
    code, stderr = one_line_exit(train_main, flags, capfd)
    assert code == 2 and f"--feature-cache {blocker / 'cache'} is not writable" in one_error_line(stderr)


def test_full_disk_during_the_build_is_one_line_and_never_read_as_complete(fmnist_data, tmp_path):
    """A real tmpfs of 700 KiB: the first shard's features (512 x 256 x 4 B = 512 KiB) fit, the second's do not."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = train(fmnist_data, tmp_path, "full", *LOCK_IMAGE, "--feature-cache", mount, check=False)
        line = one_error_line(result.stderr)
        assert result.returncode == 2 and "cannot write" in line and str(mount) in line
        assert "bytes free on its disk" in line
        (folder,) = [mount / f for f in folders(mount)]
        records = sorted(p.name for p in folder.glob("*.json") if p.name != "key.json")
        assert len(records) == 1 and not list(folder.glob(".*.tmp"))  # one complete shard, no partial file
        entry, problem = feature_cache.read_shard(folder, records[0][:-len(".json")])
        assert problem is None and len(entry.rows) == 512
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_repeated_image_is_encoded_once_and_gets_the_same_row(tmp_path):
    """OpenMoji's layout: one image under several captions, in one shard and again in the next pass's shard. The
    build encodes each distinct image once; every sample's row equals its own image encoded alone, and a repeated
    undecodable image is named for each sample."""
    import io

    import numpy as np
    import open_clip
    import webdataset as wds
    from PIL import Image

    args = SimpleNamespace(lock_image=True, lock_image_unlocked_groups=0, lock_image_freeze_bn_stats=False,
                           lock_text=False, lock_text_unlocked_layers=0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    finetune.lock_image(model, SimpleNamespace(model=TINY, **vars(args)))
    (trunk,), _ = locked_towers.fully_locked(model, args)
    locked_towers.pin_eval([trunk])
    rng = np.random.default_rng(0)
    images = []
    for _ in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    orders = {"moji-0000.tar": [0, 1, 0, 2, 1, 0, "bad", "bad"], "moji-0001.tar": [2, 3, 1, 3, "bad"]}
    for name, order in orders.items():
        with wds.TarWriter(str(tmp_path / name)) as sink:
            for i, which in enumerate(order):
                sink.write({"__key__": f"s{i}", "png": b"not a png" if which == "bad" else images[which],
                            "txt": f"caption {i}".encode()})
    builder = feature_cache.Builder(trunk, preprocess, None, batch_size=2, device="cpu", autocast=nullcontext)
    encoded = []
    encode = builder.encode
    builder.encode = lambda batch: encoded.append(len(batch)) or encode(batch)
    folder = tmp_path / "cache"
    folder.mkdir()
    feature_cache.build_shards(folder, builder, [str(tmp_path / name) for name in orders], rank=0)
    assert sum(encoded) == 4  # the four distinct images, each once
    for name, order in orders.items():
        entry, problem = feature_cache.read_shard(folder, feature_cache.shard_stem(str(tmp_path / name)))
        assert problem is None
        bad = [f"s{i}" for i, which in enumerate(order) if which == "bad"]
        assert sorted(entry.bad) == bad and f"{name}:{bad[-1]}: undecodable png" in entry.bad[bad[-1]]
        assert sorted(entry.rows) == sorted(f"s{i}" for i, which in enumerate(order) if which != "bad")
        rows = np.load(entry.path)
        with torch.no_grad():
            for key, i in entry.rows.items():
                image = Image.open(io.BytesIO(images[order[int(key[1:])]])).convert("RGB")
                alone = trunk.encode(preprocess(image)[None]).float().numpy()[0]
                assert np.array_equal(rows[i], alone), (name, key)
