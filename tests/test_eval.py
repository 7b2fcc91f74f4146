import json

import open_clip
import pytest
from clip_benchmark.metrics import zeroshot_classification
from torch.utils.data import DataLoader

from mrl_clip.eval.main import run_zeroshot
from mrl_clip.eval.zeroshot import (
    encode_class_prompts,
    encode_images,
    load_classification_folder,
    zeroshot_metrics,
)

from .conftest import TINY, TINY_DIMS, run_module


@pytest.fixture(scope="module")
def export_model(trained_run):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained_run['export']}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{trained_run['export']}")


def test_full_width_equals_clip_benchmark_evaluate(export_model, fmnist_data):
    model, preprocess, tokenizer = export_model
    data = load_classification_folder(str(fmnist_data["eval"]), preprocess)
    images, labels = encode_images(model, data.dataset)
    prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates)
    ours = zeroshot_metrics(images, labels, prompts, [256])[256]
    reference = zeroshot_classification.evaluate(
        model, DataLoader(data.dataset, batch_size=128), tokenizer, data.classnames, data.templates, "cpu",
        amp=False)
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours[name] - reference[name]) < 1e-4, (name, ours, reference)


def test_clip_benchmark_cli_reads_our_folder_and_agrees(trained_run, fmnist_data, tmp_path):
    out = tmp_path / "cb.json"
    result = run_module("clip_benchmark.cli", "eval", "--dataset", "wds/fashion_mnist_test",
                        "--dataset_root", fmnist_data["eval"], "--model", f"local-dir:{trained_run['export']}",
                        "--pretrained", "none", "--task", "zeroshot_classification", "--no_amp",
                        "--batch_size", "128", "--num_workers", "0", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(out.read_text())["metrics"]
    ours = run_zeroshot(f"local-dir:{trained_run['export']}", None, str(fmnist_data["eval"]), [256])
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours["metrics"]["256"][name] - reference[name]) < 1e-4, (name, ours, reference)


def test_each_dim_matches_a_float64_recomputation(export_model, fmnist_data):
    model, preprocess, tokenizer = export_model
    data = load_classification_folder(str(fmnist_data["eval"]), preprocess)
    images, labels = encode_images(model, data.dataset)
    prompts = encode_class_prompts(model, tokenizer, data.classnames, data.templates)
    metrics = zeroshot_metrics(images, labels, prompts, TINY_DIMS)
    for m in TINY_DIMS:
        img = images[:, :m].double()
        img = img / img.norm(dim=1, keepdim=True)
        per_prompt = prompts[..., :m].double()
        per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
        classifier = per_prompt.mean(dim=1)
        classifier = classifier / classifier.norm(dim=-1, keepdim=True)
        predicted = (img @ classifier.T).argmax(dim=1)
        acc1 = (predicted == labels).double().mean().item()
        recalls = [(predicted[labels == c] == c).double().mean().item() for c in labels.unique()]
        assert abs(metrics[m]["acc1"] - acc1) < 1e-9
        assert abs(metrics[m]["mean_per_class_recall"] - sum(recalls) / len(recalls)) < 1e-9


def test_eval_cli_writes_table_json_and_plot(trained_run, fmnist_data, tmp_path):
    result = run_module("mrl_clip.eval", "zeroshot", "--model", TINY, "--pretrained", trained_run["checkpoint"],
                        "--data", fmnist_data["eval"], "--dims", "8,64,256", "--output", tmp_path / "r.json",
                        "--plot", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mean_per_class_recall" in result.stdout.splitlines()[0]
    assert [line.split()[0] for line in result.stdout.splitlines()[2:]] == ["8", "64", "256"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"] == "zeroshot" and report["dims"] == [8, 64, 256]
    assert set(report["metrics"]["8"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_retrieval_full_width_equals_clip_benchmark_cli(trained_run, fmnist_data, tmp_path):
    out = tmp_path / "cb.json"
    result = run_module("clip_benchmark.cli", "eval", "--dataset", "wds/captions",
                        "--dataset_root", fmnist_data["captions"], "--model", f"local-dir:{trained_run['export']}",
                        "--pretrained", "none", "--task", "zeroshot_retrieval", "--no_amp", "--recall_k", "1", "5",
                        "10", "--batch_size", "64", "--num_workers", "0", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(out.read_text())["metrics"]
    ours = run_module("mrl_clip.eval", "retrieval", "--model", f"local-dir:{trained_run['export']}",
                      "--data", fmnist_data["captions"], "--dims", "16,256", "--output", tmp_path / "ours.json")
    assert ours.returncode == 0, ours.stderr[-2000:]
    report = json.loads((tmp_path / "ours.json").read_text())
    full = report["models"]["export"]["metrics"]["256"]
    assert set(full) == set(reference) and len(full) == 6
    for name, value in reference.items():
        assert abs(full[name] - value) < 1e-4, (name, full[name], value)
    # the single-model fields stay for older readers
    assert (report["model"], report["dims"], sorted(report["metrics"])) == \
        (f"local-dir:{trained_run['export']}", [16, 256], ["16", "256"])


def test_retrieval_on_a_classification_folder_is_a_one_line_error(fmnist_data):
    result = run_module("mrl_clip.eval", "retrieval", "--model", TINY, "--data", fmnist_data["eval"])
    assert result.returncode == 2 and "not a retrieval folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_puts_both_models_in_one_report_and_plot(trained_run, fmnist_data, tmp_path):
    result = run_module("mrl_clip.eval", "zeroshot", "--model", TINY, "--pretrained", trained_run["checkpoint"],
                        "--compare", f"local-dir:{trained_run['export']}", "--data", fmnist_data["eval"],
                        "--dims", "8,256", "--output", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["models"]) == [trained_run["checkpoint"].name, "export"]
    first, second = report["models"].values()
    assert first["metrics"] == second["metrics"]  # the same weights, as a checkpoint and as an export
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_linear_probe_cli_learns_saves_heads_beside_checkpoint_and_caches(trained_run, fmnist_data, tmp_path):
    from mrl_clip.heads import load_heads

    cache = tmp_path / "cache"
    args = ["mrl_clip.eval", "linear-probe", "--model", TINY, "--pretrained", trained_run["checkpoint"],
            "--data", fmnist_data["eval"], "--dims", "8,32,256", "--cache-dir", cache,
            "--output", tmp_path / "lp.json", "--plot", tmp_path / "lp.png"]
    result = run_module(*args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "lp.json").read_text())
    label = trained_run["checkpoint"].name
    assert set(report["models"]) == {f"{label} [mrl]", f"{label} [mrl-e]", f"{label} [fixed]"}
    for entry in report["models"].values():
        for dim in ("8", "32", "256"):
            assert entry["metrics"][dim]["lp_acc1"] > 0.4  # 10 classes: chance is 0.1
        assert "weight_decay" in entry["probe"]["chosen"]
    # heads live beside the checkpoint, not in its state_dict, and reload to the reported accuracy's inputs
    heads_dir = trained_run["checkpoint"].parent / f"{trained_run['checkpoint'].stem}.heads"
    heads, meta = load_heads(heads_dir / "mrl-e.safetensors")
    assert heads.efficient and heads.dims == [8, 32, 256] and meta["kind"] == "mrl-e"
    assert meta["feature_mean"].shape == (256,)
    # one cache entry per split at full width, reused by a second run with other dims
    assert len(list(cache.glob("features-*.pt"))) == 2
    again = run_module(*args[:-6], "--dims", "16,256", "--cache-dir", cache, "--probes", "mrl",
                       env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train images" not in again.stderr  # nothing re-encoded
    assert len(list(cache.glob("features-*.pt"))) == 2


def test_cascade_cli_zero_shot(trained_run, fmnist_data, tmp_path):
    result = run_module("mrl_clip.eval", "cascade", "--model", f"local-dir:{trained_run['export']}",
                        "--data", fmnist_data["eval"], "--dims", "8,32,256", "--cache-dir", tmp_path,
                        "--output", tmp_path / "c.json")
    assert result.returncode == 0, result.stderr[-2000:]
    cascade = json.loads((tmp_path / "c.json").read_text())["models"]["export"]["cascade"]
    assert 8 <= cascade["expected_dim"] <= 256
    assert sum(cascade["answered_at"].values()) == 250  # the reported half of 500 test images
    assert [p["threshold"] for p in cascade["frontier"]] == sorted(p["threshold"] for p in cascade["frontier"])
