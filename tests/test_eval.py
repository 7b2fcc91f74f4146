import json

import open_clip
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification
from torch.utils.data import DataLoader

from mrl_clip.eval import run_zeroshot
from mrl_clip.zeroshot import encode_class_prompts, encode_images, load_classification_folder, zeroshot_metrics

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
