"""open_clip's fine-tuning flags in mrl_clip.train (--lock-image*, --lock-text*, --grad-checkpointing), through the
real CLI: what is locked is what open_clip's own lock_image_tower / lock_text_tower lock on a fresh model, stays
bitwise unchanged (BatchNorm statistics too when frozen), has no optimizer state, and stays locked on resume and
under DeepSpeed."""
import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import open_clip
import pytest
import torch

from mrl_clip.errors import run_cli
from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train import finetune
from mrl_clip.train.main import main as train_main
from mrl_clip.train.plain_engine import make_optimizer
from tests.conftest import ROOT, TINY, TINY_DIMS

STEPS = 4
IMAGE_GROUPS, TEXT_GROUPS = 2, 2  # MRL-Tiny-28 has 4 of each: 2 blocks, so this splits inside the towers
LOCKS = ["--lock-image", "--lock-image-unlocked-groups", IMAGE_GROUPS, "--lock-text", "--lock-text-unlocked-layers",
         TEXT_GROUPS, "--lock-text-freeze-layer-norm"]
# a timm tower with BatchNorm, random weights, at 32 px (timm_model_pretrained false: nothing downloads)
LITE0 = "Lite0-Test-32"
LITE0_DIMS = [8, 16, 32, 64]
LITE0_CONFIG = {"embed_dim": 64,
                "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                               "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


HF_TINY = "HF-BERT-Test"


@pytest.fixture(scope="module")
def lite0_configs(tmp_path_factory):
    """Test-local open_clip configs: LITE0, and HF_TINY, a ViT with a three-layer BERT text tower through open_clip's
    Hugging Face tower (random weights and a letters-only WordPiece vocabulary in a local folder: no hub)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{LITE0}.json").write_text(json.dumps(LITE0_CONFIG))
    bert = folder / "bert"
    bert.mkdir()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
                                               *("##" + c for c in letters)]) + "\n")
    BertTokenizerFast(str(bert / "vocab.txt")).save_pretrained(bert)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=57, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config, add_pooling_layer=False).save_pretrained(bert)
    (folder / f"{HF_TINY}.json").write_text(json.dumps(
        {"embed_dim": 64, "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "patch_size": 7},
         "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "linear",
                      "hf_pooler_type": "mean_pooler", "context_length": 16}}))
    open_clip.add_model_config(folder)
    return folder


def start_checkpoint(folder, model_name):
    """Seeded random weights as an open_clip checkpoint: the --pretrained start of a run."""
    torch.manual_seed(0)
    model = open_clip.create_model(model_name)
    path = folder / f"{model_name}-start.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model


def train(data, logs, name, *extra, model=TINY, dims=TINY_DIMS, steps=STEPS, configs=None):
    """The real CLI (under tests/with_model_configs.py for a test-local model config)."""
    launch = [ROOT / "tests" / "with_model_configs.py", configs] if configs else ["-m"]
    args = [sys.executable, *launch, "mrl_clip.train", "--model", model, "--train-data", data["train"],
            "--dims", ",".join(map(str, dims)), "--batch-size", "16", "--max-steps", steps, "--lr", "1e-2",
            "--warmup", "1", "--workers", "0", "--threads", "1", "--logs", logs, "--name", name,
            "--log-every-n-steps", "1", "--save-every-n-steps", "2", *extra]
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return logs / name


def finetune_args(flags):
    parser = argparse.ArgumentParser()
    finetune.add_flags(parser)
    return parser.parse_args([str(f) for f in flags])


def checkpoint(run_dir, step=STEPS):
    return torch.load(run_dir / "checkpoints" / f"step_{step}.pt", weights_only=True)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def frozen_by_open_clip(model_name, image_groups=None, text_layers=None, freeze_bn_stats=False):
    """The independent reference: a fresh model locked by open_clip's own methods, as open_clip_train calls them."""
    model = open_clip.create_model(model_name)
    if image_groups is not None:
        model.lock_image_tower(unlocked_groups=image_groups, freeze_bn_stats=freeze_bn_stats)
    if text_layers is not None:
        model.lock_text_tower(unlocked_layers=text_layers)
    return model, {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def locked_run(fmnist_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("locked")
    start, _ = start_checkpoint(logs, TINY)
    return train(fmnist_data, logs, "locked", "--pretrained", start, *LOCKS), start


def test_locked_parameters_are_open_clips_stay_bitwise_and_have_no_optimizer_state(locked_run):
    run_dir, start_path = locked_run
    start = torch.load(start_path, weights_only=True)["state_dict"]
    final = checkpoint(run_dir)
    reference, frozen = frozen_by_open_clip(TINY, IMAGE_GROUPS, TEXT_GROUPS)
    names = [n for n, _ in reference.named_parameters()]
    unchanged = {n for n in names if torch.equal(final["state_dict"][n], start[n])}
    assert frozen and len(frozen) < len(names)  # the split is inside both towers
    assert any(n.startswith("visual.") for n in frozen) and any(n.startswith("transformer.") for n in frozen)
    assert unchanged == frozen  # locked: bitwise the start; everything else moved
    trainable = [p for groups in make_optimizer(reference, 1e-3, 0.1, (0.9, 0.98), 1e-6).param_groups
                 for p in groups["params"]]
    state = final["optimizer"]["state"]
    assert len(trainable) == len(names) - len(frozen) == len(state)
    assert [tuple(state[i]["exp_avg"].shape) for i in range(len(trainable))] == [tuple(p.shape) for p in trainable]
    assert final["locks"] == finetune.lock_record(finetune_args(LOCKS))


def test_resume_keeps_the_locks_bitwise(locked_run, fmnist_data, tmp_path, capfd):
    """Locks are applied before the resume: the checkpoint's optimizer state (trainable parameters only) loads and
    the resumed run ends bitwise where the unbroken one did. Other lock flags are refused in one line."""
    run_dir, start = locked_run
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "step_2.pt", tmp_path / "resumed" / "checkpoints")
    resumed = train(fmnist_data, tmp_path, "resumed", "--pretrained", start, "--resume", "latest", *LOCKS)
    a, b = checkpoint(run_dir), checkpoint(resumed)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert losses(resumed) == losses(run_dir)[2:]
    code, stderr = in_process(fmnist_data, tmp_path, "--resume", run_dir / "checkpoints" / "step_2.pt",
                              "--lock-image", capfd=capfd)
    assert code == 2 and "resume with the same --lock-* flags" in one_error_line(stderr)


def test_grad_checkpointing_recomputes_and_trains_the_same(locked_run, fmnist_data, tmp_path):
    """In-process: with --grad-checkpointing each block is entered again in the backward (a pre-hook counts it:
    torch stops a recomputation once it has what it saved, so a forward hook does not fire), and the gradients are
    the same. Through the CLI: the same losses and weights after 4 locked steps. Same kernels on the same
    operands in the same order (non-reentrant torch.utils.checkpoint, one thread): bitwise, no tolerance needed."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    checkpointed = copy.deepcopy(model)
    finetune.apply(checkpointed, finetune_args(["--grad-checkpointing"]))
    images, texts = torch.randn(8, 3, 28, 28), torch.randint(1, 400, (8, 16))
    loss_fn = MatryoshkaClipLoss(TINY_DIMS)
    calls = {}
    for name, m in (("plain", model), ("checkpointed", checkpointed)):
        calls[name] = 0
        block = m.visual.transformer.resblocks[0]
        block.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        loss_fn(*m(images, texts)[:3])[0].backward()
    assert calls == {"plain": 1, "checkpointed": 2}
    for (n, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        assert torch.equal(p.grad, q.grad), n
    run_dir, start = locked_run
    again = train(fmnist_data, tmp_path, "ckpt", "--pretrained", start, *LOCKS, "--grad-checkpointing")
    assert losses(again) == losses(run_dir)
    a, b = checkpoint(run_dir)["state_dict"], checkpoint(again)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def bn_stats(state_dict):
    return {k: v for k, v in state_dict.items() if k.endswith(("running_mean", "running_var"))}


def test_timm_tower_batch_norm_statistics_frozen_only_when_asked(fmnist_data, lite0_configs, tmp_path):
    """tf_efficientnet_lite0 (BatchNorm everywhere), the trainer in train mode throughout. --lock-image with the
    last timm group unlocked and --lock-image-freeze-bn-stats: the running statistics open_clip freezes (its
    FrozenBatchNorm2d modules on a fresh model) stay bitwise, the unlocked group's move. Without the flag, a whole
    --lock-image still updates every running statistic (BatchNorm in train mode), while the weights stay."""
    start_path, _ = start_checkpoint(tmp_path, LITE0)
    start = torch.load(start_path, weights_only=True)["state_dict"]
    common = dict(model=LITE0, dims=LITE0_DIMS, steps=2, configs=lite0_configs)
    frozen_run = train(fmnist_data, tmp_path, "freeze", "--pretrained", start_path, "--lock-image",
                       "--lock-image-unlocked-groups", "1", "--lock-image-freeze-bn-stats", **common)
    free_run = train(fmnist_data, tmp_path, "free", "--pretrained", start_path, "--lock-image", **common)

    reference, frozen = frozen_by_open_clip(LITE0, image_groups=1, freeze_bn_stats=True)
    frozen_bn = {f"{n}.{s}" for n, m in reference.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"
                 for s in ("running_mean", "running_var")}
    stats = bn_stats(checkpoint(frozen_run, 2)["state_dict"])
    assert frozen_bn and set(stats) > frozen_bn
    assert {k for k, v in stats.items() if torch.equal(v, start[k])} == frozen_bn
    final = checkpoint(frozen_run, 2)["state_dict"]
    assert {n for n, _ in reference.named_parameters() if torch.equal(final[n], start[n])} == frozen

    final = checkpoint(free_run, 2)["state_dict"]
    assert all(not torch.equal(v, start[k]) for k, v in bn_stats(final).items())
    _, frozen = frozen_by_open_clip(LITE0, image_groups=0)
    assert {n for n in frozen if not torch.equal(final[n], start[n])} == set()
    assert not torch.equal(final["visual.head.proj.weight"], start["visual.head.proj.weight"])  # timm: head trains


def test_frozen_timm_batch_norm_keeps_the_towers_function(lite0_configs):
    """--lock-image --lock-image-freeze-bn-stats on a timm EfficientNet: in train mode, the locked tower computes
    what the unlocked tower computes in eval mode (float64, so only rounding differs: ~1e-15 here). timm's
    BatchNormAct2d is batch norm plus the activation; open_clip's own freeze turns it into a bare FrozenBatchNorm2d,
    which drops the activation (the second check: it fails on open_clip's lock)."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference = open_clip.create_model(LITE0).double().eval()
    weights = copy.deepcopy(reference.state_dict())
    with torch.no_grad():
        expected = reference.visual.trunk(images)
    args = SimpleNamespace(model=LITE0, lock_image_unlocked_groups=0, lock_image_freeze_bn_stats=True)
    finetune.lock_image(reference, args)
    with torch.no_grad():
        ours = reference.train().visual.trunk(images)
    assert (ours - expected).abs().max() <= 1e-9 * expected.abs().max()

    open_clips = open_clip.create_model(LITE0).double()
    open_clips.load_state_dict(weights)
    open_clips.lock_image_tower(freeze_bn_stats=True)
    with torch.no_grad():
        dropped = open_clips.train().visual.trunk(images)
    assert not torch.allclose(dropped, expected)


def test_deepspeed_zero2_keeps_locked_parameters_bitwise(fmnist_data, tmp_path):
    """ZeRO-2 on the CPU: DeepSpeed is handed the trainable parameters only; the fp32 checkpoint it writes at the
    end holds the locked ones bitwise as they started."""
    start_path, _ = start_checkpoint(tmp_path, TINY)
    start = torch.load(start_path, weights_only=True)["state_dict"]
    run_dir = train(fmnist_data, tmp_path, "ds", "--pretrained", start_path, *LOCKS, "--deepspeed",
                    ROOT / "configs" / "ds_zero2_fp32.json", steps=2)
    final = checkpoint(run_dir, 2)["state_dict"]
    reference, frozen = frozen_by_open_clip(TINY, IMAGE_GROUPS, TEXT_GROUPS)
    assert {n for n, _ in reference.named_parameters() if torch.equal(final[n], start[n])} == frozen


def test_hugging_face_bert_tower_partly_locked_under_zero2(fmnist_data, lite0_configs, tmp_path):
    """open_clip's HFTextEncoder.lock on a BERT tower (all-MiniLM-L6-v2's family), ZeRO-2 on the CPU,
    --lock-text --lock-text-unlocked-layers 1 with open_clip_train's default (LayerNorms not frozen): the
    embeddings and the first two of three layers are bitwise unchanged but for their LayerNorms, which train, as do
    the last layer and the projection. The reference is written from the flags' documented meaning, by name."""
    start_path, model = start_checkpoint(tmp_path, HF_TINY)
    start = torch.load(start_path, weights_only=True)["state_dict"]
    run_dir = train(fmnist_data, tmp_path, "hf", "--pretrained", start_path, "--lock-text",
                    "--lock-text-unlocked-layers", "1", "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json",
                    model=HF_TINY, dims=LITE0_DIMS, steps=2, configs=lite0_configs)
    final = checkpoint(run_dir, 2)["state_dict"]
    names = [n for n, _ in model.named_parameters()]
    locked = {n for n in names if n.startswith(("text.transformer.embeddings.", "text.transformer.encoder.layer.0.",
                                                "text.transformer.encoder.layer.1.")) and "LayerNorm" not in n}
    assert len(locked) == 27
    assert {n for n in names if torch.equal(final[n], start[n])} == locked
    finetune.name_bert_layers()  # open_clip's own lock, given the layer names its table lacks for BERT
    model.lock_text_tower(unlocked_layers=1, freeze_layer_norm=False)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == locked


def test_group_counts_are_where_open_clip_stops_locking(lite0_configs):
    """The counts the flags are checked against: with N - 1 groups unlocked open_clip still locks something, with N
    nothing (of the timm trunk: its projection head is never locked)."""
    for name, count in ((TINY, 4), (LITE0, 17)):
        model = open_clip.create_model(name)
        assert finetune.image_groups(model.visual) == count
        for n, locks_some in ((count - 1, True), (count, False)):
            _, frozen = frozen_by_open_clip(name, image_groups=n)
            assert bool({f for f in frozen if f.startswith("visual.")}) == locks_some, (name, n)
    model = open_clip.create_model(TINY)
    assert finetune.text_groups(model) == 4
    assert frozen_by_open_clip(TINY, text_layers=3)[1] and not frozen_by_open_clip(TINY, text_layers=4)[1]


def in_process(data, tmp_path, *flags, capfd, model=TINY, dims=TINY_DIMS):
    args = ["--model", model, "--train-data", data["train"], "--dims", ",".join(map(str, dims)), "--max-steps", "1",
            "--threads", "1", "--workers", "0", "--logs", tmp_path, *flags]
    with pytest.raises(SystemExit) as exited:
        run_cli(train_main, [str(a) for a in args])
    return exited.value.code, capfd.readouterr().err


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


BAD = [
    (["--lock-image-unlocked-groups", "1"], "only apply with --lock-image"),
    (["--lock-text-freeze-layer-norm", "--lock-text-unlocked-layers", "1"], "only apply with --lock-text"),
    (["--lock-image", "--lock-image-unlocked-groups", "-1"], "must be 0 or more"),
    (["--lock-image", "--lock-image-unlocked-groups", "4"], "the image tower has 4 groups"),
    (["--lock-text", "--lock-text-freeze-layer-norm", "--lock-text-unlocked-layers", "9"],
     "the text tower has 4 groups"),
    (["--lock-text"], "needs --lock-text-freeze-layer-norm"),
    (["--pretrained-image"], "not a timm model"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(flags, message, fmnist_data, tmp_path, capfd):
    code, stderr = in_process(fmnist_data, tmp_path, *flags, capfd=capfd)
    assert code == 2 and message in one_error_line(stderr)
    assert not any(tmp_path.iterdir()), "the run started before refusing"


@pytest.mark.parametrize("model,flags,message", [
    (LITE0, ["--lock-image", "--lock-image-unlocked-groups", "17"], "the image tower has 17 groups, so at most 16"),
    (HF_TINY, ["--lock-text", "--lock-text-unlocked-layers", "4"], "the text tower has 4 groups, so at most 3")])
def test_timm_and_hugging_face_counts_are_checked_too(model, flags, message, fmnist_data, lite0_configs, tmp_path,
                                                      capfd):
    code, stderr = in_process(fmnist_data, tmp_path, *flags, capfd=capfd, model=model, dims=LITE0_DIMS)
    assert code == 2 and message in one_error_line(stderr)


def test_packaged_align_towers_locked_under_zero2(fmnist_data, towers_env, towers_here, tmp_path):
    """ALIGN-Lite0-MiniLM-384 from the packaged weights (--pretrained-image: the ImageNet EfficientNet-Lite0; the
    MiniLM text tower loads its own), ZeRO-2 on the CPU: --lock-image --lock-image-freeze-bn-stats and --lock-text
    --lock-text-unlocked-layers 2 (of MiniLM's embeddings + 6 layers). The locked weights and BatchNorm statistics
    end bitwise as the packaged towers start (a fresh in-process model from the same cache)."""
    from mrl_clip import models

    name = "ALIGN-Lite0-MiniLM-384"
    run = [sys.executable, "-m", "mrl_clip.train", "--model", name, "--train-data", fmnist_data["train"],
           "--dims", "48,96,192,384", "--batch-size", "8", "--max-steps", "2", "--lr", "1e-3", "--warmup", "1",
           "--workers", "0", "--threads", "1", "--logs", tmp_path, "--name", "align", "--save-every-n-steps", "2",
           "--pretrained-image", "--lock-image", "--lock-image-freeze-bn-stats", "--lock-text",
           "--lock-text-unlocked-layers", "2", "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json"]
    result = subprocess.run([str(a) for a in run], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **towers_env})
    assert result.returncode == 0, result.stderr[-3000:]
    final = checkpoint(tmp_path / "align", 2)["state_dict"]
    start = models.create(name, pretrained_image=True)[0].state_dict()
    text_locked = ("text.transformer.embeddings.", *(f"text.transformer.encoder.layer.{i}." for i in range(4)))
    locked = [k for k in start if k.startswith("visual.trunk.") and "num_batches_tracked" not in k
              or k.startswith(text_locked) and "LayerNorm" not in k]
    assert {k.split(".")[0] for k in locked} == {"visual", "text"} and any("running_var" in k for k in locked)
    assert all(torch.equal(final[k], start[k]) for k in locked)
    # loaded like the locked ones, but trainable: an unlocked layer, and a locked layer's LayerNorm (open_clip_train's
    # default leaves a Hugging Face tower's LayerNorms trainable)
    moved = ["text.transformer.encoder.layer.5.output.dense.weight",
             "text.transformer.encoder.layer.0.output.LayerNorm.weight"]
    assert not any(torch.equal(final[k], start[k]) for k in moved)
