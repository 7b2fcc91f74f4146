"""`python -m mrl_clip export --to transformers`: the folder loads in plain transformers (a process without mrl_clip,
from a copy) and computes open_clip's features; its tokenizer, image processor, zero-shot pipeline and
sentence-transformers' loading agree with open_clip's and mrl_clip.eval's.

The float32 bound (tests/numerics.py's model): both sides compute the same exact function in float32 with other
kernels (a packed or split q/k/v projection, another attention kernel), so each is within the probabilistic bound
LAMBDA u sqrt(N) ||row||_inf of the exact (float64) features, N the summed accumulation lengths of the tower's
forward pass (forward_roundings); the test checks open_clip float32 and transformers float32 against open_clip run
in float64. A wrong mapping (q/k swapped, GELU for QuickGELU, another pooled token) is off by ~1e-1, 10^3x it.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from mrl_clip import export, models
from mrl_clip.checkpoint import export_local_dir, nesting_record, read_nesting
from pipelines import fashion_mnist

from .conftest import TINY, TINY_DIMS, one_line_exit, run_verb
from .numerics import LAMBDA, U32
from .test_truncate import align_source  # noqa: F401  (the ALIGN export fixture)

CAPTIONS = ["a photo of a Sandal.", "Hello, World!!", "an ANKLE boot; (size 42) - $19.99?", "café crème brûlée",
            "Über-große Ärger", "emoji 🐱🚀 ok", "猫の写真", "  spaces\tand\nnewlines  ", "it's don't we'll",
            "a very long caption about a pullover on a white background " * 3]
# open_clip cleans text with ftfy.fix_text and html.unescape before BPE; transformers' CLIPTokenizer does NFC only
CLEANED_DIFFERENTLY = ["A&amp;B <b>bold</b>", "ﬁ ligature"]
PLAIN = r"""
import json, sys, numpy as np, torch, open_clip
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer
src, copy, out, captions = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
oc, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + src)
oc.eval()
tokens = open_clip.get_tokenizer("local-dir:" + src)(captions)
pixels = torch.stack([preprocess(Image.fromarray(a)) for a in np.load(out + ".images.npy")])
hf = CLIPModel.from_pretrained(copy).eval()
hf_tok = CLIPTokenizer.from_pretrained(copy)
hf_ids = hf_tok(captions, padding="max_length", truncation=True, return_tensors="pt")
def pooled(x):
    return getattr(x, "pooler_output", x)
with torch.no_grad():
    r = {"tokens": tokens, "hf_ids": hf_ids["input_ids"], "max_length": hf_tok.model_max_length,
         "oc_image": oc.encode_image(pixels), "oc_text": oc.encode_text(tokens),
         "hf_image": pooled(hf.get_image_features(pixel_values=pixels)),
         "hf_text": pooled(hf.get_text_features(input_ids=tokens)),
         "hf_text_own": pooled(hf.get_text_features(**hf_ids)),
         "hf_scale": hf.logit_scale.detach(), "oc_scale": oc.logit_scale.detach()}
    oc.double()
    r["exact_image"], r["exact_text"] = oc.encode_image(pixels.double()), oc.encode_text(tokens)
torch.save(r, out)
assert "mrl_clip" not in sys.modules
"""


def forward_roundings(width, tokens, layers, heads, inputs):
    """N for one tower: per block two LayerNorms (4w each), q/k/v, out, fc1 (w terms each), fc2 (4w), the scores
    (w / heads) and the softmax sum and weighted values (tokens each); the patch or token embedding (`inputs`),
    the final LayerNorm and the projection."""
    block = 2 * 4 * width + 4 * width + 4 * width + width // heads + 2 * tokens
    return layers * block + inputs + 4 * width + width


def tolerance(exact, n):
    return LAMBDA * U32 * math.sqrt(n) * exact.abs().amax(-1, keepdim=True)


def perturbed_export(folder, name=TINY, quick_gelu=False, seed=0):
    """`name` with open_clip's init plus noise on every tensor (LayerNorms and biases are not 1 and 0, so a
    swapped weight/bias or q/k split shows), exported as training exports it."""
    cfg = {**models.model_config(name), **({"quick_gelu": True} if quick_gelu else {})}
    torch.manual_seed(seed)
    model = open_clip.create_model(name, force_quick_gelu=quick_gelu)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key != "logit_scale":
                p.add_(torch.randn_like(p) * 0.05)
    return export_local_dir(model, cfg, folder, nesting_record(TINY_DIMS, [1, 2], [2]))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    src = perturbed_export(base / "export")
    run_verb("export", "--to", "transformers", "--model", f"local-dir:{src}", "--out", base / "hf")
    return src, base / "hf"


def test_plain_transformers_from_a_copy_gives_open_clips_features(tiny_hf, tmp_path):
    src, hf = tiny_hf
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(hf, copy)
    out = tmp_path / "plain.pt"
    np.save(str(out) + ".images.npy", np.random.default_rng(0).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8))
    result = subprocess.run([sys.executable, "-c", PLAIN, str(src), str(copy), str(out), json.dumps(CAPTIONS)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    r = torch.load(out)
    n_image = forward_roundings(128, 50, 2, 2, 3 * 4 * 4)
    n_text = forward_roundings(128, 16, 2, 2, 1)
    for tower, n in (("image", n_image), ("text", n_text)):
        exact = r[f"exact_{tower}"]
        bound = tolerance(exact, n)
        for side in ("oc", "hf"):
            error = (r[f"{side}_{tower}"].double() - exact).abs()
            assert (error <= bound).all(), (tower, side, float(error.max()), float(bound.min()))
    assert torch.equal(r["hf_scale"], r["oc_scale"])
    # transformers' own tokenizer: the same ids up to EOT for all of these; it pads with EOT (49407), open_clip
    # with 0, which the causal mask keeps out of the pooled EOT token: the same features
    assert r["max_length"] == 16
    tokens, ids = r["tokens"], r["hf_ids"]
    ends = tokens.argmax(-1)
    for i in range(len(CAPTIONS)):
        assert torch.equal(ids[i, :ends[i] + 1], tokens[i, :ends[i] + 1]), CAPTIONS[i]
        assert (ids[i, ends[i] + 1:] == 49407).all() and (tokens[i, ends[i] + 1:] == 0).all()
    assert (ends == 15).any()  # the long caption is cut at the context length, EOT last in both
    error = (r["hf_text_own"].double() - r["exact_text"]).abs()
    assert (error <= tolerance(r["exact_text"], n_text)).all()


def test_tokenizer_differs_only_by_open_clips_text_cleaning(tiny_hf):
    from open_clip.tokenizer import basic_clean
    from transformers import CLIPTokenizer

    src, hf = tiny_hf
    ours = open_clip.get_tokenizer(f"local-dir:{src}")
    theirs = CLIPTokenizer.from_pretrained(hf)
    for text in CLEANED_DIFFERENTLY:
        expected = ours([text])[0]
        end = int(expected.argmax())
        raw = theirs(text)["input_ids"]
        assert raw != expected[:end + 1].tolist(), text  # the stated difference: ftfy / html unescaping
        assert theirs(basic_clean(text))["input_ids"] == expected[:end + 1].tolist(), text


def test_config_carries_the_models_shape_and_nesting(tiny_hf):
    src, hf = tiny_hf
    config = json.loads((hf / "config.json").read_text())
    model = open_clip.create_model(f"local-dir:{src}")
    assert {k: config[k] for k in ("matryoshka_dimensions", "matryoshka_layers")} == read_nesting(src)
    assert config["text_config"]["max_position_embeddings"] == model.context_length
    assert config["vision_config"]["image_size"] == model.visual.image_size[0]
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "gelu"
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_quick_gelu_is_carried(tmp_path):
    from transformers import CLIPModel

    src = perturbed_export(tmp_path / "export", quick_gelu=True)
    run_verb("export", "--to", "transformers", "--model", f"local-dir:{src}", "--out", tmp_path / "hf")
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    oc = open_clip.create_model(f"local-dir:{src}").eval()
    assert isinstance(oc.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert hf.config.text_config.hidden_act == "quick_gelu"
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        got = hf.get_image_features(pixel_values=pixels)
        got = getattr(got, "pooler_output", got)
        exact = oc.double().encode_image(pixels.double())
    assert ((got.double() - exact).abs() <= tolerance(exact, forward_roundings(128, 50, 2, 2, 48))).all()


def test_image_processor_gives_open_clips_pixels_up_to_its_crop_offset(tiny_hf, image_folder):
    """Real PIL images, at 28x28 and resized to other shapes. The PIL backend resizes as open_clip (PIL bicubic);
    its centre crop starts at (excess) // 2 where torchvision's CenterCrop rounds (excess) / 2 half to even: one
    pixel apart when excess % 4 == 3, and then equal to open_clip's resized image cropped at excess // 2."""
    from PIL import Image
    from torchvision.transforms.functional import crop
    from transformers import AutoImageProcessor

    src, hf = tiny_hf
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{src}")
    resize, rest = preprocess.transforms[0], preprocess.transforms[2:]
    pil = AutoImageProcessor.from_pretrained(hf, backend="pil")
    default = AutoImageProcessor.from_pretrained(hf)
    photos = [Image.open(p) for p in sorted(image_folder.iterdir())[:4]]
    shifted = 0
    for photo in photos + [photos[0].resize(s, Image.BICUBIC) for s in ((33, 40), (100, 64), (28, 31), (28, 30))]:
        ours = preprocess(photo)
        theirs = pil(images=photo, return_tensors="pt")["pixel_values"][0]
        big = resize(photo)
        top, left = (big.height - 28) // 2, (big.width - 28) // 2
        if (big.height - 28) % 4 == 3 or (big.width - 28) % 4 == 3:
            shifted += 1
            assert (ours - theirs).abs().max() > 0.1
        ours = crop(big, top, left, 28, 28)
        for t in rest:
            ours = t(ours)
        assert (ours - theirs).abs().max() <= 1e-6
        if photo.size == (28, 28):  # no resize: the default (torchvision) backend is equal too
            assert (default(images=photo, return_tensors="pt")["pixel_values"][0] - theirs).abs().max() <= 1e-6
    assert shifted == 2  # 100x64 (excess 15) and 28x31 (excess 3)


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    """40 Fashion-MNIST test images in CLIP_benchmark's layout with one prompt template."""
    folder = fashion_mnist.build_eval_folder(fashion_mnist.DEBIAN_DIR, tmp_path_factory.mktemp("zs") / "fm40",
                                             limit=40)
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    return folder


def test_zero_shot_pipeline_matches_mrl_clip_eval(tiny_hf, small_eval, tmp_path):
    """The perturbed untrained tiny model (the trained fixture's training is the suite's costliest setup): its
    predictions are arbitrary but decided, the same in the pipeline, in mrl_clip.eval and in open_clip."""
    from PIL import Image
    from transformers import pipeline

    src, hf = tiny_hf
    report = tmp_path / "zs.json"
    run_verb("eval", "zeroshot", "--model", f"local-dir:{src}", "--data", small_eval,
             "--dims", "256", "--output", report, "--workers", "0")
    acc1 = json.loads(report.read_text())["metrics"]["256"]["acc1"]
    images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")
    photos = [Image.fromarray(a) for a in images[:40]]
    classify = pipeline("zero-shot-image-classification", model=str(hf), device="cpu")
    names = list(fashion_mnist.CLASSNAMES)
    found = classify(photos, candidate_labels=names, hypothesis_template="a photo of a {}.",
                     num_workers=0, batch_size=40)
    top1 = [names.index(scores[0]["label"]) for scores in found]
    assert np.mean(np.array(top1) == labels[:40]) == pytest.approx(acc1, abs=1e-12)
    model, _, preprocess, tokenizer = models.create(f"local-dir:{src}")
    with torch.no_grad():
        image = F.normalize(model.eval().encode_image(torch.stack([preprocess(p) for p in photos])), dim=-1)
        text = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in names])), dim=-1)
    assert top1 == (image @ text.T).argmax(-1).tolist()


def test_sentence_transformers_truncate_dim_gives_our_prefixes(tiny_hf):
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    src, hf = tiny_hf
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{src}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{src}")
    photos = [Image.fromarray(a) for a in np.random.default_rng(1).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)]
    with torch.no_grad():
        exact_text = oc.double().encode_text(tokenizer(CAPTIONS[:4]))
        exact_image = oc.encode_image(torch.stack([preprocess(p) for p in photos]).double())
    for m in (16, 64):
        st = SentenceTransformer(str(hf), truncate_dim=m, device="cpu")
        for got, exact, n in ((st.encode(CAPTIONS[:4], convert_to_tensor=True, normalize_embeddings=True),
                               exact_text, forward_roundings(128, 16, 2, 2, 1)),
                              (st.encode(photos, convert_to_tensor=True, normalize_embeddings=True),
                               exact_image, forward_roundings(128, 50, 2, 2, 48))):
            assert got.shape[-1] == m
            prefix = exact[:, :m]
            bound = 2 * tolerance(exact, n).squeeze(-1) * math.sqrt(m) / prefix.norm(dim=-1) + 2 * m * U32
            error = (got.double() - F.normalize(prefix, dim=-1)).norm(dim=-1)
            assert (error <= bound).all(), (m, error, bound)


def test_align_is_refused_in_one_line(align_source, tmp_path, capfd):  # noqa: F811
    code, stderr = one_line_exit(export.main, ["--to", "transformers", "--model", f"local-dir:{align_source}",
                                               "--out", tmp_path / "hf"], capfd)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "ALIGN-style" in stderr, stderr
    assert not (tmp_path / "hf").exists()


def test_bad_input_is_one_line_exit_2(tiny_hf, tmp_path, capfd):
    src, hf = tiny_hf
    for argv, words in ((["--to", "onnx", "--model", f"local-dir:{src}", "--out", tmp_path / "x"], "invalid choice"),
                        (["--to", "transformers", "--model", f"local-dir:{src}", "--out", hf], "not an empty"),
                        (["--to", "transformers", "--model", TINY, "--out", tmp_path / "x"], "local-dir:")):
        code, stderr = one_line_exit(export.main, argv, capfd)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and words in stderr, stderr

