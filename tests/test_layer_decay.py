"""--image-layer-decay / --text-layer-decay (open_clip main's layer-wise lr decay) and --torchcompile: the param
groups' lr scales against a reference built from the parameter names, the lr each group really stepped with (read
back from AdamW's first update), the compiled run against the eager one, bad input."""
import re
from types import SimpleNamespace

import open_clip
import pytest
import torch
from open_clip_train.main import random_seed
from timm.optim import param_groups_weight_decay

from mrl_clip import models
from mrl_clip.train import layer_decay
from mrl_clip.train.main import main as train_main

from .conftest import TINY, TINY_DIMS, one_line_exit
from .numerics import gamma, loss_tolerance
from .test_feature_cache import train_flags as _train_flags
from .test_reliability import log_records

# MRL-Tiny-28's towers by parameter name, input -> output: (pattern, depth from the head); 2 blocks each
TINY_DEPTHS = {
    "image": [(r"visual\.(conv1|class_embedding|positional_embedding|ln_pre)", 3),
              (r"visual\.transformer\.resblocks\.0\.", 2), (r"visual\.(transformer\.resblocks\.1\.|ln_post)", 1),
              (r"visual\.proj$", 0)],
    "text": [(r"(token_embedding|positional_embedding)", 3), (r"transformer\.resblocks\.0\.", 2),
             (r"(transformer\.resblocks\.1\.|ln_final)", 1), (r"text_projection$", 0)],
}


def train_flags(*args, **kwargs) -> list:
    """tests/test_feature_cache.py's flags as strings, for main(argv) in this process."""
    return [str(a) for a in _train_flags(*args, **kwargs)]


def reference_scale(name: str, decays: dict) -> float:
    for tower, decay in decays.items():
        for pattern, depth in TINY_DEPTHS[tower]:
            if re.match(pattern, name):
                return decay ** depth
    return 1.0


def group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("decays", [{"image": 0.7, "text": 0.5}, {"text": 0.6}])
def test_each_parameters_lr_scale_is_the_reference(decays):
    model = models.create(TINY)[0]
    args = SimpleNamespace(image_layer_decay=decays.get("image"), text_layer_decay=decays.get("text"), wd=0.2)
    groups = layer_decay.param_groups(model, args)
    no_wd = {id(p) for g in param_groups_weight_decay(model, 0.2) if g["weight_decay"] == 0 for p in g["params"]}
    names = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(names)
    for name, param in names.items():
        group = group_of(groups, param)
        assert group["lr_scale"] == pytest.approx(reference_scale(name, decays), rel=1e-12), name
        assert (group["weight_decay"] == 0) == (id(param) in no_wd), name


def initial_tiny():
    random_seed(0, 0)  # the trainer's initial weights (it seeds with --seed before creating the model)
    return open_clip.create_model(TINY)


def test_each_group_steps_with_its_scaled_lr(fmnist_data, tmp_path):
    """One step from the trainer's initial weights: AdamW's first update of a parameter without weight decay is
    lr * g / (|g| + eps), so its largest |change| is the lr its group stepped with, to within eps / |g|."""
    decays = {"image": 0.5, "text": 0.8}
    flags = train_flags(fmnist_data, tmp_path, "decayed", "--image-layer-decay", "0.5", "--text-layer-decay", "0.8",
                        "--warmup", "1", "--workers", "0", steps=1)
    assert train_main(flags) == 0
    lr = 1e-2  # train_flags' --lr; with --warmup 1 the first step runs at it (open_clip_train's _warmup_lr)
    before = dict(initial_tiny().named_parameters())
    after = torch.load(tmp_path / "decayed" / "checkpoints" / "step_1.pt", weights_only=True)
    seen = set()
    for name, value in after["state_dict"].items():
        if before[name].ndim > 1 or name == "logit_scale":  # weight decay moves those too / clamped
            continue
        change = float((value - before[name].detach()).abs().max())
        expected = lr * reference_scale(name, decays)
        # below by eps / |g|; either way by the float32 rounding of p - lr g/|g| (2^-24 |p| <= 1e-5 of the change)
        assert abs(change - expected) <= 1e-3 * expected, (name, change, expected)
        seen.add(round(expected / lr, 6))
    # the 1-d parameters sit in every group but the heads and the text embeddings
    assert seen == {0.5, 0.25, 0.125, 0.8, 0.64}
    saved = {round(g["lr"] / lr, 6) for g in after["optimizer"]["param_groups"]}
    assert saved == {round(g["lr_scale"], 6) for g in after["optimizer"]["param_groups"]}


@pytest.mark.parametrize("extra,message", [
    (["--image-layer-decay", "0"], "--image-layer-decay must be in (0, 1]"),
    (["--text-layer-decay", "1.5"], "--text-layer-decay must be in (0, 1]"),
    (["--text-layer-decay", "nan"], "--text-layer-decay must be in (0, 1]"),
])
def test_bad_layer_decay_is_one_line(fmnist_data, tmp_path, extra, message, capfd):
    code, err = one_line_exit(train_main, train_flags(fmnist_data, tmp_path, "bad", *extra, steps=1), capfd)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_one_and_saves_plain_checkpoints(fmnist_data, tmp_path):
    """--torchcompile (inductor on CPU): the first step's loss, from the same weights and samples, is the eager
    run's to float32 rounding of the towers (a fused kernel rounds otherwise), and its checkpoint is plain
    open_clip (no _orig_mod. keys) that resumes and loads in open_clip."""
    for name, extra in (("eager", []), ("compiled", ["--torchcompile"])):
        assert train_main(train_flags(fmnist_data, tmp_path, name, *extra, "--workers", "0", steps=2)) == 0
    eager, compiled = log_records(tmp_path / "eager"), log_records(tmp_path / "compiled")
    bound = loss_tolerance(1 / 0.07, TINY_DIMS, [1] * len(TINY_DIMS), 8, feature_error=gamma(1000))
    assert abs(compiled[0]["loss"] - eager[0]["loss"]) <= bound, (compiled[0]["loss"], eager[0]["loss"])
    checkpoint = tmp_path / "compiled" / "checkpoints" / "step_2.pt"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert set(state) == set(open_clip.create_model(TINY).state_dict())
    loaded = open_clip.create_model(TINY, pretrained=str(checkpoint))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert train_main(train_flags(fmnist_data, tmp_path, "compiled", "--torchcompile", "--workers", "0",
                                  "--resume", "latest", steps=3)) == 0
    assert [r["step"] for r in log_records(tmp_path / "compiled")] == [1, 2, 3]
