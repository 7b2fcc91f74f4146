import io
import json
import tarfile

import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from mrl_clip.errors import UserError
from mrl_clip.train.position import StreamPosition
from mrl_clip.train.shards import count_samples, resolve_shards
from mrl_clip.train.stream import (
    StreamSettings,
    batches_per_epoch,
    batches_per_worker_done,
    make_train_stream,
    rank_shards,
)
from pipelines.shards import write_shards

from .conftest import TINY


def preprocess_and_tokenizer():
    _, preprocess, _ = open_clip.create_model_and_transforms(TINY)
    return preprocess, open_clip.get_tokenizer(TINY)


def stream(pattern, num_samples, batch_size=32, epoch=0, skip_batches=0, consumed=None, bad=None, **settings):
    return make_train_stream(StreamSettings(pattern, *preprocess_and_tokenizer(), batch_size, num_samples, **settings),
                             epoch, skip_batches, consumed, bad)


def test_shards_have_sizes_and_captions(fmnist_data):
    shards = resolve_shards(fmnist_data["train"])
    assert len(shards) == 4
    assert count_samples(fmnist_data["train"]) == 2048
    sample = next(iter(wds.WebDataset(shards[0], shardshuffle=False).decode("pil")))
    assert sample["png"].size == (28, 28)
    assert sample["txt"].endswith(".") and any(c in sample["txt"] for c in ("dress", "bag", "coat", "shirt",
                                                                             "trouser", "sandal", "sneaker",
                                                                             "pullover", "boot"))


def test_stream_yields_full_batches_of_images_and_tokens(fmnist_data):
    s = stream(fmnist_data["train"], 2048, workers=2)
    batches = list(s.loader)
    assert len(batches) == s.num_batches == 64
    images, texts, bad = batches[0]
    assert images.shape == (32, 3, 28, 28) and texts.shape == (32, 16) and texts.dtype == torch.long
    assert bad["bad"] == 0 and bad["consumed"] == 32 and bad["new_bad"] == []


def test_epoch_order_is_seeded_and_resume_skips_exactly(fmnist_data):
    first = [t for _, t, _ in stream(fmnist_data["train"], 1024, seed=3, workers=1).loader]
    again = [t for _, t, _ in stream(fmnist_data["train"], 1024, seed=3, workers=1).loader]
    other = [t for _, t, _ in stream(fmnist_data["train"], 1024, seed=4, workers=1).loader]
    assert len(first) == len(again) == len(other) == 1024 // 32
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    resumed = list(stream(fmnist_data["train"], 1024, seed=3, workers=1, skip_batches=5).loader)
    # the trainer takes the epoch's remaining 32 - 5 batches from a resumed stream (islice): it must have them
    assert len(resumed) >= len(first) - 5
    tail = [t for _, t, _ in resumed][:len(first) - 5]
    assert len(tail) == 27 and all(torch.equal(a, b) for a, b in zip(first[5:], tail))


def test_round_robin_skip_counts():
    assert batches_per_worker_done(7, 2) == {0: 4, 1: 3}
    assert batches_per_worker_done(0, 3) == {0: 0, 1: 0, 2: 0}
    assert batches_per_worker_done(5, 0) == {0: 5}


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    def samples():
        for i in range(40):
            buf = io.BytesIO()
            Image.new("L", (28, 28), color=i).save(buf, format="PNG")
            png = buf.getvalue() if i % 10 else b"not a png at all"
            yield {"__key__": f"s{i:04d}", "png": png, "txt": f"caption {i}"}

    write_shards(samples(), tmp_path, "bad", shard_size=20)
    # 10 passes over the 36 good samples; the 4 corrupt ones of the last pass may or may not be reached yet
    s = stream(str(tmp_path / "bad-{0000..0001}.tar"), 360, batch_size=4, workers=0)
    batches = list(s.loader)
    assert len(batches) == 90 and all(len(b[0]) == 4 for b in batches)
    assert 36 <= batches[-1][2]["bad"] <= 40
    named = [name for batch in batches for name in batch[2]["new_bad"]]
    assert len(named) == batches[-1][2]["bad"] and named[0].startswith("bad-000") and "s00" in named[0]


def test_missing_shard_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing shard"):
        resolve_shards(str(tmp_path / "train-{0000..0003}.tar"))


def test_too_few_shards_for_workers(fmnist_data):
    with pytest.raises(UserError, match="cannot feed"):
        stream(fmnist_data["train"], 2048, workers=8)


def test_sizes_json_written(fmnist_data):
    sizes = json.loads((fmnist_data["root"] / "sizes.json").read_text())
    assert sizes == {f"train-{i:04d}.tar": 512 for i in range(4)}


def test_resampled_mode_draws_shards_with_replacement_per_seed(fmnist_data):
    def texts(seed):
        return [t for _, t, _ in stream(fmnist_data["train"], 512, seed=seed, workers=1, resampled=True).loader]

    first, again, other = texts(0), texts(0), texts(1)
    assert len(first) == 16 and all(t.shape == (32, 16) for t in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def noisy_shards(folder, corrupt_every=7):
    """4 shards x 40 noise images (so random crops differ), every `corrupt_every`-th image corrupt."""
    g = torch.Generator().manual_seed(0)

    def samples():
        for i in range(160):
            pixels = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8).numpy()
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            png = b"corrupt" if i % corrupt_every == 3 else buf.getvalue()
            yield {"__key__": f"s{i:04d}", "png": png, "txt": f"caption {i}"}

    write_shards(samples(), folder, "noisy", shard_size=40)
    return str(folder / "noisy-{0000..0003}.tar")


@pytest.mark.parametrize("resampled", [False, True], ids=["epoch", "resampled"])
def test_resume_from_a_stream_position_continues_bitwise(resampled, tmp_path):
    """After k batches (k odd, 2 workers, bad samples among them so batches x batch size is not the position),
    a stream resumed from the StreamPosition a checkpoint holds yields the unbroken stream's remaining batches:
    same images (augmentations seeded per sample), same tokens, same positions and bad counts."""
    pattern = noisy_shards(tmp_path)
    kw = dict(batch_size=8, seed=5, workers=2, resampled=resampled)
    unbroken = list(stream(pattern, 160, **kw).loader)
    assert len(unbroken) == 20
    k = 7
    position = StreamPosition()
    for _, _, report in unbroken[:k]:
        position.update(report)
    assert position.bad_samples > 0 and position.samples_read > k * 8
    resumed = list(stream(pattern, 160, skip_batches=k, consumed=position.consumed, bad=position.bad, **kw).loader)
    assert len(resumed) >= len(unbroken) - k
    for (i1, t1, r1), (i2, t2, r2) in zip(unbroken[k:], resumed):
        assert torch.equal(i1, i2) and torch.equal(t1, t2)
        assert (r1["worker"], r1["consumed"], r1["bad"], r1["new_bad"]) == \
            (r2["worker"], r2["consumed"], r2["bad"], r2["new_bad"])
    # the augmentations are random (a crop differs between epochs), only seeded
    other_epoch = next(iter(stream(pattern, 160, batch_size=8, epoch=1, seed=5, workers=0).loader))
    first = next(iter(stream(pattern, 160, batch_size=8, seed=5, workers=0).loader))
    assert not torch.equal(first[0], other_epoch[0])


def captioned_shards(folder, shards=4, per_shard=40):
    """Shards of distinct captions 'caption N', N = shard * per_shard + i: a sample's tokens name it."""
    def samples():
        for n in range(shards * per_shard):
            buf = io.BytesIO()
            Image.new("L", (28, 28), color=n % 250).save(buf, format="PNG")
            yield {"__key__": f"s{n:04d}", "png": buf.getvalue(), "txt": f"caption {n}"}

    write_shards(samples(), folder, "cap", shard_size=per_shard)
    return str(folder / f"cap-{{0000..{shards - 1:04d}}}.tar")


def test_two_ranks_read_disjoint_samples_that_cover_the_epoch_from_the_shards_they_name(tmp_path):
    """Each rank's stream (the trainer's own rank and world size, not environment variables) reads its share of
    the epoch's shuffled shards: the ranks' samples are disjoint, together they are every sample, and each comes
    from a shard that rank_shards — the trainer's 'reads shards' line — names for that rank."""
    pattern = captioned_shards(tmp_path)
    tokenizer = open_clip.get_tokenizer(TINY)
    caption_of = {tuple(tokenizer(f"caption {n}")[0].tolist()): n for n in range(160)}
    read = {}
    for rank in (0, 1):
        batches = list(stream(pattern, 160, batch_size=8, seed=3, workers=0, rank=rank, world_size=2).loader)
        read[rank] = [caption_of[tuple(row.tolist())] for _, texts, _ in batches for row in texts]
        named = {int(url.rsplit("-", 1)[1][:4]) for url in rank_shards(pattern, 3, 0, rank, 2)}
        assert {n // 40 for n in read[rank]} == named, (rank, named)
    assert len(read[0]) == len(set(read[0])) == 80 and len(read[1]) == len(set(read[1])) == 80
    assert set(read[0]).isdisjoint(read[1]) and set(read[0]) | set(read[1]) == set(range(160))
    # another epoch shuffles the shards anew: the line is per epoch
    assert any(rank_shards(pattern, 3, epoch, 0, 2) != rank_shards(pattern, 3, 0, 0, 2) for epoch in range(1, 6))


def test_rank_shards_list_a_missing_shard_the_trainer_tolerates(tmp_path):
    pattern = captioned_shards(tmp_path).replace("0003}", "0004}")  # cap-0004.tar does not exist
    named = rank_shards(pattern, 0, 0, 0, 2) + rank_shards(pattern, 0, 0, 1, 2)
    assert sorted(named) == [str(tmp_path / f"cap-{i:04d}.tar") for i in range(5)]


@pytest.mark.parametrize("samples,batch,world,workers,accum,expected", [
    (1000, 100, 1, 1, 2, 10),   # the example: 10 batches, 5 optimizer steps
    (1000, 100, 1, 2, 3, 12),   # 10 batches rounded up to whole rounds of 2 workers and whole steps of 3
    (2048, 32, 2, 2, 1, 32),    # open_clip's rule without accumulation
    (100, 32, 1, 0, 4, 4),      # workers=0 is one worker
])
def test_batches_per_epoch_are_whole_worker_rounds_and_whole_steps(samples, batch, world, workers, accum, expected):
    assert batches_per_epoch(samples, batch, world, workers, accum) == expected


def test_a_sample_never_takes_its_files_from_two_shards(tmp_path):
    """An image at the end of one shard and a caption under the same key at the start of the next are two bad
    samples (no caption, no image), not one good one."""
    def tar(path, members):
        with tarfile.open(path, "w") as f:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                f.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")
    png = buf.getvalue()
    tar(tmp_path / "x-0000.tar", [("a.png", png), ("a.txt", b"caption a"), ("k1.png", png)])
    tar(tmp_path / "x-0001.tar", [("k1.txt", b"caption k1"), ("b.png", png), ("b.txt", b"caption b")])
    batches = list(stream(str(tmp_path / "x-{0000..0001}.tar"), 2, batch_size=2, workers=0).loader)
    named = [name for batch in batches for name in batch[2]["new_bad"]]
    assert len(batches) == 1 and batches[0][2]["bad"] == 2, named
    assert sorted(n.split(":")[0] + ":" + n.split(":")[1] for n in named) == ["x-0000.tar:k1", "x-0001.tar:k1"]
