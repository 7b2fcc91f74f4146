"""`python -m mrl_clip truncate`: an export cut to its first m dims and first l layers is a smaller open_clip
export that plain open_clip loads, and its embeddings are the full model's re-normalised m-prefix at layer l
(mrl_clip.layers' exits).

The float32 bound: the kept blocks, norms and pooling are the same modules, weights, inputs and kernels on the
same number of threads, so the pooled features h reaching the projection are the same floats; what may differ is
the projection's reduction order (x @ W[:, :m] is another matmul than (x @ W)[:, :m]) and the normalisation. A dot
product of k terms in any order is within gamma_k * sum|h_i w_i| of the exact one (gamma_k = k u / (1 - k u),
u = 2^-24), so two orders differ by at most 2 gamma_k, and by Cauchy-Schwarz over the m outputs
    ||y' - y|| <= 2 gamma_(k+1) (||h|| ||W_m||_F + ||b_m||)        (k+1 terms with a bias).
Normalising: ||y'/||y'|| - y/||y|||| <= 2 ||y' - y|| / ||y||, and each float32 normalisation (m squares summed,
a square root, a division) is within gamma_(m+2) of exact, for both sides. ||h|| is measured: the same exit with
the projection taken out.
"""
import json
import os
import shutil
import subprocess
import sys
from copy import deepcopy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from mrl_clip import models, truncate
from mrl_clip.checkpoint import export_local_dir, nesting_record, read_nesting
from mrl_clip.layers import IMAGE, TEXT, tower_exits
from mrl_clip.towers import ALIGN_LITE, ALIGN_LITE_DIMS

from .conftest import ROOT, TINY, TINY_DIMS, one_line_exit, run_verb

CAPTIONS = ["a photo of a sandal", "an ankle boot", "a pullover on a white background", "trousers"]
U = 2.0 ** -24
PLAIN_OPEN_CLIP = """
import json, sys, numpy as np, torch, open_clip
from PIL import Image
torch.set_num_threads(int(sys.argv[3]))
folder, out = sys.argv[1], sys.argv[2]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
pixels = torch.stack([preprocess(Image.fromarray(a)) for a in np.load(out + ".images.npy")])
tokens = tokenizer(json.loads(sys.argv[4]))
with torch.no_grad():
    model.eval()
    torch.save({"pixels": pixels, "tokens": tokens,
                "image": model.encode_image(pixels, normalize=True),
                "text": model.encode_text(tokens, normalize=True)}, out)
assert "mrl_clip" not in sys.modules
"""


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def normalized_bound(h, weight, bias, reference):
    """Per row, the bound of the module docstring on || normalised truncated - normalised reference || (weight:
    [m, k] as a Linear holds it; reference: the unnormalised m-prefix)."""
    m, k = weight.shape
    bias_norm = 0.0 if bias is None else float(bias.norm())
    error = 2 * gamma(k + 1) * (h.norm(dim=-1) * weight.norm() + bias_norm)
    return 2 * error / reference.norm(dim=-1) + 2 * gamma(m + 2)


def tiny_export(folder, layers=4, seed=0, nesting=None):
    """A 4-layer MRL-Tiny-28 (both towers) exported as training exports it; untrained weights: the cut's
    exactness does not depend on them."""
    cfg = deepcopy(open_clip.get_model_config(TINY))
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = layers
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"]).eval()
    return export_local_dir(model, cfg, folder, nesting)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("tiny4") / "export", nesting=nesting_record(TINY_DIMS, [2, 4], [2, 4]))


def warnings_in(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def plain_open_clip(folder, tmp_path, env=None):
    """The export copied elsewhere (the original moved away meanwhile), loaded and run by plain open_clip in a
    process that never imports mrl_clip: its pixels, tokens and normalised embeddings."""
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, copy)
    for path in copy.iterdir():
        for local in (str(ROOT), str(folder.parent), os.path.expanduser("~")):
            assert local.encode() not in path.read_bytes(), (path, local)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    out = tmp_path / "plain.pt"
    np.save(str(out) + ".images.npy", pixels)
    hidden = folder.with_name(folder.name + "-moved-away")
    folder.rename(hidden)
    try:
        result = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(copy), str(out),
                                 str(torch.get_num_threads()), json.dumps(CAPTIONS)], capture_output=True, text=True,
                                cwd=tmp_path, timeout=300,
                                env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **(env or {})})
    finally:
        hidden.rename(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return pixels, torch.load(out)


def without_projection(model, tower):
    """A copy of `model` whose `tower` stops before its projection: tower_exits then gives h."""
    bare = deepcopy(model)
    if tower == IMAGE:
        bare.visual.proj = None
    elif hasattr(bare, "text_projection"):
        bare.text_projection = None
    else:
        bare.text.proj = torch.nn.Identity()
    return bare


def payload_bytes(path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header


def test_a_cut_tiny_vit_is_the_full_models_prefix_at_layer_l_in_plain_open_clip(tiny4, tmp_path, capfd):
    from PIL import Image

    m, layers = 48, {IMAGE: 3, TEXT: 2}
    out = tmp_path / "tiny-48"
    run_verb("truncate", "--model", f"local-dir:{tiny4}", "--dim", m, "--image-layers", layers[IMAGE],
             "--text-layers", layers[TEXT], "--out", out)
    stderr = capfd.readouterr().err
    # 48 and image depth 3 were not trained (dims 8..256, depths 2,4): one warning line names both
    assert len(warnings_in(stderr)) == 1 and "dim 48" in stderr and "image depth 3" in stderr, stderr
    assert "text depth" not in stderr
    pixels, plain = plain_open_clip(out, tmp_path)
    assert plain[IMAGE].shape == (3, m) and plain[TEXT].shape == (len(CAPTIONS), m)

    full, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny4}")
    full.eval()
    # preprocessing and tokenizer came along: the copy turns the same images and captions into the same tensors
    assert torch.equal(plain["pixels"], torch.stack([preprocess(Image.fromarray(a)) for a in pixels]))
    assert torch.equal(plain["tokens"], open_clip.get_tokenizer(f"local-dir:{tiny4}")(CAPTIONS))
    inputs = {IMAGE: plain["pixels"], TEXT: plain["tokens"]}
    weights = {IMAGE: full.visual.proj, TEXT: full.text_projection}
    with torch.no_grad():
        for tower, l in layers.items():
            reference = tower_exits(full, tower, inputs[tower], [l])[0][:, :m]
            h = tower_exits(without_projection(full, tower), tower, inputs[tower], [l])[0]
            bound = normalized_bound(h, weights[tower][:, :m].T, None, reference)
            error = (plain[tower] - F.normalize(reference, dim=-1)).norm(dim=-1)
            assert bool((error <= bound).all()), (tower, error, bound)
            # the bound tells layer l's exit from the full depth's: the depth was cut
            at_full_depth = F.normalize((full.encode_image if tower == IMAGE else full.encode_text)(inputs[tower])
                                        [:, :m], dim=-1)
            assert float((plain[tower] - at_full_depth).norm(dim=-1).min()) > 10 * float(bound.max())


def test_the_cut_is_smaller_on_disk_by_the_dropped_blocks_and_columns(tiny4, tmp_path):
    m, l = 32, 2
    out = tmp_path / "tiny-32"
    run_verb("truncate", "--model", f"local-dir:{tiny4}", "--dim", m, "--image-layers", l, "--out", out)
    state = open_clip.create_model(f"local-dir:{tiny4}").state_dict()
    dropped = sum(v.numel() for k, v in state.items()
                  if any(k.startswith(f"visual.transformer.resblocks.{i}.") for i in range(l, 4)))
    dropped += sum(state[k][:, m:].numel() for k in ("visual.proj", "text_projection"))
    weights = "open_clip_model.safetensors"
    assert payload_bytes(tiny4 / weights) - payload_bytes(out / weights) == 4 * dropped
    assert truncate.folder_bytes(out) < truncate.folder_bytes(tiny4)
    # trained dim and depth: no warning; the record keeps what the source nested below the cut
    assert read_nesting(out) == {"matryoshka_dimensions": [d for d in TINY_DIMS if d < m] + [m],
                                 "matryoshka_layers": {"image": [l], "text": [2, 4]}}


def test_a_source_without_nesting_record_warns_once(tiny4, tmp_path, capfd):
    old = tmp_path / "old-export"
    shutil.copytree(tiny4, old)
    config = json.loads((old / "open_clip_config.json").read_text())
    (old / "open_clip_config.json").write_text(json.dumps({k: config[k] for k in ("model_cfg", "preprocess_cfg")}))
    run_verb("truncate", "--model", f"local-dir:{old}", "--dim", 64, "--out", tmp_path / "cut")
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1 and "records no Matryoshka nesting" in lines[0] and "never trained" in lines[0]
    run_verb("truncate", "--model", f"local-dir:{tiny4}", "--dim", 64, "--out", tmp_path / "trained-cut")
    assert warnings_in(capfd.readouterr().err) == []


def bad_inputs(tiny4, tmp_path):
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    not_export = tmp_path / "not-export"
    not_export.mkdir()
    source = ["--model", f"local-dir:{tiny4}"]
    out = ["--out", tmp_path / "out"]
    return [(source + ["--dim", "257"] + out, "1..256"),
            (source + ["--dim", "0"] + out, "1..256"),
            (source + ["--dim", "-8"] + out, "1..256"),
            (source + ["--dim", "8.5"] + out, "invalid int"),
            (source + ["--text-layers", "5"] + out, "past the tower's depth 4"),
            (source + ["--image-layers", "0"] + out, "positive"),
            (["--model", f"local-dir:{tmp_path / 'missing'}", "--dim", "8"] + out, "no such folder"),
            (["--model", f"local-dir:{not_export}", "--dim", "8"] + out, "not an open_clip export"),
            (["--model", TINY, "--dim", "8"] + out, "local-dir:"),
            (source + ["--dim", "8", "--out", full], "not an empty folder"),
            (source + out, "nothing to cut")]


def test_bad_input_is_one_line_exit_2(tiny4, tmp_path, capfd):
    for argv, words in bad_inputs(tiny4, tmp_path):
        code, stderr = one_line_exit(truncate.main, argv, capfd)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (argv, stderr)
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "not-export"]  # no partial folder either


def test_an_interrupted_write_leaves_nothing(tiny4, tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        truncate.truncate(f"local-dir:{tiny4}", tmp_path / "cut", dim=16)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def align_source(towers_cache, tmp_path_factory):
    """ALIGN-Lite0-MiniLM-384 with its pretrained MiniLM (projections and image tower untrained), exported with
    its nesting record."""
    from huggingface_hub import constants

    folder = tmp_path_factory.mktemp("align") / "export"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(towers_cache["hub"]))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        torch.manual_seed(0)
        model = models.create(ALIGN_LITE)[0]
        export_local_dir(model.eval(), models.model_config(ALIGN_LITE), folder, nesting_record(ALIGN_LITE_DIMS))
    return folder


def test_align_cuts_its_dim_exactly_and_refuses_layers(align_source, towers_here, towers_env, tmp_path, capfd):
    m = 48
    out = tmp_path / "align-48"
    for flag, words in (("--text-layers", "Hugging Face text tower's depth cannot be cut"),
                        ("--image-layers", "not a transformer")):
        code, stderr = one_line_exit(truncate.main, ["--model", f"local-dir:{align_source}", "--dim", m, flag, 3,
                                                     "--out", out], capfd)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and words in stderr, stderr
    run_verb("truncate", "--model", f"local-dir:{align_source}", "--dim", m, "--out", out)
    assert warnings_in(capfd.readouterr().err) == []  # 48 is one of its trained dims
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    pixels, plain = plain_open_clip(out, tmp_path, env=towers_env)

    full, _, preprocess, tokenizer = models.create(f"local-dir:{align_source}")
    full.eval()
    from PIL import Image
    assert torch.equal(plain["pixels"], torch.stack([preprocess(Image.fromarray(a)) for a in pixels]))
    assert torch.equal(plain["tokens"], tokenizer(CAPTIONS))
    with torch.no_grad():
        # the EfficientNet has no layer exits: its reference is the full tower's prefix
        image = full.encode_image(plain["pixels"])[:, :m]
        head = full.visual.head.proj
        bound = normalized_bound(full.visual.trunk(plain["pixels"]), head.weight[:m], head.bias, image)
        assert bool(((plain[IMAGE] - F.normalize(image, dim=-1)).norm(dim=-1) <= bound).all())
        text = tower_exits(full, TEXT, plain["tokens"], [6])[0][:, :m]
        h = tower_exits(without_projection(full, TEXT), TEXT, plain["tokens"], [6])[0]
        bound = normalized_bound(h, full.text.proj.weight[:m], None, text)
        assert bool(((plain[TEXT] - F.normalize(text, dim=-1)).norm(dim=-1) <= bound).all())
    assert truncate.folder_bytes(out) < truncate.folder_bytes(align_source)
