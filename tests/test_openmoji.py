"""pipelines.openmoji on a fixed sample of 80 emoji families, checked against the npm package itself: openmoji.json
and the colour SVGs read here with tarfile, images rendered here with resvg, shards read back with tarfile + PIL."""
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import resvg_py
from PIL import Image

from mrl_clip.errors import UserError
from pipelines import openmoji

from .conftest import TINY_DIMS, made_once, run_module

SIZE, LIMIT = 64, 80


@pytest.fixture(scope="session")
def moji_tarball(tmp_path_factory):
    return made_once(tmp_path_factory, "openmoji_npm", lambda folder: {"tarball": openmoji.fetch_package(folder)})


@pytest.fixture(scope="module")
def package(moji_tarball):
    """(openmoji.json entries by hexcode, {hexcode: colour SVG text}), read straight from the npm tarball."""
    with tarfile.open(moji_tarball["tarball"]) as tar:
        entries = json.load(tar.extractfile("package/data/openmoji.json"))
        assert json.load(tar.extractfile("package/package.json"))["version"] == "17.0.0"
        svgs = {Path(m.name).stem: tar.extractfile(m).read().decode() for m in tar
                if m.name.startswith("package/color/svg/")}
    return {e["hexcode"]: e for e in entries}, svgs


@pytest.fixture(scope="module")
def built(moji_tarball, tmp_path_factory):
    out = tmp_path_factory.mktemp("moji") / "a"
    result = run_module("pipelines.openmoji", "--out", out, "--tarball", moji_tarball["tarball"], "--size", SIZE,
                        "--limit", LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def render(svg: str) -> np.ndarray:
    png = resvg_py.svg_to_bytes(svg_string=svg, width=SIZE, height=SIZE, background="#ffffff")
    return np.asarray(Image.open(io.BytesIO(bytes(png))).convert("RGB"))


def read_tar(path) -> dict:
    """{key: {extension: bytes}} of a WebDataset tar (key: the member name before its first dot)."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    return np.asarray(image)


def tags_of(entry, by_hexcode):
    source = by_hexcode[entry["skintone_base_hexcode"]] if entry["skintone"] else entry
    return {t.strip().lower() for t in (source["tags"] + "," + source["openmoji_tags"]).split(",") if t.strip()}


def caption_kind(caption: str, entry: dict, tags: set) -> str:
    """Which documented caption this is for `entry`, or None."""
    annotation = entry["annotation"]
    listed = lambda text: {t.strip().lower() for t in text.split(",")} <= tags  # noqa: E731
    if caption == annotation:
        return "annotation"
    if caption == f"an emoji of {annotation}":
        return "an emoji of"
    if caption.startswith(f"{annotation}, ") and listed(caption[len(annotation) + 2:]):
        return "annotation, tags"
    if caption.startswith("emoji: ") and listed(caption[len("emoji: "):]):
        return "emoji: tags"
    return None


def train_samples(out: Path) -> dict:
    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in out.glob("openmoji-*.tar"))
    shards = {name: read_tar(out / name) for name in sorted(sizes)}
    assert {name: len(s) for name, s in shards.items()} == sizes
    return shards


def test_training_shards_pair_each_image_with_its_own_captions(built, package):
    by_hexcode, svgs = package
    shards = train_samples(built)
    assert len(shards) == 4  # one pass a shard
    seen = {}
    for p, samples in enumerate(shards.values()):
        hexcodes = [key.split("_", 1)[1] for key in samples]
        assert all(key.startswith(f"p{p}_") for key in samples) and len(set(hexcodes)) == len(hexcodes)
        for key, sample in samples.items():
            hexcode = key.split("_", 1)[1]
            entry = by_hexcode[hexcode]
            assert not entry["skintone"] and entry["group"] != "component"
            assert np.array_equal(pixels(sample["png"]), render(svgs[hexcode])), hexcode
            caption = sample["txt"].decode()
            kind = caption_kind(caption, entry, tags_of(entry, by_hexcode))
            assert kind is not None, (hexcode, caption)
            seen.setdefault(hexcode, []).append(kind)
    assert all(len(kinds) == 4 for kinds in seen.values())
    for hexcode, kinds in seen.items():  # four passes: each caption once, or the two untagged ones twice each
        expected = 4 if tags_of(by_hexcode[hexcode], by_hexcode) else 2
        assert len(set(kinds)) == expected and "annotation" in kinds, (hexcode, kinds)
    annotations = [by_hexcode[h]["annotation"].lower() for h in seen]
    assert len(set(annotations)) == len(annotations)


def test_heldout_folder_is_the_documented_disjoint_split(built, package):
    by_hexcode, svgs = package
    folder = built / "openmoji_heldout"
    assert (folder / "dataset_type.txt").read_text().strip() == "retrieval"
    assert (folder / "test" / "nshards.txt").read_text().strip() == "1"
    hexcodes = (folder / "hexcodes.txt").read_text().split()
    samples = read_tar(folder / "test" / "0.tar")
    assert sorted(samples) == [f"s{i:07d}" for i in range(len(hexcodes))]
    for key, hexcode in zip(sorted(samples), hexcodes):
        assert samples[key]["txt"].decode() == by_hexcode[hexcode]["annotation"]
        assert np.array_equal(pixels(samples[key]["png"]), render(svgs[hexcode])), hexcode
    train = {key.split("_", 1)[1] for s in train_samples(built).values() for key in s}
    family = lambda h: by_hexcode[h]["skintone_base_hexcode"] or h  # noqa: E731
    assert not {family(h) for h in train} & {family(h) for h in hexcodes}
    drawn = lambda h: int(hashlib.sha256(f"openmoji-heldout:{family(h)}".encode()).hexdigest()[:12], 16) < \
        0.15 * 16 ** 12  # noqa: E731
    assert all(drawn(h) for h in hexcodes) and not any(drawn(h) for h in train)
    assert 5 <= len(hexcodes) <= 25 and len(train) + len(hexcodes) >= LIMIT - 5  # ~15% of 80 families


def test_two_builds_are_identical_and_a_rebuild_needs_nothing(built, moji_tarball, tmp_path):
    other = openmoji.build(tmp_path / "b", SIZE, tarball=moji_tarball["tarball"], limit=LIMIT, processes=1)
    assert other["train"] == str(tmp_path / "b" / "openmoji-{0000..0003}.tar")
    for name in ["sizes.json", "openmoji_heldout/hexcodes.txt"]:
        assert (built / name).read_text() == (tmp_path / "b" / name).read_text()
    for a, b in [(built / f"openmoji-000{p}.tar", tmp_path / "b" / f"openmoji-000{p}.tar") for p in range(4)] + \
            [(built / "openmoji_heldout/test/0.tar", tmp_path / "b" / "openmoji_heldout/test/0.tar")]:
        assert read_tar(a) == read_tar(b), a.name
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*.tar")}
    # no npm on PATH and no tarball: a re-run with the same settings must not need the package
    result = run_module("pipelines.openmoji", "--out", built, "--size", SIZE, "--limit", LIMIT, "--cache",
                        tmp_path / "empty", env={"PATH": os.path.dirname(sys.executable)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{other['train_emoji']} train" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*.tar")} == before


def test_skin_tone_variants_train_beside_their_family_never_across_the_split(moji_tarball, package, tmp_path):
    by_hexcode, svgs = package
    made = openmoji.build(tmp_path, SIZE, tarball=moji_tarball["tarball"], limit=LIMIT, skin_tones=True, passes=1)
    train = [(key.split("_", 1)[1], s) for key, s in read_tar(tmp_path / "openmoji-0000.tar").items()]
    heldout = (tmp_path / "openmoji_heldout" / "hexcodes.txt").read_text().split()
    variants = [(h, s) for h, s in train if by_hexcode[h]["skintone"]]
    assert variants and made["train_emoji"] == len(train) and not any(by_hexcode[h]["skintone"] for h in heldout)
    for hexcode, sample in variants:
        entry = by_hexcode[hexcode]
        assert entry["skintone_base_hexcode"] not in heldout
        assert caption_kind(sample["txt"].decode(), entry, tags_of(entry, by_hexcode)) is not None
        assert np.array_equal(pixels(sample["png"]), render(svgs[hexcode]))
    # the sample holds held-out families that have variants, so the line above can fail
    assert any(e["skintone_base_hexcode"] in heldout for e in by_hexcode.values())


def test_eval_and_clip_benchmark_read_the_heldout_folder(built, trained_run, tmp_path):
    folder, model = built / "openmoji_heldout", f"local-dir:{trained_run['export']}"
    n = len((folder / "hexcodes.txt").read_text().split())
    result = run_module("clip_benchmark.cli", "eval", "--dataset", "wds/openmoji_heldout", "--dataset_root", folder,
                        "--model", model, "--pretrained", "none", "--task", "zeroshot_retrieval", "--no_amp",
                        "--recall_k", "1", "5", "--batch_size", "64", "--num_workers", "0",
                        "--output", tmp_path / "cb.json")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads((tmp_path / "cb.json").read_text())["metrics"]
    ours = run_module("mrl_clip.eval", "retrieval", "--model", model, "--data", folder, "--dims", "8,256",
                      "--recall-k", "1,5", "--output", tmp_path / "ours.json")
    assert ours.returncode == 0, ours.stderr[-2000:]
    metrics = json.loads((tmp_path / "ours.json").read_text())["metrics"]
    assert TINY_DIMS[-1] == 256 and set(metrics) == {"8", "256"} and set(metrics["256"]) == set(reference)
    for name, value in reference.items():
        assert abs(metrics["256"][name] - value) < 1e-4, (name, metrics["256"][name], value)
        for dim in ("8", "256"):  # n images and n captions: every recall is a multiple of 1/n
            assert abs(metrics[dim][name] * n - round(metrics[dim][name] * n)) < 1e-6, (dim, name)


def circle_and_rect(svg: str):
    ns = {"s": "http://www.w3.org/2000/svg"}
    color = ET.fromstring(svg).find(".//s:g[@id='color']", ns)
    return color.find("s:circle", ns), color.findall("s:rect", ns)


def test_rendered_colours_sit_where_the_svg_puts_them(package):
    _, svgs = package
    scale = 128 / 72  # the OpenMoji viewBox is 72 units
    face = pixels_128("1F600", svgs)
    circle, _ = circle_and_rect(svgs["1F600"])
    cx, cy, r = (float(circle.get(k)) for k in ("cx", "cy", "r"))
    cheek = face[round((cy + 0.1 * r) * scale), round((cx - 0.7 * r) * scale)]  # inside the face, off its features
    assert circle.get("fill").upper() == "#FCEA2B" and np.abs(cheek.astype(int) - (0xFC, 0xEA, 0x2B)).max() <= 3
    assert (face[:8, :8] == 255).all()
    flag = pixels_128("1F1E9-1F1EA", svgs)  # Germany: gold field, a red rect over it, then a black one
    gold, red, black = circle_and_rect(svgs["1F1E9-1F1EA"])[1][:3]
    for rect, y in [(gold, 49), (red, 36), (black, 23)]:
        top, height = float(rect.get("y")), float(rect.get("height"))
        assert top < y < top + height
        hex_colour = rect.get("fill", "#000000").lstrip("#")  # SVG's default fill is black
        expected = [int(hex_colour[i:i + 2], 16) for i in (0, 2, 4)]
        sample = flag[round(y * scale), round(36 * scale)]
        assert np.abs(sample.astype(int) - expected).max() <= 3, (rect.attrib, sample)


def pixels_128(hexcode, svgs):
    _, data, _ = openmoji.render((hexcode, svgs[hexcode], 128))
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and image.size == (128, 128)
    return np.asarray(image)


def test_bad_size_and_missing_npm_are_one_line_errors(tmp_path):
    bad_size = run_module("pipelines.openmoji", "--out", tmp_path / "out", "--size", "7")
    no_npm = run_module("pipelines.openmoji", "--out", tmp_path / "out", "--cache", tmp_path / "cache",
                        env={"PATH": os.path.dirname(sys.executable)})
    for result, message in [(bad_size, "--size must be 16..1024 pixels, not 7"), (no_npm, "npm not found")]:
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cache" / openmoji.TARBALL).exists()


@pytest.mark.parametrize("args, message", [
    (["--size", "big"], "invalid int value: 'big'"),
    (["--heldout-fraction", "1.5"], "--heldout-fraction must be between 0 and 1"),
    (["--tarball", "{file}"], "is not openmoji@17.0.0 (sha512 differs"),
    (["--out", "{file}"], "is a file, not a folder"),
])
def test_bad_input_is_a_user_error(tmp_path, args, message):
    (tmp_path / "file").write_text("not a tarball")
    argv = ["--out", str(tmp_path / "out")] + [a.format(file=tmp_path / "file") for a in args]
    with pytest.raises(UserError, match=re.escape(message)):
        openmoji.main(argv)
