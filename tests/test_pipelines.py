import csv
import json

import webdataset as wds
from PIL import Image

from mrl_clip.train.shards import resolve_shards

from .conftest import run_module


def make_images(folder, n):
    folder.mkdir()
    names = []
    for i in range(n):
        name = f"img{i}.png" if i % 2 else f"img{i}.jpg"
        Image.new("RGB", (32, 32), color=(i * 20, 0, 0)).save(folder / name)
        names.append(f"images/{name}")
    return names


def test_csv_to_shards_round_trip(tmp_path):
    names = make_images(tmp_path / "images", 7)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "extra"])
        for i, name in enumerate(names):
            writer.writerow([name, f"a red square number {i}", "x"])
    result = run_module("pipelines.captions_to_shards", "--input", tmp_path / "pairs.csv", "--out",
                        tmp_path / "shards", "--shard-size", "3")
    assert result.returncode == 0, result.stderr
    shards = resolve_shards(str(tmp_path / "shards" / "train-{0000..0002}.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert [s["txt"] for s in samples] == [f"a red square number {i}" for i in range(7)]
    assert samples[0]["jpg"].size == (32, 32) and samples[1]["png"].size == (32, 32)
    assert json.loads((tmp_path / "shards" / "sizes.json").read_text()) == \
        {"train-0000.tar": 3, "train-0001.tar": 3, "train-0002.tar": 1}


def test_jsonl_with_missing_image_is_a_one_line_error(tmp_path):
    names = make_images(tmp_path / "images", 2)
    rows = [{"image": names[0], "caption": "ok"}, {"image": "images/gone.png", "caption": "missing"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run_module("pipelines.captions_to_shards", "--input", tmp_path / "pairs.jsonl", "--out",
                        tmp_path / "shards")
    assert result.returncode == 2
    assert "pairs.jsonl:2: image not found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "shards").exists()  # every row is checked before anything is written
