"""Property-based tests: the shard reader and the CSV/JSONL ingest on random and malformed input fail only in the
documented ways (bad samples counted and named; UserError for bad ingest files), never with anything else."""
import csv
import io
import json
import re
import tarfile
import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
import webdataset as wds
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mrl_clip.errors import UserError
from mrl_clip.train.stream import StreamSettings, make_train_stream
from pipelines import captions_to_shards

from .conftest import TINY

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color=(color, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def preprocess_and_tokenizer():
    _, preprocess, _ = open_clip.create_model_and_transforms(TINY)
    return preprocess, open_clip.get_tokenizer(TINY)


member_names = st.one_of(
    st.builds(lambda k, e: f"{k}.{e}", st.sampled_from(["a", "b", "c", "dir/d", "x.y"]),
              st.sampled_from(["png", "jpg", "txt", "json", "PNG", "cls", ""])),
    st.text(min_size=1, max_size=20).filter(lambda n: "\x00" not in n))
member_data = st.one_of(st.builds(png, st.integers(0, 255)), st.binary(max_size=64),
                        st.text(max_size=30).map(str.encode), st.just(b""))
good_pair = st.builds(lambda key, color, caption: [(f"{key}.png", png(color)), (f"{key}.txt", caption.encode())],
                      st.sampled_from(["k1", "k2", "k3"]), st.integers(0, 255), st.text(min_size=1, max_size=20))
members = st.lists(st.one_of(good_pair, st.tuples(member_names, member_data).map(lambda m: [m])), max_size=6).map(
    lambda groups: [m for group in groups for m in group])
# whole shards twice as often, so that passes with enough good samples for a batch are common
shard = st.tuples(members, st.sampled_from(["whole", "whole", "truncated", "garbage", "empty"]), st.floats(0, 1),
                  st.binary(max_size=300))


def write_shard(path: Path, members, damage, cut, garbage):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    raw = {"whole": raw, "truncated": raw[: int(len(raw) * cut)], "garbage": garbage, "empty": b""}[damage]
    path.write_bytes(raw)


def readable_members(path: Path) -> list:
    """(name, bytes) of the regular files Python's tarfile reads from a shard, in order, up to any damage."""
    members = []
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    try:
                        members.append((info.name, tar.extractfile(info).read()))
                    except tarfile.TarError:  # a member cut short
                        pass
    except Exception:  # unreadable or truncated: what came before stands
        pass
    return members


def group_samples(members) -> list:
    """WebDataset's naming (the key is the path up to the first dot of the file name, the extension the rest,
    lower-cased; __meta__ files skipped) and open_clip's grouping: consecutive files with one key make a sample,
    and a repeated extension starts a new one; one shard's members (a sample never spans two shards)."""
    samples = []
    for name, data in members:
        if re.match(r"__[^/]*__($|/)", name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
        if not match:
            continue
        key, extension = match.group(1), match.group(2).lower()
        if not samples or samples[-1]["__key__"] != key or extension in samples[-1]:
            samples.append({"__key__": key})
        samples[-1][extension] = data
    return samples


def reference_decode(sample: dict, preprocess, tokenizer):
    """(image tensor, token ids) of a good sample decoded independently of the reader: PIL, the model's
    preprocess and open_clip's tokenizer; None for a bad one (no non-blank UTF-8 caption, or no image PIL decodes;
    the reader takes jpg, png, jpeg, webp first). The only images PIL decodes here are the uniform PNGs of png():
    RandomResizedCrop of a uniform image is that colour at any crop, so the reader's seeded augmentation and
    this unseeded one give the same tensor."""
    image = next((sample[k] for k in ("jpg", "png", "jpeg", "webp") if k in sample), None)
    if image is None or "txt" not in sample:
        return None
    try:
        text = sample["txt"].decode("utf-8")
        if not text.strip():
            return None
        with Image.open(io.BytesIO(image)) as decoded:
            rgb = decoded.convert("RGB")
    except Exception:
        return None
    return preprocess(rgb), tokenizer(text)[0]


def shard_samples(paths: list) -> list:
    """(shard name, sample) for one pass over the shards (each shard grouped on its own, any shard order)."""
    return [(path.name, sample) for path in paths for sample in group_samples(readable_members(path))]


def take_matching(pair, references: list) -> bool:
    """Remove from `references` one (image, tokens) exactly equal to `pair`; False when none is."""
    for i, (image, tokens) in enumerate(references):
        if torch.equal(image, pair[0]) and torch.equal(tokens, pair[1]):
            del references[i]
            return True
    return False


REASONS = r"no image|no caption|caption is not UTF-8|empty caption|undecodable \w+ \(\w+\)"


@FUZZ
@given(shards=st.lists(shard, min_size=1, max_size=3))
def test_shard_reader_survives_random_and_malformed_shards(shards, preprocess_and_tokenizer):
    preprocess, tokenizer = preprocess_and_tokenizer
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"f-{i:04d}.tar" for i in range(len(shards))]
        for path, spec in zip(paths, shards):
            write_shard(path, *spec)
        samples = shard_samples(paths)
        decoded = [(name, sample, reference_decode(sample, preprocess, tokenizer)) for name, sample in samples]
        references = [ref for _, _, ref in decoded if ref is not None]
        bad_keys = {(name, sample["__key__"]) for name, sample, ref in decoded if ref is None}
        pattern = f"{folder}/f-{{0000..{len(shards) - 1:04d}}}.tar"
        loader = make_train_stream(StreamSettings(pattern, preprocess, tokenizer, batch_size=2, num_samples=4,
                                                  workers=0), epoch=0).loader
        batches = list(loader)
    good = len(references)
    # 2 batches of 2 make the epoch; a pass over the shards yields (good samples) // 2 full batches and is repeated
    # while it yields any, so: 2 batches when a pass holds 2 good samples, none when it does not
    event(f"good samples per pass: {min(good, 2)}+")
    assert len(batches) == (2 if good >= 2 else 0), (good, len(batches))
    named = []
    for images, texts, report in batches:
        assert images.shape == (2, 3, 28, 28) and texts.shape == (2, 16)
        # each batch is two distinct good samples of one pass, as PIL, preprocess and the tokenizer decode them
        left = list(references)
        assert all(take_matching(pair, left) for pair in zip(images, texts)), (good, texts)
        named += report["new_bad"]
    if good >= 4:  # both batches from the first pass: four distinct good samples
        left = list(references)
        assert all(take_matching(pair, left) for images, texts, _ in batches for pair in zip(images, texts))
    # every bad sample a batch reports is counted, and named shard:key (a sample the independent grouping finds
    # bad) or by its shard's error
    assert not batches or batches[-1][2]["bad"] == len(named)
    assert all("f-000" in name for name in named), named
    for name in named:
        sample_error = re.fullmatch(rf"(f-\d{{4}}\.tar):(.*): ({REASONS})", name, flags=re.S)
        if sample_error:
            assert sample_error.group(1, 2) in bad_keys, (name, bad_keys)


def make_images(folder: Path) -> dict:
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # exists: decoding is the loader's business
    return {"ok": "images/ok.png", "broken": "images/broken.jpg", "missing": "images/gone.png",
            "wrong type": "images/notes.txt", "empty": ""}


captions = st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers(), max_size=2))
rows = st.lists(st.tuples(st.sampled_from(["ok", "broken", "missing", "wrong type", "empty"]), captions),
                max_size=6)


def expect_ok(table) -> bool:
    return bool(table) and all(kind in ("ok", "broken") and isinstance(c, str) and c.strip() for kind, c in table)


@FUZZ
@given(table=rows, fmt=st.sampled_from(["csv", "jsonl"]))
def test_ingest_of_random_rows_writes_every_caption_or_says_why_not(table, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_images(tmp / "images")
        path = tmp / f"pairs.{fmt}"
        if fmt == "csv":
            table = [(kind, c if isinstance(c, str) else "" if c is None else str(c)) for kind, c in table]
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "caption"])
                writer.writerows([images[kind], c] for kind, c in table)
        else:
            path.write_text("".join(json.dumps({"image": images[kind] or None, "caption": c}) + "\n"
                                    for kind, c in table), encoding="utf-8")
        try:
            captions_to_shards.main(["--input", str(path), "--out", str(tmp / "out"), "--shard-size", "2"])
        except UserError as err:
            assert not expect_ok(table) or "holds no rows" in str(err), (table, err)
            return
        assert expect_ok(table), table
        shards = sorted(str(p) for p in (tmp / "out").glob("train-*.tar"))
        stored = [s["txt"] for s in wds.WebDataset(shards, shardshuffle=False).decode()]
        # csv.writer/reader turn "\r" in a field into "\n" only inside quotes; both keep the text
        assert stored == [c for _, c in table]


@FUZZ
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".csv", ".jsonl"]))
def test_ingest_of_random_bytes_is_a_user_error_or_nothing_to_write(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"pairs{suffix}"
        path.write_bytes(content)
        try:
            captions_to_shards.main(["--input", str(path), "--out", str(Path(tmp) / "out")])
        except UserError:
            return
        raise AssertionError(f"random bytes were accepted as pairs: {content!r}")
