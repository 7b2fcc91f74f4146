"""open_clip_train's data and preprocessing flags in mrl_clip.train (mrl_clip/train/data_flags.py, csv_source.py):
parsed as open_clip_train parses them, upsampled sources drawn with open_clip's weights, a csv run equal to a
webdataset run of the same samples and resumable to the bit, and the transform / force_* overrides making what
open_clip's create_model_and_transforms makes from the same kwargs."""
import csv
import json
import random
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_train.data import CsvDataset, ResampledShards2
from open_clip_train.params import parse_args as open_clip_parse_args
from PIL import Image
from scipy.stats import chi2

from mrl_clip import models
from mrl_clip.train import data_flags
from mrl_clip.train.main import main as train_main
from mrl_clip.train.main import parse_args
from mrl_clip.train.stream import StreamSettings, shard_stages

from .conftest import TINY, one_line_exit, run_module
from .test_reliability import assert_same_training_state, log_records

BASE = ["--model", TINY, "--dims", "32,256", "--batch-size", "32", "--warmup", "2", "--threads", "1",
        "--workers", "0", "--log-every-n-steps", "1", "--lr", "1e-3"]
# RandomResizedCrop of the whole square image: the training transform is then the same for any sample seed
WHOLE_IMAGE = ["--aug-cfg", "scale=(1.0,1.0)", "ratio=(1.0,1.0)"]
OURS = ["--dataset-type", "csv", "--csv-img-key", "path", "--csv-caption-key", "caption", "--csv-separator", ","]


def train(logs, name, data, *extra):
    assert train_main([*BASE, "--train-data", str(data), "--logs", str(logs), "--name", name,
                       *map(str, extra)]) == 0
    return logs / name


def losses(run_dir):
    return [r["loss"] for r in log_records(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def fmnist_csv(fmnist_data, tmp_path_factory):
    """The fixture's 4 x 512 shards as image files and a ','-separated csv of (path, caption) in the shards'
    order, with columns named as open_clip's defaults are not."""
    folder = tmp_path_factory.mktemp("csv")
    rows = []
    for shard in sorted(Path(fmnist_data["train"]).parent.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            members = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, sample in members.items():
            image = folder / f"{shard.stem}_{key}.png"
            image.write_bytes(sample["png"])
            rows.append((str(image), sample["txt"].decode()))
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["caption", "path", "other"])
        writer.writerows((caption, image, 0) for image, caption in rows)
    return path


def test_flags_parse_as_open_clip_train_parses_them():
    argv = ["--train-data", "a/{0..1}.tar::b/{0..3}.tar", "--train-data-upsampling-factors", "1::4",
            "--dataset-resampled", "--dataset-type", "webdataset", "--csv-separator", ",", "--csv-img-key", "p",
            "--csv-caption-key", "c", "--image-mean", "0.5", "0.4", "0.3", "--image-std", "0.2", "0.2", "0.2",
            "--image-interpolation", "bilinear", "--image-resize-mode", "squash", "--aug-cfg", "scale=(0.5,1.0)",
            "color_jitter=0.1", "use_timm=False", "--force-context-length", "12", "--force-patch-dropout", "0.25"]
    ours = parse_args(["--model", TINY, "--dims", "32,256", *argv, "--force-image-size", "32"])
    theirs = open_clip_parse_args([*argv, "--force-image-size", "32"])
    names = [a.dest for a in data_flags_parser()._actions if a.dest != "help"]
    assert len(names) == 13
    for name in names:
        if name == "force_image_size":  # open_clip_train/main.py turns one size into an int before use
            assert getattr(ours, name) == getattr(theirs, name)[0] == 32
        else:
            assert getattr(ours, name) == getattr(theirs, name), name
    defaults, their_defaults = parse_args(["--model", TINY, "--dims", "32,256", "--train-data", "x.tar"]), \
        open_clip_parse_args([])
    for name in names:
        if name != "dataset_type":  # auto, resolved from the extension as open_clip's get_dataset_fn does
            assert getattr(defaults, name) == getattr(their_defaults, name), name
    assert defaults.dataset_type == "webdataset" and their_defaults.dataset_type == "auto"


def data_flags_parser():
    import argparse
    p = argparse.ArgumentParser(add_help=False)
    data_flags.add_flags(p)
    return p


@pytest.mark.parametrize("argv, message", [
    (["--train-data", "a.tar::b.tar", "--train-data-upsampling-factors", "1::4"], "--dataset-resampled"),
    (["--train-data", "a.tar::b.tar", "--train-data-upsampling-factors", "1::4::2", "--dataset-resampled"],
     "3 factors for 2"),
    (["--train-data", "a.tar", "--dataset-type", "synthetic"], "synthetic is not supported"),
    (["--train-data", "a.parquet"], "cannot tell the type"),
    (["--train-data", "a.tar", "--aug-cfg", "scale"], "KEY=VALUE"),
    (["--train-data", "a.tar", "--aug-cfg", "sclae=(0.5,1.0)"], "sclae"),
    (["--train-data", "a.tar", "--aug-cfg", "color_jitter_prob=0.5"], "cannot build its training transform"),
    (["--train-data", "a.tar", "--image-interpolation", "nearest"], "invalid choice"),
])
def test_refused_flag_combinations_are_one_line(argv, message, capfd):
    code, err = one_line_exit(train_main, ["--model", TINY, "--dims", "32,256", *argv], capfd)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_upsampled_shard_draws_follow_the_factors(tmp_path):
    """The stream's shard source for 'a/{0..1}.tar::b/{0..3}.tar' with factors 1::4: 20000 draws against open_clip's
    weights (each shard its source's factor), chi-square at p = 1e-6 with 5 degrees of freedom; and the same draws
    as open_clip_train's ResampledShards2 seeded alike."""
    urls, factors = f"{tmp_path}/a/{{0..1}}.tar::{tmp_path}/b/{{0..3}}.tar", "1::4"
    settings = StreamSettings(urls, None, None, 8, 100, seed=3, resampled=True, weights=factors)
    draws = 20000
    source = shard_stages(settings, [], epoch=1, offset=0)[0]
    source.nshards = draws
    drawn = [d["url"] for d in source]
    shards = [f"{tmp_path}/a/{i}.tar" for i in range(2)] + [f"{tmp_path}/b/{i}.tar" for i in range(4)]
    weights = [1.0] * 2 + [4.0] * 4
    expected = [draws * w / sum(weights) for w in weights]
    statistic = sum((drawn.count(s) - e) ** 2 / e for s, e in zip(shards, expected))
    assert statistic < chi2.ppf(1 - 1e-6, len(shards) - 1), statistic
    reference = ResampledShards2(urls, weights=factors, nshards=draws, deterministic=True, epoch=0,
                                 worker_seed=lambda: source.worker_seed())
    assert [d["url"] for d in reference] == drawn


def caption_less_shard(path: Path, samples, drop: int):
    """A shard of `samples` (key -> {ext: bytes}) whose sample number `drop` has no caption."""
    import io
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, (key, sample) in enumerate(samples):
            for ext, data in sample.items():
                if ext == "txt" and i == drop:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_upsampled_run_trains_on_both_sources(fmnist_data, tmp_path):
    """Two sources, each with caption-less samples: a resampled run with factors 1::4 reads from both (its bad
    samples name shards of each)."""
    with tarfile.open(Path(fmnist_data["train"]).parent / "train-0000.tar") as tar:
        members = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    samples = list(members.items())
    for source in ("a", "b"):
        for shard in range(2):
            part = samples[shard * 4:(shard + 1) * 4]
            caption_less_shard(tmp_path / source / f"{source}{shard}.tar", part, drop=1)
    urls = f"{tmp_path}/a/a{{0..1}}.tar::{tmp_path}/b/b{{0..1}}.tar"
    # 3 steps of 32 draw some 32 shards of 3 good samples; each is from source a with probability 2/10
    run = train(tmp_path, "up", urls, "--dataset-resampled", "--train-data-upsampling-factors", "1::4",
                "--train-num-samples", "96", "--max-steps", "3", "--max-bad-fraction", "0.5")
    bad = [r["bad_sample"].split(":")[0] for r in log_records(run) if "bad_sample" in r]
    from_a = sum(name.startswith("a") for name in bad)
    assert 0 < from_a < len(bad) - from_a, bad
    assert len(losses(run)) == 3


def test_csv_run_is_the_webdataset_run_of_the_same_samples(fmnist_data, fmnist_csv, tmp_path):
    """The same 2048 samples in the same order as the fixture's 4 shards of 512: the csv run's first steps' losses
    are the webdataset run's, to the bit (the csv's blocks of 512 rows are shuffled and read as the shards are);
    and the csv's columns, picked by --csv-img-key / --csv-caption-key / --csv-separator, are what open_clip_train's
    CsvDataset reads."""
    wds_run = train(tmp_path, "wds", fmnist_data["train"], *WHOLE_IMAGE, "--max-steps", "2")
    csv_run = train(tmp_path, "csv", fmnist_csv, *OURS, *WHOLE_IMAGE, "--max-steps", "2")
    assert losses(csv_run) == losses(wds_run) and len(losses(csv_run)) == 2
    _, preprocess, tokenizer = models.create(TINY)[1:]
    theirs = CsvDataset(str(fmnist_csv), preprocess, "path", "caption", sep=",", tokenizer=tokenizer)
    assert len(theirs) == 2048 and json.loads((csv_run / "params.json").read_text())["train_num_samples"] == 2048
    with open(fmnist_csv) as f:
        row = list(csv.DictReader(f))[100]
    image, text = theirs[100]
    assert torch.equal(text, tokenizer(row["caption"])[0])
    assert torch.equal(image, preprocess(Image.open(row["path"])))


def test_csv_run_resumes_bitwise_and_counts_a_missing_image(fmnist_csv, tmp_path):
    """A csv whose row 3 names a missing file: the run counts it as a bad sample each epoch, and stopped after
    step 2 (mid-epoch) and resumed, ends at the unbroken run's training state to the bit."""
    rows = fmnist_csv.read_text().splitlines()
    header, body = rows[0], rows[1:71]
    body[3] = body[3].replace(".png", "-gone.png")
    data = tmp_path / "broken.csv"
    data.write_text("\n".join([header, *body]) + "\n")
    flags = [*OURS, "--epochs", "2", "--save-every-n-steps", "2", "--max-bad-fraction", "0.05"]
    unbroken = train(tmp_path / "a", "run", data, *flags)
    records = log_records(unbroken)
    named = [r["bad_sample"] for r in records if "bad_sample" in r]
    # each pass over the rows meets it: an epoch (3 batches of 32, open_clip's rounding up) takes 2 passes
    assert set(named) == {f"broken.csv#00000:000000003: cannot read image file {body[3].split(',')[1]}"}
    assert records[-1]["bad_samples"] == len(named) >= 2
    steps = records[-1]["step"]
    train(tmp_path / "b", "run", data, *flags, "--max-steps", "2")
    train(tmp_path / "b", "run", data, *flags, "--resume", "latest")
    final = f"step_{steps}.pt"
    assert_same_training_state(torch.load(unbroken / "checkpoints" / final, weights_only=True),
                               torch.load(tmp_path / "b" / "run" / "checkpoints" / final, weights_only=True))


def test_csv_missing_column_and_feature_cache_are_one_line(fmnist_csv, capfd, tmp_path):
    code, err = one_line_exit(train_main, [*BASE, "--train-data", fmnist_csv, "--csv-separator", ","], capfd)
    assert code == 2 and "no column 'filepath' (--csv-img-key)" in err and len(err.strip().splitlines()) == 1
    code, err = one_line_exit(train_main, [*BASE, "--train-data", fmnist_csv, *OURS, "--deterministic-towers",
                                           "--lock-image", "--feature-cache", tmp_path], capfd)
    assert code == 2 and "--feature-cache" in err and len(err.strip().splitlines()) == 1, err


PREPROCESS = ["--image-mean", "0.3", "0.4", "0.5", "--image-std", "0.2", "0.25", "0.3", "--image-interpolation",
              "bilinear", "--image-resize-mode", "squash", "--aug-cfg", "scale=(0.5,1.0)", "color_jitter=(0.4,0.4,0.4,0.1)",
              "color_jitter_prob=0.8", "gray_scale_prob=0.5", "--force-image-size", "36", "30"]


def test_transforms_and_forced_model_are_open_clips(image_folder):
    """Our flags to models.create make open_clip's create_model_and_transforms(same kwargs) transforms (applied
    to a real photo under one seed) and model (context length, patch dropout, image size)."""
    args = parse_args(["--model", TINY, "--dims", "32,256", "--train-data", "x.tar", *PREPROCESS,
                       "--force-context-length", "12", "--force-patch-dropout", "0.25"])
    model, train_ours, val_ours, tokenizer = models.create(TINY, open_clip_kwargs=data_flags.model_kwargs(args))
    theirs, train_theirs, val_theirs = open_clip.create_model_and_transforms(
        TINY, image_mean=(0.3, 0.4, 0.5), image_std=(0.2, 0.25, 0.3), image_interpolation="bilinear",
        image_resize_mode="squash", force_image_size=[36, 30], force_context_length=12, force_patch_dropout=0.25,
        aug_cfg={"scale": (0.5, 1.0), "color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8, "gray_scale_prob": 0.5})
    photo = Image.open(sorted(image_folder.glob("*.png"))[0]).resize((50, 40))
    for ours, ref in ((train_ours, train_theirs), (val_ours, val_theirs)):
        outs = []
        for transform in (ours, ref):
            torch.manual_seed(5)
            random.seed(5)
            outs.append(torch.stack([transform(photo) for _ in range(4)]))
        assert outs[0].shape == (4, 3, 36, 30) and torch.equal(outs[0], outs[1])
    assert model.context_length == theirs.context_length == 12 == tokenizer.context_length
    assert tokenizer("a photo").shape == open_clip.get_tokenizer(TINY, context_length=12)("a photo").shape
    assert model.visual.patch_dropout.prob == theirs.visual.patch_dropout.prob == 0.25
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_forced_image_size_trains_and_its_export_loads_in_plain_open_clip(fmnist_data, tmp_path):
    run = train(tmp_path, "big", fmnist_data["train"], "--force-image-size", "32", "--image-mean", "0.5",
                "--image-std", "0.25", "--force-context-length", "12", "--max-steps", "2")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    assert model.visual.image_size == (32, 32) and model.context_length == 12
    assert list(model.visual.image_mean) == [0.5] and list(model.visual.image_std) == [0.25]  # as given
    assert preprocess(Image.new("RGB", (28, 28))).shape == (3, 32, 32)
    saved = torch.load(run / "checkpoints" / "step_2.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


@pytest.mark.slow  # DeepSpeed's start: 277 s measured on the shared 2-core machine
def test_deepspeed_smoke_run_on_a_csv(fmnist_csv, tmp_path):
    result = run_module("mrl_clip.train", *BASE, "--train-data", fmnist_csv, *OURS, "--max-steps", "2",
                        "--deepspeed", "configs/ds_zero2_fp32.json", "--logs", tmp_path, "--name", "ds")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(tmp_path / "ds")) == 2 and (tmp_path / "ds" / "export" / "open_clip_config.json").is_file()
