import csv
import json
from pathlib import Path

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


def test_demo_knn_fewshot_and_adaptor_parts(trained_run, fmnist_data, tmp_path, monkeypatch):
    """The demo's k-NN / few-shot step and its adaptor step on the tiny trained model (standing in for both of an
    act's models): every dim in the JSON, accuracies in range and above chance, the plots written; the chosen
    adaptor's held-out scores from training rows; through the linear (orthogonal) adaptor the full-width 1-NN is the
    model's own, as full-width similarities are kept."""
    from pipelines import demo_adapt, demo_neighbours

    dims, runs = [8, 32, 256], {"mrl": trained_run["dir"], "standard": trained_run["dir"]}
    settings = demo_neighbours.NeighbourSettings(ks=(1, 5), shots=(1, 5), draws=2, long_tail_largest=20)
    results = demo_neighbours.run(runs, fmnist_data["eval"], tmp_path, dims, settings)
    for task, names in (("knn", ["knn1_acc1", "knn5_acc1"]),
                        ("fewshot", ["fewshot1_ncm_acc1", "fewshot5_lp_acc1", "longtail_ncm_acc1_rare"])):
        saved = json.loads((tmp_path / f"{task}.json").read_text())["models"]
        assert len(saved) == 2 and (tmp_path / f"{task}.png").stat().st_size > 10_000
        for entry in saved.values():
            assert sorted(entry["metrics"], key=int) == [str(d) for d in dims]
            assert all(0.1 < entry["metrics"][str(d)][n] <= 1 for d in dims for n in names)  # 10 classes
    assert results["knn"]["mrl"]["metrics"]["256"]["knn1_acc1"] > 0.5

    monkeypatch.setattr(demo_adapt, "CANDIDATES", {"lr 1e-2": ["--lr", "1e-2"]})  # one setting: the test's budget
    plan = demo_adapt.AdaptPlan(pairs=300, steps=20, batch_size=128, held_out=0.2)
    adaptors = demo_adapt.adapt_standard(trained_run["dir"], fmnist_data["train"], tmp_path / "adaptor", dims, plan)
    for kind, fitted in adaptors.items():
        assert fitted["chosen"] == "lr 1e-2" and 0 < fitted["scores"]["lr 1e-2"] <= 1
        report = json.loads(Path(fitted["adaptor"]).with_suffix(".report.json").read_text())
        assert report["held_out_rows"] == 60 and sorted(report["metrics"], key=int) == [str(d) for d in dims]
    adapted = demo_adapt.evaluate_adapted(trained_run["dir"], adaptors, [("knn", fmnist_data["eval"], ["--k", "1"])],
                                          tmp_path / "adaptor", dims)
    assert list(adapted) == ["standard + images adaptor", "standard + pairs adaptor"]
    own = results["knn"]["standard"]["metrics"]["256"]["knn1_acc1"]
    for entry in adapted.values():
        assert sorted(entry["metrics"], key=int) == [str(d) for d in dims]
        # float32 rounding may flip a near-tie: at most a test image or two of the 500
        assert abs(entry["metrics"]["256"]["knn1_acc1"] - own) <= 2 / 500
