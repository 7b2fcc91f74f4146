"""Evaluation on the (layer, dim) grid (--image-layers / --text-layers): the full-depth row is today's evaluation,
each shallower row is the same evaluation of a model cut by hand to its first l blocks, and each sample goes once
through its tower."""
import copy
import json
from collections import Counter

import open_clip
import pytest
import torch

from mrl_clip import models
from mrl_clip.eval import main as eval_main
from mrl_clip.eval.knn import knn_metrics
from mrl_clip.eval.zeroshot import encode_class_prompts, encode_images, load_classification_folder, zeroshot_metrics
from mrl_clip.eval.zeroshot_retrieval import encode_pairs, load_retrieval_folder, retrieval_metrics
from mrl_clip.towers import ALIGN_LITE

from .conftest import TINY, one_line_exit, run_verb

DIMS = [8, 32, 256]


@pytest.fixture(scope="module")
def export(trained_run):
    """The tiny trained export (2-block ViT and text towers), its preprocess and tokenizer."""
    name = f"local-dir:{trained_run['export']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return name, model.eval(), preprocess, open_clip.get_tokenizer(name)


def cut(model, image=None, text=None):
    """A copy of an open_clip CLIP model whose image / text transformer keeps only its first blocks: the
    independent reference for a shallower exit (its own encode_image / encode_text then run the cut tower)."""
    model = copy.deepcopy(model)
    if image is not None:
        model.visual.transformer.resblocks = model.visual.transformer.resblocks[:image]
    if text is not None:
        model.transformer.resblocks = model.transformer.resblocks[:text]
    return model


def evaluate(tmp_path, name, *argv):
    out = tmp_path / f"{name}.json"
    run_verb("eval", *argv, "--output", out)
    return json.loads(out.read_text())["models"]


def grid_rows(entry) -> dict:
    """{(image depth or None, text depth or None): metrics by dim} of an entry's grid."""
    return {(row.get("image_layers"), row.get("text_layers")): row["metrics"] for row in entry["grid"]}


def test_zeroshot_grid_rows_equal_todays_eval_and_cut_models(export, fmnist_data, tmp_path, capsys):
    name, model, preprocess, tokenizer = export
    common = ["zeroshot", "--model", name, "--data", fmnist_data["eval"], "--dims", ",".join(map(str, DIMS))]
    plain = evaluate(tmp_path, "plain", *common)
    (label,) = plain
    capsys.readouterr()
    layered = evaluate(tmp_path, "layered", *common, "--image-layers", "1", "--text-layers", "1",
                       "--plot", tmp_path / "zs.png")[label]
    table = capsys.readouterr().out
    assert layered["layers"] == {"image": [1, 2], "text": [1, 2]}
    assert layered["metrics"] == plain[label]["metrics"]
    rows = grid_rows(layered)
    assert list(rows) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert rows[(2, 2)] == plain[label]["metrics"]

    data = load_classification_folder(str(fmnist_data["eval"]), preprocess)
    for (image_depth, text_depth), metrics in rows.items():
        reference = cut(model, image_depth, text_depth)
        images, labels = encode_images(reference, data.dataset)
        prompts = encode_class_prompts(reference, tokenizer, data.classnames, data.templates)
        expected = zeroshot_metrics(images, labels, prompts, DIMS)
        assert metrics == {str(m): v for m, v in expected.items()}, (image_depth, text_depth)
        row = f"image {image_depth}, text {text_depth}  " + "  ".join(
            f"{100 * metrics[str(m)]['acc1']:.2f}" for m in DIMS)
        assert row in table
    assert (tmp_path / "zs_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_text_layers_equal_a_cut_text_tower(export, fmnist_data, tmp_path):
    name, model, preprocess, tokenizer = export
    common = ["retrieval", "--model", name, "--data", fmnist_data["captions"], "--dims", "8,256",
              "--recall-k", "1,5"]
    (plain,) = evaluate(tmp_path, "plain", *common).values()
    (layered,) = evaluate(tmp_path, "layered", *common, "--text-layers", "1").values()
    assert layered["layers"] == {"text": [1, 2]}
    rows = grid_rows(layered)
    assert list(rows) == [(None, 1), (None, 2)]
    assert rows[(None, 2)] == layered["metrics"] == plain["metrics"]
    images, texts, index = encode_pairs(cut(model, text=1), tokenizer,
                                        load_retrieval_folder(str(fmnist_data["captions"]), preprocess))
    expected = retrieval_metrics(images, texts, index, [8, 256], (1, 5))
    assert rows[(None, 1)] == {str(m): v for m, v in expected.items()}


def test_knn_image_layers_equal_a_cut_image_tower(export, fmnist_data, tmp_path):
    name, model, preprocess, _ = export
    common = ["knn", "--model", name, "--data", fmnist_data["eval"], "--dims", "16,256", "--k", "1,5",
              "--cache-dir", tmp_path / "cache"]
    (plain,) = evaluate(tmp_path, "plain", *common).values()
    (layered,) = evaluate(tmp_path, "layered", *common, "--image-layers", "1").values()
    rows = grid_rows(layered)
    assert list(rows) == [(1, None), (2, None)]
    assert rows[(2, None)] == layered["metrics"] == plain["metrics"]
    reference = cut(model, image=1)
    train = encode_images(reference, load_classification_folder(str(fmnist_data["eval"]), preprocess, "train",
                                                                 need_prompts=False).dataset)
    test = encode_images(reference, load_classification_folder(str(fmnist_data["eval"]), preprocess).dataset)
    expected = knn_metrics(train[0].numpy(), train[1].numpy(), test[0].numpy(), test[1].numpy(), [16, 256], (1, 5))
    assert rows[(1, None)] == {str(m): v for m, v in expected.items()}


def count_rows(blocks, batch_first: bool) -> Counter:
    """Hooks counting the samples each block runs on: {block index: rows seen}."""
    seen = Counter()
    for i, block in enumerate(blocks):
        def hook(_module, args, kwargs, _output, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] += hidden.shape[0 if batch_first else 1]
        block.register_forward_hook(hook, with_kwargs=True)
    return seen


def test_the_grid_runs_each_sample_once_through_each_block(export, fmnist_data, tmp_path, monkeypatch):
    name = export[0]
    create = models.create
    counts = []

    def counting_create(*args, **kwargs):
        made = create(*args, **kwargs)
        model = made[0]
        counts.append((count_rows(model.visual.transformer.resblocks, model.visual.transformer.batch_first),
                       count_rows(model.transformer.resblocks, model.transformer.batch_first)))
        return made

    monkeypatch.setattr(models, "create", counting_create)
    common = ["zeroshot", "--model", name, "--data", fmnist_data["eval"], "--dims", "8,256"]
    run_verb("eval", *common)
    run_verb("eval", *common, "--image-layers", "1,2", "--text-layers", "1,2")
    (plain_image, plain_text), (grid_image, grid_text) = counts
    data = load_classification_folder(str(fmnist_data["eval"]), export[2])
    samples = sum(1 for _ in data.dataset)
    assert plain_image == grid_image == {0: samples, 1: samples}
    prompts = len(data.classnames) * len(data.templates)
    assert plain_text == grid_text == {0: prompts, 1: prompts}


@pytest.fixture(scope="module")
def align(towers_cache):
    """ALIGN-Lite0-MiniLM-384 (timm image tower, 6-layer MiniLM text tower from the packaged towers)."""
    with pytest.MonkeyPatch.context() as patch:
        from huggingface_hub import constants

        patch.setattr(constants, "HF_HUB_CACHE", str(towers_cache["hub"]))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        model, _, _, tokenizer = models.create(ALIGN_LITE)
    return model.eval(), tokenizer


def cut_hf_text(model, layers: int):
    """A copy of an HF-text-tower model whose BERT encoder keeps only its first `layers` layers."""
    model = copy.deepcopy(model)
    model.text.transformer.encoder.layer = model.text.transformer.encoder.layer[:layers]
    model.text.transformer.config.num_hidden_layers = layers
    return model


def test_minilm_exits_equal_a_cut_encoder_from_one_pass(align):
    model, tokenizer = align
    classnames = ["t-shirt", "trouser", "a very long name of a pullover with many words", "dress"]
    templates = ["a photo of a {c}.", "{c}", "a blurry black and white photo of the {c}, seen from far away."]
    seen = count_rows(model.text.transformer.encoder.layer, batch_first=True)
    exits = encode_class_prompts(model, tokenizer, classnames, templates, layers=[2, 4, 6])
    assert dict(seen) == {i: len(classnames) * len(templates) for i in range(6)}
    assert exits.shape == (3, len(classnames), len(templates), 384)
    full = encode_class_prompts(model, tokenizer, classnames, templates)
    assert torch.equal(exits[-1], full)
    for index, layers in enumerate([2, 4]):
        reference = encode_class_prompts(cut_hf_text(model, layers), tokenizer, classnames, templates)
        torch.testing.assert_close(exits[index], reference, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(exits[index], full, atol=1e-3)  # a real exit, not the full depth again


def error_line(stderr: str) -> str:
    """The one error line (model loading may draw a progress bar before it; no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--text-layers", "3"], "go past the tower's depth 2"),
    (["--image-layers", "2,1"], "must be strictly increasing"),
    (["--text-layers", "0,2"], "must be positive integers"),
    (["--text-layers", "one"], "comma-separated integers"),
    (["--text-layers", "1", "--adaptor", "adaptor.safetensors"], "--adaptor is fit to the full-depth embeddings"),
])
def test_bad_layers_are_one_line(flags, message, fmnist_data, capfd):
    code, err = one_line_exit(eval_main.main, ["zeroshot", "--model", TINY, "--data", fmnist_data["eval"], *flags],
                              capfd)
    assert code == 2 and message in error_line(err)


def test_image_layers_on_the_align_cnn_and_text_layers_for_knn_are_one_line(towers_here, fmnist_data, capfd):
    code, err = one_line_exit(eval_main.main, ["zeroshot", "--model", ALIGN_LITE, "--data", fmnist_data["eval"],
                                               "--image-layers", "2"], capfd)
    assert code == 2 and "not a transformer" in error_line(err)
    code, err = one_line_exit(eval_main.main, ["knn", "--model", TINY, "--data", fmnist_data["eval"],
                                               "--text-layers", "1"], capfd)
    assert code == 2 and "--text-layers" in error_line(err)
