"""2D Matryoshka training (--image-layers / --text-layers): the exits against towers cut by hand, the loss against a
float64 recomputation and against sentence-transformers' Matryoshka2dLoss, gradients, the trainer end to end
(bitwise as today with one depth listed, resumable, cached, both engines, ranks, accumulation), bad input."""
import copy
import json
import math
import random
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mrl_clip.layers import IMAGE, TEXT, normalized_exits, tower_exits
from mrl_clip.loss import Matryoshka2dLoss, MatryoshkaClipLoss, MatryoshkaSigLipLoss
from mrl_clip.train.main import main as train_main

from .conftest import ROOT, TINY, one_line_exit
from .numerics import gamma, loss_tolerance, siglip_loss_tolerance
from .test_feature_cache import assert_same_training, free_port, train, train_flags, weights
from .test_finetune import HF_TINY, LITE0, lite0_configs, one_error_line  # noqa: F401
from .test_reliability import assert_same_training_state, log_records

HF_DIMS = [8, 16, 64]  # HF_TINY: a 2-layer ViT and a 3-layer BERT through open_clip's HF tower, embed_dim 64


def cut(model, tower: str, depth: int):
    """A copy of `model` whose `tower` runs its first `depth` blocks only: the independent view of an exit."""
    model = copy.deepcopy(model)
    if tower == IMAGE:
        model.visual.transformer.resblocks = model.visual.transformer.resblocks[:depth]
    elif hasattr(model, "text"):
        model.text.transformer.encoder.layer = model.text.transformer.encoder.layer[:depth]
    else:
        model.transformer.resblocks = model.transformer.resblocks[:depth]
    return model


def batch(model_name, n=6):
    torch.manual_seed(1)
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = tokenizer([f"a photo of {w} number {i}" for i, w in enumerate(["shirt", "bag", "shoe", "coat"] * 4)][:n])
    return torch.randn(n, 3, 28, 28), texts


@pytest.mark.parametrize("model_name", [TINY, HF_TINY])
def test_every_exit_is_the_tower_cut_at_that_depth(model_name, lite0_configs):
    torch.manual_seed(0)
    model = open_clip.create_model(model_name).eval()
    images, texts = batch(model_name)
    depths = {IMAGE: 2, TEXT: 2 if model_name == TINY else 3}
    with torch.no_grad():
        for tower, inputs in ((IMAGE, images), (TEXT, texts)):
            exits = tower_exits(model, tower, inputs, list(range(1, depths[tower] + 1)))
            for depth, got in enumerate(exits, start=1):
                short = cut(model, tower, depth)
                want = short.encode_image(inputs) if tower == IMAGE else short.encode_text(inputs)
                assert torch.equal(got, want), (tower, depth)
            full = model.encode_image(inputs) if tower == IMAGE else model.encode_text(inputs)
            assert torch.equal(exits[-1], full)
            assert not torch.allclose(exits[0], exits[-1])  # a shallower exit is another function


def f64_clip(img, txt, scale, dims):
    """Symmetric InfoNCE at each prefix, float64, from the definition."""
    out = {}
    for m in dims:
        a, b = F.normalize(img[:, :m].double(), dim=-1), F.normalize(txt[:, :m].double(), dim=-1)
        logits = scale * a @ b.T
        y = torch.arange(len(a))
        out[m] = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
    return out


def f64_siglip(img, txt, scale, bias, dims):
    out = {}
    for m in dims:
        a, b = F.normalize(img[:, :m].double(), dim=-1), F.normalize(txt[:, :m].double(), dim=-1)
        labels = 2 * torch.eye(len(a), dtype=torch.float64) - 1
        out[m] = -F.logsigmoid(labels * (scale * a @ b.T + bias)).sum() / len(a)
    return out


def f64_kl(student, teacher, t):
    p = F.softmax(teacher.double() / t, dim=-1)
    return (p * (p.log() - F.log_softmax(student.double() / t, dim=-1))).sum(-1).mean()


def kl_tolerance(width, rows, t):
    """|computed - exact| of one batchmean KL of softmax(x / t) rows of `width` unit-norm coordinates: each
    log-softmax and softmax entry is within gamma(width + 4) of (|x| / t + ln width + 1) relative scale, the sum
    over a row and the mean over rows add gamma(width + rows) of the row terms, each <= 2 / t + ln width."""
    scale = 2 / t + math.log(width) + 1
    return 2 * gamma(width + 4) * scale + gamma(width + rows + 2) * scale


@pytest.mark.parametrize("siglip", [False, True])
def test_each_exit_dim_term_and_the_total_equal_a_float64_recomputation(siglip, lite0_configs):
    """HF_TINY with both towers layered, exit k of one paired with exit k of the other; uniform and log
    weighting, all earlier exits and a drawn one."""
    torch.manual_seed(0)
    model = open_clip.create_model(HF_TINY).eval()
    images, texts = batch(HF_TINY, n=8)
    depths = {IMAGE: [1, 2], TEXT: [2, 3]}
    with torch.no_grad():
        img, txt = normalized_exits(model, IMAGE, images, depths[IMAGE]), normalized_exits(model, TEXT, texts,
                                                                                             depths[TEXT])
    scale, bias = torch.tensor(14.0), torch.tensor(-3.0)
    inner = MatryoshkaSigLipLoss(HF_DIMS) if siglip else MatryoshkaClipLoss(HF_DIMS)
    scalars = (scale, bias) if siglip else (scale,)
    per_dim = (lambda a, b: f64_siglip(a, b, 14.0, -3.0, HF_DIMS)) if siglip else (
        lambda a, b: f64_clip(a, b, 14.0, HF_DIMS))
    term_tol = (siglip_loss_tolerance(14.0, -3.0, HF_DIMS, [1] * 3, 8) if siglip
                else loss_tolerance(14.0, HF_DIMS, [1] * 3, 8))
    for weighting, last_w, prior_w, kl_w, t in [("uniform", 1.0, 1.0, 1.0, 0.3), ("log", 0.5, 2.0, 3.0, 0.5)]:
        loss = Matryoshka2dLoss(inner, depths, -1, last_w, prior_w, kl_w, t, weighting)
        total, terms = loss(img, txt, *scalars)
        full = per_dim(img[-1], txt[-1])
        early = per_dim(img[0], txt[0])
        kl = (f64_kl(img[0], img[-1], t) + f64_kl(txt[0], txt[-1], t)) / 2
        w = 1.0 if weighting == "uniform" else 1 / (1 + math.log(1 + 2))  # the deeper of the pair: text depth 2
        want = last_w * sum(full.values()) + prior_w * w * sum(early.values()) + kl_w * t * kl
        for m in HF_DIMS:
            assert abs(terms[m] - full[m]) <= term_tol and abs(terms[f"image1-text2_dim{m}"] - early[m]) <= term_tol
        assert abs(terms["image1-text2_kl"] - kl) <= kl_tolerance(64, 8, t)
        tol = (last_w + prior_w) * term_tol * 3 + kl_w * t * kl_tolerance(64, 8, t) * 2
        assert abs(float(total) - float(want)) <= tol, (weighting, float(total), float(want), tol)


def test_with_one_listed_depth_the_loss_is_todays_loss():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(1, 8, 64), dim=-1), F.normalize(torch.randn(1, 8, 64), dim=-1)
    inner = MatryoshkaClipLoss(HF_DIMS)
    total, terms = Matryoshka2dLoss(inner, {TEXT: [3]})(img, txt, torch.tensor(10.0))
    today, today_terms = inner(img[0], txt[0], torch.tensor(10.0))
    assert torch.equal(total, today) and terms == today_terms


def test_drawn_exits_depend_on_seed_and_step_only():
    loss = Matryoshka2dLoss(MatryoshkaClipLoss(HF_DIMS), {TEXT: [1, 2, 3, 4, 5, 6]}, layers_per_step=2, seed=7)
    again = Matryoshka2dLoss(MatryoshkaClipLoss(HF_DIMS), {TEXT: [1, 2, 3, 4, 5, 6]}, layers_per_step=2, seed=7)
    draws = [loss.sample(step) for step in range(40)]
    assert draws == [again.sample(step) for step in range(40)]
    assert all(len(d) == 2 and len(set(d)) == 2 and set(d) <= set(range(5)) for d in draws)
    assert len({tuple(d) for d in draws}) > 5  # they vary with the step


def test_equals_sentence_transformers_matryoshka2d_loss_on_text_pairs(towers_here):
    """Anchors and positives through all-MiniLM-L6-v2 (our HF tower, its projection set to the identity, against
    sentence-transformers' own model of it): our loss with the text tower on both sides, at the layer
    sentence-transformers draws, equals Matryoshka2dLoss over MultipleNegativesRankingLoss in both directions."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    from mrl_clip import models
    from mrl_clip.towers import ALIGN_LITE, ALIGN_LITE_DIMS, TEXT_REPO

    anchors = ["a red dress", "two cats asleep", "a bowl of soup", "a man riding a horse", "snow on a mountain",
               "an old bicycle", "a pair of boots", "café au lait, s'il vous plaît!"]
    positives = ["crimson gown", "kittens sleeping", "hot soup in a bowl", "horse rider", "snowy peak",
                 "a rusty bike", "leather boots", "coffee with milk"]
    st = SentenceTransformer(TEXT_REPO, device="cpu").eval()
    scale = 20.0
    st_loss = losses.Matryoshka2dLoss(
        st, losses.MultipleNegativesRankingLoss(st, scale=scale, directions=("query_to_doc", "doc_to_query"),
                                                partition_mode="per_direction"),
        ALIGN_LITE_DIMS, n_layers_per_step=1, n_dims_per_step=-1, prior_layers_weight=2.0, kl_div_weight=10.0)
    seed = next(s for s in range(100) if random.Random(s).sample(range(6), 1)[0] >= 1)  # layer 0: no encoder
    layer = random.Random(seed).sample(range(6), 1)[0]
    features = [st.preprocess(anchors), st.preprocess(positives)]
    random.seed(seed)
    with torch.no_grad():
        want = st_loss(features, None)

    model, _, _, tokenizer = models.create(ALIGN_LITE)
    model.eval()
    with torch.no_grad():
        model.text.proj.weight.copy_(torch.eye(384))
        a, p = (normalized_exits(model, TEXT, tokenizer(t), [layer, 6]) for t in (anchors, positives))
    ours = Matryoshka2dLoss(MatryoshkaClipLoss(ALIGN_LITE_DIMS), {IMAGE: [layer, 6], TEXT: [layer, 6]},
                            prior_layers_weight=2.0, kl_div_weight=10.0)
    got, _ = ours(a, p, torch.tensor(scale))
    # the two libraries' features (one BERT, other padding) differ by `feature_gap` at most; the loss's own
    # rounding is loss_tolerance's worst case for the full depth and the prior exit (weight 2), plus the KL's.
    # kl_div_weight 10 makes the KL term (~0.005 x 10 here) larger than that bound: leaving it out fails.
    feature_gap = max(float((x - e).abs().max()) for x, e in zip(a, st_exits(st, anchors, [layer, 6])))
    tol = 3 * loss_tolerance(scale, ALIGN_LITE_DIMS, [1] * 6, 8, feature_error=feature_gap) + \
        10 * 0.3 * kl_tolerance(384, 16, 0.3)
    assert abs(float(got) - float(want)) <= tol, (float(got), float(want), tol, layer)


def st_exits(st, texts, layers):
    """sentence-transformers' own embeddings at each depth (its Transformer's hidden states through its mean
    pooling and normalisation): how far our tower's features are from its."""
    features = st.preprocess(texts)
    with torch.no_grad():
        out = st[0].auto_model(**{k: v for k, v in features.items() if k in ("input_ids", "attention_mask")},
                               output_hidden_states=True)
    mask = features["attention_mask"].unsqueeze(-1).float()
    return [F.normalize((out.hidden_states[depth] * mask).sum(1) / mask.sum(1), dim=-1) for depth in layers]


def test_gradients_of_an_exit_reach_its_layers_and_the_head_only(lite0_configs):
    """HF_TINY's BERT locked but for its last layer (open_clip's lock_text_tower): exit 1's loss moves no locked
    parameter, no layer above the exit, and does move the projection; the full depth's moves the unlocked layer.
    The ViT, unlocked: exit 1's loss moves block 0, ln_post and proj, and not block 1."""
    torch.manual_seed(0)
    from mrl_clip.train.finetune import name_bert_layers

    name_bert_layers()  # open_clip names no BERT layers; the trainer's --lock-text-unlocked-layers does this too
    model = open_clip.create_model(HF_TINY)
    model.lock_text_tower(unlocked_layers=1, freeze_layer_norm=True)
    images, texts = batch(HF_TINY, n=8)
    img, txt = normalized_exits(model, IMAGE, images, [1, 2]), normalized_exits(model, TEXT, texts, [1, 3])
    named = dict(model.named_parameters())

    def moved(loss):
        trainable = [n for n, p in named.items() if p.requires_grad]
        grads = torch.autograd.grad(loss, [named[n] for n in trainable], retain_graph=True, allow_unused=True)
        return {n for n, g in zip(trainable, grads) if g is not None and g.abs().max() > 0}

    inner = MatryoshkaClipLoss(HF_DIMS)
    early_text = moved(inner(img[-1].detach(), txt[0], torch.tensor(10.0))[0])
    assert early_text and all(n.startswith("text.proj") for n in early_text), early_text
    full_text = moved(inner(img[-1].detach(), txt[-1], torch.tensor(10.0))[0])
    assert any(".layer.2." in n for n in full_text) and not any(".layer.0." in n or ".layer.1." in n
                                                                 for n in full_text)
    early_image = moved(inner(img[0], txt[-1].detach(), torch.tensor(10.0))[0])
    assert any("resblocks.0." in n for n in early_image) and not any("resblocks.1." in n for n in early_image)
    assert {"visual.proj", "visual.ln_post.weight"} <= early_image


def test_one_listed_depth_trains_bitwise_as_a_run_without_the_flags(fmnist_data, tmp_path):
    train(fmnist_data, tmp_path, "plain", steps=3)
    train(fmnist_data, tmp_path, "one-depth", "--image-layers", "2", "--text-layers", "2", steps=3)
    assert_same_training(tmp_path, "one-depth", "plain", step=3)


def test_a_drawn_exit_run_resumes_bitwise_and_logs_each_exit(fmnist_data, lite0_configs, tmp_path):
    flags = ["--text-layers", "1,2,3", "--layers-per-step", "1", "--save-every-n-steps", "100"]
    common = dict(model=HF_TINY, dims=HF_DIMS, configs=lite0_configs)
    train(fmnist_data, tmp_path, "whole", *flags, steps=4, **common)
    train(fmnist_data, tmp_path, "broken", *flags, steps=2, **common)
    train(fmnist_data, tmp_path, "broken", *flags, "--resume", "latest", steps=4, **common)
    assert_same_training_state(weights(tmp_path, "whole"), weights(tmp_path, "broken"))
    records = log_records(tmp_path / "whole")
    drawn = [sorted(k for k in r["loss_layer"] if k.endswith("_kl")) for r in records]
    assert all(len(d) == 1 for d in drawn) and len({d[0] for d in drawn}) == 2  # one of text1 / text2 a step
    assert set(records[0]["loss_dim"]) == {str(m) for m in HF_DIMS}
    config = json.loads((tmp_path / "whole" / "export" / "open_clip_config.json").read_text())  # what it nests
    assert config["matryoshka_dimensions"] == HF_DIMS and config["matryoshka_layers"] == {"text": [1, 2, 3]}


def test_a_locked_hf_tower_cached_at_every_exit_trains_as_uncached(fmnist_data, lite0_configs, tmp_path):
    flags = ["--lock-text", "--lock-text-freeze-layer-norm", "--deterministic-towers", "--text-layers", "1,2,3",
             "--layers-per-step", "-1"]
    common = dict(model=HF_TINY, dims=HF_DIMS, configs=lite0_configs, steps=2)
    train(fmnist_data, tmp_path, "cached", *flags, "--feature-cache", tmp_path / "cache", **common)
    train(fmnist_data, tmp_path, "plain", *flags, **common)
    assert_same_training(tmp_path, "cached", "plain", step=2)
    assert any(p.name.startswith("text-hf-pooled-layers1.2.3") for p in (tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_deepspeed_accumulation_and_two_ranks_train_a_2d_siglip_model(fmnist_data, tmp_path):
    """The tiny model, both towers layered, SigLIP. DeepSpeed ZeRO-2 (fp32) and --accum-freq 2 at half the batch
    start from the plain run's weights on the same 8 samples, so their first step's loss, every exit's term
    included, is the plain run's up to float32 rounding (the accumulated run concatenates the exits' stacks along
    the batch); two gloo ranks train and log every exit."""
    layers = ["--image-layers", "1,2", "--text-layers", "1,2", "--layers-per-step", "-1", "--siglip"]
    train(fmnist_data, tmp_path, "plain", *layers, steps=2)
    train(fmnist_data, tmp_path, "ds", *layers, "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json", steps=2)
    train(fmnist_data, tmp_path, "acc", *layers, "--accum-freq", "2", "--batch-size", "4", steps=2)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), "-m"]
    train(fmnist_data, tmp_path, "ranks", *layers, "--device", "cpu", "--dist-backend", "gloo", "--batch-size", "4",
          launch=launch, steps=2)
    first = {name: log_records(tmp_path / name)[0] for name in ("plain", "ds", "acc", "ranks")}
    dims = [8, 16, 32, 64, 128, 256]
    # features off by float32 rounding of the tiny towers' forward (<= ~10^3 rounded terms on any path)
    term = siglip_loss_tolerance(10.0, -10.0, dims, [1] * 6, 8, feature_error=gamma(1000))
    for name in ("ds", "acc"):
        assert abs(first[name]["loss"] - first["plain"]["loss"]) <= 2 * term + kl_tolerance(256, 8, 0.3), name
        for key, value in first["plain"]["loss_layer"].items():
            assert abs(first[name]["loss_layer"][key] - value) <= term + kl_tolerance(256, 8, 0.3), (name, key)
    assert set(first["ranks"]["loss_layer"]) == set(first["plain"]["loss_layer"])
    assert all(math.isfinite(r["loss"]) for r in log_records(tmp_path / "ranks"))


@pytest.mark.parametrize("flags,message", [
    (["--text-layers", "2,1"], "--text-layers must be strictly increasing"),
    (["--text-layers", "1,3"], "go past the tower's depth 2"),
    (["--text-layers", "1"], "must end at the tower's depth 2"),
    (["--image-layers", "1,2", "--text-layers", "2"], "list as many of each"),
    (["--kl-temperature", "0.5"], "only apply with --image-layers / --text-layers"),
    (["--text-layers", "1,2", "--layers-per-step", "0"], "--layers-per-step must be -1 (all) or at least 1"),
    (["--text-layers", "1,2", "--kl-div-weight", "nan"], "--kl-div-weight must be 0 or more"),
    (["--text-layers", "1,x"], "--text-layers must be comma-separated integers"),
    (["--lock-text", "--lock-text-freeze-layer-norm", "--text-layers", "1,2"], "no exit of it trains anything"),
])
def test_bad_layer_flags_are_one_line(fmnist_data, tmp_path, flags, message, capfd):
    code, stderr = one_line_exit(train_main, train_flags(fmnist_data, tmp_path, "bad", *flags), capfd)
    assert code == 2 and message in one_error_line(stderr)


def test_image_layers_on_a_cnn_tower_are_one_line(fmnist_data, lite0_configs, tmp_path, capfd):
    flags = train_flags(fmnist_data, tmp_path, "cnn", "--image-layers", "1,2", model=LITE0, dims=[8, 64])
    code, stderr = one_line_exit(train_main, flags, capfd)
    assert code == 2 and "not a transformer" in one_error_line(stderr)
